//! Why a VM ended, and the process exit code for it.
//!
//! Exit codes (documented in the README):
//! * 0: the guest powered off, halted, or reset itself (i8042 `reboot=k`, KVM system event);
//! * 1: thinvm could not start or run the VM (bad arguments, missing kernel, KVM errors);
//! * 2: the guest crashed: triple fault (KVM shutdown exit) or a KVM crash event;
//! * 3: KVM could not run the guest's code (emulation failure / internal error);
//! * 128 + N: stopped by signal N (130 for SIGINT, 143 for SIGTERM); 130 for Ctrl-A x;
//! * `(v << 1) | 1` (low 8 bits): the guest wrote v to the debug-exit port (`--debug-exit`,
//!   QEMU's isa-debug-exit semantics);
//! * with `--exec`: the command's status (128 + N when a signal N killed it); 126 the agent
//!   could not start it; 124 `--timeout` ran out (also without `--exec`); 125 the VM ended
//!   (any other way) before the command's status came back, or the agent's connection did.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 pulse or KVM reset event).
    Reset,
    /// The guest powered off (KVM shutdown event) or halted all vCPUs with interrupts off.
    Poweroff,
    /// Triple fault.
    TripleFault { vcpu: u32 },
    /// KVM reported a guest crash event.
    Crash { vcpu: u32 },
    /// KVM could not emulate an instruction.
    EmulationFailure { vcpu: u32, rip: u64, bytes: Vec<u8> },
    /// Another KVM internal error.
    InternalError { vcpu: u32, suberror: u32 },
    /// VM entry failed.
    FailEntry { vcpu: u32, reason: u64 },
    /// A KVM_RUN error or an exit thinvm does not handle.
    Fatal { vcpu: u32, msg: String },
    /// Stopped by a signal.
    Signal(i32),
    /// The user pressed Ctrl-A x on the console.
    UserQuit,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u64),
    /// `--exec`: the command ended with this exit status.
    CommandExited(u8),
    /// `--exec`: the guest's agent could not start the command.
    CommandNotStarted(String),
    /// `--exec`: the agent's connection ended without the command's status (or never said
    /// hello); the VM was stopped.
    AgentLost(String),
    /// `--timeout` ran out.
    Timeout(u64),
}

/// Exit code of `--exec` when the VM ended before the command's status came back.
pub const EXEC_VM_ENDED: u8 = 125;

