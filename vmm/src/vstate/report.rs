//! What each vCPU is doing, on demand: on SIGUSR1 and when `--timeout` runs out, so that a
//! hung guest can be told apart from a hung VMM. The controller asks (a new request number)
//! and kicks the vCPUs out of `KVM_RUN`; each vCPU thread answers from its own side (registers,
//! mp state, its exits), since only it may touch its vCPU while it runs. A vCPU that does not
//! answer is busy in a device's exit handler (or parked for a pause), which is itself the
//! answer.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MP_STATE_AP_RESET_HOLD, KVM_MP_STATE_CHECK_STOP, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_LOAD, KVM_MP_STATE_OPERATING, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED,
    KVM_MP_STATE_UNINITIALIZED,
};

use crate::arch::regs::X86_EFLAGS_IF;
use crate::sync::lock;

/// The exit a vCPU saw last (port or address where it has one).
#[derive(Clone, Copy, Debug)]
pub struct LastExit {
    pub kind: &'static str,
    pub addr: u64,
}

/// A vCPU's exits as its reports tell them: each exit is counted and kept as the last one
/// (no clock is read on that path); when the last one happened is bounded at the kicks (the
/// halt tick kicks the vCPUs 4 times a second while they are all idle, never while one runs;
/// a report kicks them too): after the kick before the one that first saw it.
#[derive(Clone, Copy, Debug)]
pub struct ExitLog {
    exits: u64,
    last: Option<LastExit>,
    exits_at_kick: u64,
    kicked_at: Instant,
    last_after: Option<Instant>,
}

impl ExitLog {
    pub fn new() -> ExitLog {
        ExitLog {
            exits: 0,
            last: None,
            exits_at_kick: 0,
            kicked_at: Instant::now(),
            last_after: None,
        }
    }

    /// One exit (on the vCPU's hot path).
    pub fn record(&mut self, last: LastExit) {
        self.exits += 1;
        self.last = Some(last);
    }

    /// The vCPU was kicked out of `KVM_RUN` at `now`.
    pub fn kicked(&mut self, now: Instant) {
        if self.exits != self.exits_at_kick {
            self.exits_at_kick = self.exits;
            self.last_after = Some(self.kicked_at);
        }
        self.kicked_at = now;
    }
}

/// What a vCPU reports about itself.
#[derive(Clone, Copy, Debug)]
pub struct VcpuReport {
    pub rip: u64,
    pub rflags: u64,
    pub mp_state: u32,
    pub exits: ExitLog,
}

/// How long the vCPUs have to answer when the reports are printed.
const PRINT_WAIT: Duration = Duration::from_secs(1);

fn mp_state_name(s: u32) -> &'static str {
    match s {
        KVM_MP_STATE_RUNNABLE => "runnable",
        KVM_MP_STATE_UNINITIALIZED => "uninitialized",
        KVM_MP_STATE_INIT_RECEIVED => "init-received",
        KVM_MP_STATE_HALTED => "halted",
        KVM_MP_STATE_SIPI_RECEIVED => "sipi-received",
        KVM_MP_STATE_STOPPED => "stopped",
        KVM_MP_STATE_CHECK_STOP => "check-stop",
        KVM_MP_STATE_OPERATING => "operating",
        KVM_MP_STATE_LOAD => "load",
        KVM_MP_STATE_AP_RESET_HOLD => "ap-reset-hold",
        KVM_MP_STATE_SUSPENDED => "suspended",
        _ => "unknown",
    }
}

impl VcpuReport {
    /// One line, e.g. `rip 0xffffffff81c4a2b6, rflags 0x246 (interrupts on), mp state halted;
    /// 1234 exits, the last (mmio write 0xd0000050) less than 0.4 s ago`.
    pub fn describe(&self, now: Instant) -> String {
        let last = match (self.exits.last, self.exits.last_after) {
            (Some(e), Some(after)) => format!(
                ", the last ({} {:#x}) less than {:.1} s ago",
                e.kind,
                e.addr,
                now.saturating_duration_since(after).as_secs_f64()
            ),
            (Some(e), None) => format!(", the last ({} {:#x})", e.kind, e.addr),
            (None, _) => String::new(),
        };
        format!(
            "rip {:#x}, rflags {:#x} (interrupts {}), mp state {}; {} exits{last}",
            self.rip,
            self.rflags,
            if self.rflags & X86_EFLAGS_IF != 0 {
                "on"
            } else {
                "off"
            },
            mp_state_name(self.mp_state),
            self.exits.exits,
        )
    }
}

/// The board where the controller asks and the vCPUs answer.
pub struct VcpuReports {
    /// The request being answered (0: none open).
    request: AtomicU64,
    /// The number of the last request (each gets a new one, so a late answer to an earlier
    /// request is never taken for the current one).
    last_request: AtomicU64,
    answers: Mutex<Vec<Option<(u64, VcpuReport)>>>,
}

