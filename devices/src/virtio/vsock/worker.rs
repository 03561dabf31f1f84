//! The vsock device's thread: one epoll loop over the three queues' notifications, the VM's
//! Unix socket and every connection's stream, and the device's commands (activate, reset,
//! pause, resume, shutdown). The thread lives as long as the device, so it is confined by its
//! own seccomp filter from the start; host I/O never blocks (every socket is non-blocking).
//!
//! Each round serves the transmit queue (at most a queue's worth of chains: parse, hand to
//! the muxer, return the chain), then fills receive buffers with what the muxer owes the
//! guest (at most a queue's worth), then the event queue, and raises the interrupt once.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::header::EVENT_TRANSPORT_RESET;
use super::muxer::Muxer;
use super::packet::{RxBuffer, TxPacket};
use crate::virtio::{ratelimited_warn, ActiveQueue, Interrupt, QueueProgress, INT_VRING};

const TOKEN_CONTROL: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
/// How often deadlines are checked while some exist.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// How long host connections wait, after a restored device's activation, for the driver to
/// show it handled the transport-reset event (Linux gives the event buffer back at once;
/// a driver that never does gets the host's connections after this).
const RESET_HANDLED_WAIT: Duration = Duration::from_secs(2);

/// What the device asks of its thread.
pub enum Command {
    /// The driver is ready: serve these queues.
    Activate(Activation),
    /// The driver reset the device: drop every connection and hand back the queues'
    /// notification eventfds.
    Reset(Sender<Vec<EventFd>>),
    /// Stop touching guest memory and the queues until [`Command::Resume`] (answered once
    /// stopped, with where the queues stand when active).
    Pause(Sender<Vec<QueueProgress>>),
    Resume,
    /// The VM is ending.
    Shutdown,
}

/// The queues (rx, tx, event) and what serving them needs.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub event: ActiveQueue,
    /// Send the driver a transport-reset event first (the device was restored from a
    /// snapshot: the guest's connections are gone).
    pub announce_reset: bool,
}

/// The thread's state.
pub struct Worker {
    pub muxer: Muxer,
    pub epoll: Epoll,
    pub commands: Receiver<Command>,
    pub wake: EventFd,
    pub guest_cid: u64,
}

struct Active {
    a: Activation,
    reset_event_owed: bool,
    /// A transport reset not yet handled by the driver: host connections wait meanwhile.
    reset_unhandled: Option<ResetWait>,
}

/// The wait for the driver to handle a transport-reset event. A driver has handled it when
/// it gives the event queue a buffer after the device used one for the event (Linux's
/// `virtio_transport_event_work` resets its connections, then refills and notifies): a
/// host connection asked for before that would be accepted, then reset by the guest without
/// a word to the device (the host would wait for an answer that never comes).
struct ResetWait {
    /// The event queue's available index when the event was put in it (none: not yet).
    avail_at_event: Option<u16>,
    give_up: Instant,
}

impl Active {
    fn new(a: Activation, muxer: &mut Muxer) -> Active {
        let owed = a.announce_reset;
        let reset_unhandled = owed.then(|| {
            muxer.hold_host_connects();
            ResetWait {
                avail_at_event: None,
                give_up: Instant::now() + RESET_HANDLED_WAIT,
            }
        });
        Active {
            a,
            reset_event_owed: owed,
            reset_unhandled,
        }
    }
}

