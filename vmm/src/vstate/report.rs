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

use crate::sync::lock;

/// The exit a vCPU saw last (port or address where it has one).
#[derive(Clone, Copy, Debug)]
pub struct LastExit {
    pub kind: &'static str,
    pub addr: u64,
    pub at: Instant,
}

/// What a vCPU reports about itself.
#[derive(Clone, Copy, Debug)]
pub struct VcpuReport {
    pub rip: u64,
    pub rflags: u64,
    pub mp_state: u32,
    pub exits: u64,
    pub last_exit: Option<LastExit>,
}

const X86_EFLAGS_IF: u64 = 1 << 9;

/// How long the vCPUs have to answer when the reports are printed.
const PRINT_WAIT: Duration = Duration::from_secs(1);

fn mp_state_name(s: u32) -> &'static str {
    match s {
        0 => "runnable",
        1 => "uninitialized",
        2 => "init-received",
        3 => "halted",
        4 => "sipi-received",
        5 => "stopped",
        6 => "check-stop",
        7 => "operating",
        8 => "load",
        9 => "ap-reset-hold",
        10 => "suspended",
        _ => "unknown",
    }
}

impl VcpuReport {
    /// One line, e.g. `rip 0xffffffff81c4a2b6, rflags 0x246 (interrupts on), mp state halted;
    /// 1234 exits, the last (mmio write 0xd0000050) 0.4 s ago`.
    pub fn describe(&self, now: Instant) -> String {
        let last = match self.last_exit {
            Some(e) => format!(
                ", the last ({} {:#x}) {:.1} s ago",
                e.kind,
                e.addr,
                now.saturating_duration_since(e.at).as_secs_f64()
            ),
            None => String::new(),
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
            self.exits,
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
        VcpuReport {
            rip: 0x20_1234,
            rflags: 0x202,
            mp_state: 3,
            exits,
            last_exit: Some(LastExit {
                kind: "mmio write",
                addr: 0xd000_0050,
                at: Instant::now(),
            }),
        }
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