impl VcpuReports {
    pub fn new(vcpus: usize) -> VcpuReports {
        VcpuReports {
            request: AtomicU64::new(0),
            last_request: AtomicU64::new(0),
            answers: Mutex::new(vec![None; vcpus]),
        }
    }

    /// The request a vCPU should answer, if one is open.
    pub fn wanted(&self) -> Option<u64> {
        match self.request.load(Ordering::Acquire) {
            0 => None,
            r => Some(r),
        }
    }

    /// VCPU `id` answers request `request`.
    pub fn answer(&self, id: u32, request: u64, report: VcpuReport) {
        if let Some(slot) = lock(&self.answers).get_mut(id as usize) {
            *slot = Some((request, report));
        }
    }

    /// Asks every vCPU (kicking them with `kick` until they answer, at most `wait`) and
    /// returns one line per vCPU, `vCPU <id>: ...`.
    pub fn collect(&self, kick: &dyn Fn(), wait: Duration) -> Vec<String> {
        let request = self.last_request.fetch_add(1, Ordering::AcqRel) + 1;
        self.request.store(request, Ordering::Release);
        let deadline = Instant::now() + wait;
        let answered = |answers: &[Option<(u64, VcpuReport)>]| {
            answers
                .iter()
                .all(|a| matches!(a, Some((r, _)) if *r == request))
        };
        loop {
            if answered(&lock(&self.answers)) || Instant::now() >= deadline {
                break;
            }
            kick();
            std::thread::sleep(Duration::from_millis(5));
        }
        self.request.store(0, Ordering::Release);
        let now = Instant::now();
        lock(&self.answers)
            .iter()
            .enumerate()
            .map(|(id, a)| match a {
                Some((r, report)) if *r == request => {
                    format!("vCPU {id}: {}", report.describe(now))
                }
                _ => format!(
                    "vCPU {id}: no answer within {} ms (busy in a device's exit handler, or parked)",
                    wait.as_millis()
                ),
            })
            .collect()
    }

    /// Asks every vCPU what it is doing and prints one line each on stderr.
    pub fn print(&self, kick: &dyn Fn()) {
        for line in self.collect(kick, PRINT_WAIT) {
            // (Not eprintln!: it panics when stderr cannot be written.)
            let _ = writeln!(std::io::stderr(), "thinvm: {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn report(exits: u64) -> VcpuReport {
        let mut log = ExitLog::new();
        for _ in 0..exits {
            log.record(LastExit {
                kind: "mmio write",
                addr: 0xd000_0050,
            });
        }
        log.kicked(Instant::now());
        VcpuReport {
            rip: 0x20_1234,
            rflags: 0x202,
            mp_state: KVM_MP_STATE_HALTED,
            exits: log,
        }
    }

    /// The last exit is placed after the kick before the one that first saw it, and a kick
    /// with no new exit moves nothing.
    #[test]
    fn the_last_exit_is_bounded_by_the_kicks() {
        let mut log = ExitLog::new();
        let t0 = log.kicked_at;
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t0 + Duration::from_secs(2);
        log.kicked(t1);
        assert_eq!(log.last_after, None);
        log.record(LastExit {
            kind: "port write",
            addr: 0x3f8,
        });
        log.kicked(t2);
        assert_eq!(log.last_after, Some(t1));
        log.kicked(t2 + Duration::from_secs(1));
        assert_eq!(log.last_after, Some(t1));
        let r = VcpuReport {
            rip: 0,
            rflags: 0,
            mp_state: KVM_MP_STATE_RUNNABLE,
            exits: log,
        };
        assert!(
            r.describe(t1 + Duration::from_millis(3500))
                .ends_with("; 1 exits, the last (port write 0x3f8) less than 3.5 s ago"),
            "{}",
            r.describe(t1 + Duration::from_millis(3500))
        );
    }

    #[test]
    fn every_vcpu_gets_a_line_and_a_silent_one_says_so() {
        let board = Arc::new(VcpuReports::new(2));
        let b = board.clone();
        // vCPU 0 answers whenever kicked; vCPU 1 never does.
        let kick = move || {
            if let Some(r) = b.wanted() {
                b.answer(0, r, report(7));
            }
        };
        let lines = board.collect(&kick, Duration::from_millis(50));
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("vCPU 0: rip 0x201234, rflags 0x202 (interrupts on), mp state halted; 7 exits, the last (mmio write 0xd0000050)"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("vCPU 1: no answer within 50 ms"),
            "{}",
            lines[1]
        );
        assert_eq!(board.wanted(), None);
    }

    #[test]
    fn an_answer_to_an_earlier_request_is_not_taken_for_a_new_one() {
        let board = VcpuReports::new(1);
        let lines = board.collect(&|| {}, Duration::from_millis(10));
        assert!(lines[0].contains("no answer"), "{}", lines[0]);
        // A late answer to request 1 arrives after it closed.
        board.answer(0, 1, report(1));
        let lines = board.collect(&|| {}, Duration::from_millis(10));
        assert!(lines[0].contains("no answer"), "{}", lines[0]);
    }
}
