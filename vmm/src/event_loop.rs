//! The VMM's event loop (event-manager): the guest's exit and reset events, console input,
//! signals (SIGINT, SIGTERM, SIGHUP, SIGUSR1 through a signalfd; SIGUSR1 prints what each vCPU
//! is doing and the disks' statistics and queue states), halt detection and the statistics
//! timer.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::error::{Result, VmmError};
use crate::lifecycle::{ExitReason, ExitState};
use crate::vstate::kvm_stats::IdleWatch;
use crate::vstate::report::VcpuReports;
use crate::vstate::vcpu::HALTED_IRQS_OFF;

/// Signals handled by the loop (blocked in every thread, read from a signalfd).
pub const HANDLED_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

/// Blocks the handled signals in the calling thread (call before spawning any thread, so
/// they all inherit the mask) and returns a signalfd for them.
pub fn signal_fd() -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the libc calls only write into it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in HANDLED_SIGNALS {
        // SAFETY: `set` is valid and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is valid; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::io(
            "block signals",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    // SAFETY: `set` is valid; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::io("signalfd", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Byte that starts the console escape sequence (Ctrl-A, as in QEMU).
const ESCAPE: u8 = 0x01;

/// Everything the loop watches.
pub struct Controller {
    exit: Arc<ExitState>,
    reset_evt: EventFd,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    stdin: Option<RawFd>,
    signals: OwnedFd,
    halt_timer: TimerFd,
    kick: Arc<dyn Fn() + Send + Sync>,
    vcpu_state: Arc<Vec<AtomicU8>>,
    halted_ticks: u32,
    /// Which vCPUs may be halted for good, from KVM's statistics (`None`: every vCPU is
    /// asked at every tick).
    idle_watch: Option<IdleWatch>,
    /// The published vCPU states are older than the last tick (no kick since): they do not
    /// count towards a halt until the vCPUs were asked again.
    states_stale: bool,
    stats: Box<dyn FnMut() + Send>,
    stats_timer: Option<TimerFd>,
    escape_pending: bool,
    pending_input: Vec<u8>,
    /// Parked vCPUs (a pause) are not halted: no halt detection meanwhile.
    pause: Arc<crate::vstate::vcpu::PauseControl>,
    /// What each vCPU is doing, printed on SIGUSR1.
    reports: Arc<VcpuReports>,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        exit: Arc<ExitState>,
        reset_evt: EventFd,
        serial: Option<Arc<Mutex<SerialDevice>>>,
        read_stdin: bool,
        signals: OwnedFd,
        kick: Arc<dyn Fn() + Send + Sync>,
        vcpu_state: Arc<Vec<AtomicU8>>,
        idle_watch: Option<IdleWatch>,
        stats: Box<dyn FnMut() + Send>,
        stats_interval: Option<Duration>,
        pause: Arc<crate::vstate::vcpu::PauseControl>,
        reports: Arc<VcpuReports>,
    ) -> Result<Self> {
        let mut halt_timer = TimerFd::new().map_err(|e| VmmError::io("timerfd", e.into()))?;
        let tick = Duration::from_millis(250);
        halt_timer
            .reset(tick, Some(tick))
            .map_err(|e| VmmError::io("timerfd", e.into()))?;
        let stats_timer = match stats_interval {
            None => None,
            Some(d) => {
                let mut t = TimerFd::new().map_err(|e| VmmError::io("timerfd", e.into()))?;
                t.reset(d, Some(d))
                    .map_err(|e| VmmError::io("timerfd", e.into()))?;
                Some(t)
            }
        };
        Ok(Controller {
            exit,
            reset_evt,
            serial,
            stdin: read_stdin.then(|| std::io::stdin().as_raw_fd()),
            signals,
            halt_timer,
            kick,
            vcpu_state,
            halted_ticks: 0,
            idle_watch,
            states_stale: true,
            stats,
            stats_timer,
            escape_pending: false,
            pending_input: Vec::new(),
            pause,
            reports,
        })
    }

    fn handle_stdin(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a valid buffer from an open descriptor.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        let Ok(len @ 1..) = usize::try_from(n) else {
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                // EOF or error: stop watching stdin.
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                self.stdin = None;
            }
            return;
        };
        for &b in &buf[..len] {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    b'x' | b'X' => {
                        self.exit.set(ExitReason::UserQuit);
                        return;
                    }
                    ESCAPE => self.pending_input.push(ESCAPE),
                    _ => {
                        self.pending_input.push(ESCAPE);
                        self.pending_input.push(b);
                    }
                }
            } else if b == ESCAPE {
                self.escape_pending = true;
            } else {
                self.pending_input.push(b);
            }
        }
        self.flush_input();
    }

    fn flush_input(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        if let Some(serial) = &self.serial {
            let mut s = crate::sync::lock(serial);
            let n = s.enqueue_input(&self.pending_input);
            self.pending_input.drain(..n);
        } else {
            self.pending_input.clear();
        }
        // Bound what a fast typist (or a pipe) can queue while the guest does not read.
        if self.pending_input.len() > 64 << 10 {
            self.pending_input.clear();
        }
    }

    fn handle_signals(&mut self) {
        loop {
            // SAFETY: signalfd_siginfo is plain data filled by read(2).
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading into a valid buffer of the right size.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    &mut info as *mut _ as *mut libc::c_void,
                    size,
                )
            };
            if n != size as isize {
                return;
            }
            match info.ssi_signo as i32 {
                libc::SIGUSR1 => {
                    self.reports.print(&*self.kick);
                    (self.stats)();
                }
                s => self.exit.set(ExitReason::Signal(s)),
            }
        }
    }

    /// Halt detection: a guest whose vCPUs all sit in `hlt` with interrupts off (Linux's
    /// `halt` without ACPI) has ended. KVM keeps a halted vCPU inside `KVM_RUN`, so each vCPU
    /// is kicked out to look at its state; with KVM's statistics only when every vCPU waits
    /// in KVM and none left the guest since the last tick: a running guest is never
    /// interrupted (each kick costs every vCPU an exit to user space and back).
    fn handle_halt_tick(&mut self) {
        let _ = self.halt_timer.wait();
        if self.pause.is_paused() {
            self.halted_ticks = 0;
            self.states_stale = true;
            return;
        }
        if let Some(watch) = &mut self.idle_watch {
            if !watch.all_idle() {
                self.halted_ticks = 0;
                self.states_stale = true;
                self.flush_input();
                return;
            }
        }
        // The states were published after the previous kick (unless there was none since
        // the vCPUs last ran).
        let all_halted = !self.states_stale
            && self
                .vcpu_state
                .iter()
                .all(|s| s.load(Ordering::Acquire) == HALTED_IRQS_OFF);
        self.states_stale = false;
        if all_halted {
            self.halted_ticks += 1;
            if self.halted_ticks >= 2 {
                self.exit.set(ExitReason::Poweroff);
                return;
            }
        } else {
            self.halted_ticks = 0;
        }
        tracing::debug!("halt detection: kicking the vCPUs to look at their state");
        (self.kick)();
        // Console input the guest could not take yet.
        self.flush_input();
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: RawFd| {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.exit.evt.as_raw_fd());
        add(self.reset_evt.as_raw_fd());
        add(self.signals.as_raw_fd());
        add(self.halt_timer.as_raw_fd());
        if let Some(t) = &self.stats_timer {
            add(t.as_raw_fd());
        }
        if let Some(fd) = self.stdin {
            // A regular file or /dev/null cannot be polled: no console input then.
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::debug!("console input not watched: {e:?}");
                self.stdin = None;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.evt.as_raw_fd() {
            let _ = self.exit.evt.read();
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.exit.set(ExitReason::Reset);
        } else if fd == self.signals.as_raw_fd() {
            self.handle_signals();
        } else if fd == self.halt_timer.as_raw_fd() {
            self.handle_halt_tick();
        } else if self.stats_timer.as_ref().map(|t| t.as_raw_fd()) == Some(fd) {
            if let Some(t) = &mut self.stats_timer {
                let _ = t.wait();
            }
            (self.stats)();
        } else if Some(fd) == self.stdin {
            if events.event_set().contains(EventSet::HANG_UP)
                && !events.event_set().contains(EventSet::IN)
            {
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                self.stdin = None;
                return;
            }
            self.handle_stdin(fd, ops);
        }
    }
}