impl ExitReason {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Reset | ExitReason::Poweroff => 0,
            ExitReason::TripleFault { .. } | ExitReason::Crash { .. } => 2,
            ExitReason::EmulationFailure { .. }
            | ExitReason::InternalError { .. }
            | ExitReason::FailEntry { .. }
            | ExitReason::Fatal { .. } => 3,
            // 128 + N for signals 1..=64; anything else saturates (0 or 255).
            ExitReason::Signal(s) => {
                u8::try_from(s.saturating_add(128)).unwrap_or(if *s < 0 { 0 } else { u8::MAX })
            }
            ExitReason::UserQuit => 130,
            ExitReason::DebugExit(v) => devices::legacy::DebugExit::exit_status(*v),
            ExitReason::CommandExited(c) => *c,
            ExitReason::CommandNotStarted(_) => 126,
            ExitReason::AgentLost(_) => EXEC_VM_ENDED,
            ExitReason::Timeout(_) => 124,
        }
    }

    /// The exit code in `--exec` mode: the command's status, or 124 / 125 / 126 / signals.
    pub fn exec_exit_code(&self) -> u8 {
        match self {
            ExitReason::CommandExited(_)
            | ExitReason::CommandNotStarted(_)
            | ExitReason::Timeout(_)
            | ExitReason::Signal(_)
            | ExitReason::UserQuit => self.exit_code(),
            _ => EXEC_VM_ENDED,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Reset => "guest requested a reset".into(),
            ExitReason::Poweroff => "guest powered off".into(),
            ExitReason::TripleFault { vcpu } => {
                format!("guest triple fault on vCPU {vcpu} (KVM shutdown exit)")
            }
            ExitReason::Crash { vcpu } => format!("guest crashed (KVM crash event on vCPU {vcpu})"),
            ExitReason::EmulationFailure { vcpu, rip, bytes } => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!(
                    "KVM emulation failure on vCPU {vcpu} at RIP {rip:#x}, instruction bytes [{}]{}",
                    hex.join(" "),
                    if bytes.is_empty() { " (not reported by this KVM)" } else { "" }
                )
            }
            ExitReason::InternalError { vcpu, suberror } => {
                format!("KVM internal error on vCPU {vcpu} (suberror {suberror})")
            }
            ExitReason::FailEntry { vcpu, reason } => {
                format!("VM entry failed on vCPU {vcpu} (hardware reason {reason:#x})")
            }
            ExitReason::Fatal { vcpu, msg } => format!("vCPU {vcpu}: {msg}"),
            ExitReason::UserQuit => "stopped from the console (Ctrl-A x)".into(),
            ExitReason::DebugExit(v) => format!(
                "guest wrote {v:#x} to the debug-exit port (exit status {})",
                self.exit_code()
            ),
            ExitReason::CommandExited(c) => format!("the command exited with status {c}"),
            ExitReason::CommandNotStarted(m) => {
                format!("the guest's agent could not run the command: {m}")
            }
            ExitReason::AgentLost(m) => {
                format!("--exec: lost the guest's agent before the command's status: {m}")
            }
            ExitReason::Timeout(s) => format!("stopped: --timeout of {s} s ran out"),
            ExitReason::Signal(s) => format!(
                "stopped by signal {s} ({})",
                match *s {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGHUP => "SIGHUP",
                    _ => "signal",
                }
            ),
        }
    }
}

/// The first exit reason reported wins; `evt` wakes the event loop.
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    /// Set with the reason: a cheap check for the vCPU threads.
    ended: std::sync::atomic::AtomicBool,
    pub evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            ended: std::sync::atomic::AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn set(&self, r: ExitReason) {
        let mut g = crate::sync::lock(&self.reason);
        if g.is_none() {
            *g = Some(r);
        }
        self.ended.store(true, std::sync::atomic::Ordering::Release);
        drop(g);
        let _ = self.evt.write(1);
    }

    /// Whether the VM is ending (a reason was set).
    pub fn is_set(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn get(&self) -> Option<ExitReason> {
        crate::sync::lock(&self.reason).clone()
    }
}

/// When the process started (for `THINVM_TIMING`; the binary sets it first thing).
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// `THINVM_TIMING=1`: prints `thinvm-timing: PHASE-ms=T` on stderr, T the milliseconds since
/// the process started (benchmarks: where a boot or a restore spends its time before the
/// guest runs).
pub fn timing_mark(phase: &str) {
    if std::env::var_os("THINVM_TIMING").is_none() {
        return;
    }
    if let Some(t0) = PROCESS_START.get() {
        eprintln!(
            "thinvm-timing: {phase}-ms={:.1}",
            t0.elapsed().as_secs_f64() * 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes() {
        let s = ExitState::new().unwrap();
        s.set(ExitReason::Reset);
        s.set(ExitReason::Signal(libc::SIGTERM));
        assert_eq!(s.get(), Some(ExitReason::Reset));
        assert_eq!(ExitReason::Signal(libc::SIGINT).exit_code(), 130);
        assert_eq!(ExitReason::TripleFault { vcpu: 0 }.exit_code(), 2);
        assert_eq!(ExitReason::DebugExit(0x2a).exit_code(), 85);
        let d = ExitReason::EmulationFailure {
            vcpu: 0,
            rip: 0x1000,
            bytes: vec![0xf0, 0x48],
        }
        .describe();
        assert!(d.contains("0x1000") && d.contains("f0 48"), "{d}");
    }
}