impl Worker {
    /// The thread body.
    pub fn run(mut self) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            std::os::unix::io::AsRawFd::as_raw_fd(&self.wake),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        ) {
            tracing::error!("virtio-vsock: epoll: {e}");
            return;
        }
        let mut active: Option<Active> = None;
        let mut events = vec![EpollEvent::default(); 64];
        let mut more = true;
        let mut last_sweep = Instant::now();
        loop {
            let reset_wait = active
                .as_ref()
                .and_then(|act| act.reset_unhandled.as_ref())
                .map(|w| w.give_up.saturating_duration_since(Instant::now()));
            let timeout = if more {
                0
            } else if let Some(d) = reset_wait {
                // (At least 1 ms: the give-up time is checked when the wait ends.)
                i32::try_from(d.min(SWEEP_EVERY).as_millis())
                    .unwrap_or(i32::MAX)
                    .max(1)
            } else if self.muxer.has_deadlines() {
                i32::try_from(SWEEP_EVERY.as_millis()).unwrap_or(i32::MAX)
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait: {e}; the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_CONTROL => {
                        let _ = self.wake.read();
                        if !self.commands(&mut active) {
                            self.muxer.reset();
                            return;
                        }
                    }
                    TOKEN_RX | TOKEN_TX | TOKEN_EVENT => {
                        if let Some(act) = &active {
                            let q = match ev.data() {
                                TOKEN_RX => &act.a.rx,
                                TOKEN_TX => &act.a.tx,
                                _ => &act.a.event,
                            };
                            let _ = q.notify.read();
                        }
                    }
                    TOKEN_LISTENER => self.muxer.on_listener(&self.epoll),
                    token => self.muxer.on_stream_event(token, ev.event_set()),
                }
            }
            more = match &mut active {
                Some(act) => self.serve(act),
                None => false,
            };
            let now = Instant::now();
            if now.duration_since(last_sweep) >= SWEEP_EVERY {
                last_sweep = now;
                self.muxer.sweep(now);
            }
        }
    }

    /// Handles the queued commands; false when the thread must end.
    fn commands(&mut self, active: &mut Option<Active>) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Activate(a) => {
                    self.deactivate(active);
                    if let Err(e) = self.watch(&a) {
                        tracing::error!("virtio-vsock: cannot watch the queues: {e}");
                        continue;
                    }
                    *active = Some(Active::new(a, &mut self.muxer));
                }
                Command::Reset(reply) => {
                    let fds = self.deactivate(active);
                    let _ = reply.send(fds);
                }
                Command::Pause(reply) => {
                    let _ = reply.send(progress(active));
                    if !self.paused(active) {
                        return false;
                    }
                }
                Command::Resume => {}
                Command::Shutdown => return false,
            }
        }
        true
    }

    /// Waits, touching nothing, until resumed; false when the thread must end. Events that
    /// arrive meanwhile stay in the epoll set for afterwards.
    fn paused(&mut self, active: &mut Option<Active>) -> bool {
        loop {
            match self.commands.recv() {
                Ok(Command::Resume) => return true,
                Ok(Command::Reset(reply)) => {
                    let fds = self.deactivate(active);
                    let _ = reply.send(fds);
                }
                Ok(Command::Pause(reply)) => {
                    let _ = reply.send(progress(active));
                }
                Ok(Command::Activate(a)) => {
                    // Not expected while paused; serve it once resumed.
                    self.deactivate(active);
                    if self.watch(&a).is_ok() {
                        *active = Some(Active::new(a, &mut self.muxer));
                    }
                }
                Ok(Command::Shutdown) | Err(_) => return false,
            }
        }
    }

    fn watch(&self, a: &Activation) -> std::io::Result<()> {
        use std::os::unix::io::AsRawFd;
        for (fd, token) in [
            (a.rx.notify.as_raw_fd(), TOKEN_RX),
            (a.tx.notify.as_raw_fd(), TOKEN_TX),
            (a.event.notify.as_raw_fd(), TOKEN_EVENT),
            (self.muxer.listener_fd(), TOKEN_LISTENER),
        ] {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(())
    }

    /// Ends the activation: connections dropped, queues given back (their eventfds).
    fn deactivate(&mut self, active: &mut Option<Active>) -> Vec<EventFd> {
        use std::os::unix::io::AsRawFd;
        self.muxer.reset();
        let Some(act) = active.take() else {
            return Vec::new();
        };
        for fd in [
            act.a.rx.notify.as_raw_fd(),
            act.a.tx.notify.as_raw_fd(),
            act.a.event.notify.as_raw_fd(),
            self.muxer.listener_fd(),
        ] {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        vec![act.a.rx.notify, act.a.tx.notify, act.a.event.notify]
    }

    /// One round over the queues; true when work was left for another round.
    fn serve(&mut self, act: &mut Active) -> bool {
        self.check_reset_handled(act);
        let (tx_used, tx_more) = self.serve_tx(&mut act.a);
        let (rx_used, rx_more) = self.serve_rx(&mut act.a);
        let ev_used = if act.reset_event_owed {
            let sent = send_reset_event(&mut act.a);
            act.reset_event_owed = !sent;
            if sent {
                if let Some(w) = &mut act.reset_unhandled {
                    w.avail_at_event = act
                        .a
                        .event
                        .queue
                        .avail_idx(&act.a.mem, std::sync::atomic::Ordering::Acquire)
                        .ok()
                        .map(|i| i.0);
                }
            }
            sent
        } else {
            false
        };
        let a = &mut act.a;
        let mut raise = false;
        for (used, q) in [
            (tx_used, &mut a.tx.queue),
            (rx_used, &mut a.rx.queue),
            (ev_used, &mut a.event.queue),
        ] {
            if used {
                raise |= q.needs_notification(&a.mem).unwrap_or(true);
            }
        }
        if raise {
            a.interrupt.trigger(INT_VRING);
        }
        tx_more || rx_more
    }

    /// Lets host connections through once the driver handled the transport reset (or
    /// the wait for it ended).
    fn check_reset_handled(&mut self, act: &mut Active) {
        let Some(w) = &act.reset_unhandled else {
            return;
        };
        let handled = w.avail_at_event.is_some_and(|at| {
            act.a
                .event
                .queue
                .avail_idx(&act.a.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|now| now.0 != at)
        });
        if !handled && Instant::now() < w.give_up {
            return;
        }
        if !handled {
            tracing::debug!(
                "virtio-vsock: the driver did not show it handled the transport reset; host connections go ahead"
            );
        }
        act.reset_unhandled = None;
        self.muxer.release_host_connects();
    }

    /// Takes the guest's packets: (any chain used, chains left).
    fn serve_tx(&mut self, a: &mut Activation) -> (bool, bool) {
        let mem = &a.mem;
        let q = &mut a.tx.queue;
        let budget = q.size();
        let mut done = 0u16;
        let mut rearmed = false;
        let _ = q.disable_notification(mem);
        loop {
            if done == budget {
                return (done > 0, true);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Re-arm; chains that arrived meanwhile are taken now (once: a ring whose
                // index is broken would say "more" forever).
                if !rearmed && matches!(q.enable_notification(mem), Ok(true)) {
                    rearmed = true;
                    continue;
                }
                return (done > 0, false);
            };
            rearmed = false;
            let head = chain.head_index();
            match TxPacket::parse(chain, mem) {
                Ok(pkt) => self.muxer.on_packet(&pkt, mem, &self.epoll),
                Err(e) => ratelimited_warn(&format!("virtio-vsock: transmit chain dropped: {e}")),
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                ratelimited_warn(&format!("virtio-vsock: transmit queue: {e}"));
            }
            done += 1;
        }
    }

    /// Fills receive buffers: (any chain used, packets left for buffers not yet given).
    fn serve_rx(&mut self, a: &mut Activation) -> (bool, bool) {
        let mem = &a.mem;
        let q = &mut a.rx.queue;
        let budget = q.size();
        let mut done = 0u16;
        let mut used = false;
        while self.muxer.has_rx() {
            if done == budget {
                return (used, true);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffer: the driver's next notification brings more.
                return (used, false);
            };
            let head = chain.head_index();
            done += 1;
            let len = match RxBuffer::parse(chain, mem) {
                Ok(buf) => match self.muxer.fill_rx(&buf, mem) {
                    Some(len) => len,
                    None => {
                        // Nothing after all: the buffer goes back unused.
                        q.go_to_previous_position();
                        return (used, false);
                    }
                },
                Err(e) => {
                    ratelimited_warn(&format!("virtio-vsock: receive buffer dropped: {e}"));
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                ratelimited_warn(&format!("virtio-vsock: receive queue: {e}"));
            }
            used = true;
        }
        (used, false)
    }
}

/// Where the queues stand (rx, tx, event), when active. Every chain the device took is
/// answered by then: transmit chains at once, receive chains as soon as filled.
fn progress(active: &Option<Active>) -> Vec<QueueProgress> {
    match active {
        None => Vec::new(),
        Some(act) => [&act.a.rx.queue, &act.a.tx.queue, &act.a.event.queue]
            .iter()
            .map(|q| QueueProgress {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect(),
    }
}

/// Puts a transport-reset event in the event queue; false when the driver gave no buffer.
fn send_reset_event(a: &mut Activation) -> bool {
    let mem = &a.mem;
    let q = &mut a.event.queue;
    for _ in 0..q.size() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let first = chain
            .clone()
            .next()
            .filter(|d| d.is_write_only() && d.len() >= 4);
        let len = match first {
            Some(d)
                if mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok() =>
            {
                4
            }
            _ => {
                ratelimited_warn("virtio-vsock: unusable event buffer dropped");
                0
            }
        };
        let _ = q.add_used(mem, head, len);
        if len == 4 {
            return true;
        }
    }
    false
}
