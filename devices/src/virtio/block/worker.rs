//! The per-disk worker thread: block I/O runs here, off the vCPU threads. The thread lives
//! as long as the device (so it can be confined by its own seccomp filter from the start)
//! and owns the image. While an activation lasts it sleeps on the queue's notification
//! eventfd (an ioeventfd KVM signals directly) and the I/O engine's completion eventfd,
//! serves the queue in bounded passes ([`Engine::pass`]) that start requests, answers each
//! request when its I/O completes ([`Engine::complete`]), retries writes held for lack of
//! host space, and lets the image finish deferred work (committing freed clusters,
//! shrinking the file) once the guest goes quiet and nothing is in flight.
//!
//! An activation ends as soon as the device moves the shared epoch past it (reset,
//! shutdown): the worker looks at the epoch between passes, between requests and between
//! the chunks of a large request, stops touching the queue and guest memory, and reports
//! the end (with the notification eventfd) so a new activation can begin.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::engine::Engine;
use super::pause::PauseGate;
use crate::virtio::{ratelimited_warn, Interrupt, PauseError, QueueProgress};

/// How long the guest must be quiet before deferred image work runs.
const IDLE_MS: i32 = 100;

/// Rounds an interrupt may wait for while the driver keeps adding requests.
const MAX_DEFERRED_ROUNDS: u32 = 2;

/// When the worker raises the interrupt for answers given: at the end of the round that gave
/// them, unless the driver is still adding requests (a queue had chains arrive during its
/// pass), when completions it is about to ask for may join it; but never more than
/// [`MAX_DEFERRED_ROUNDS`] rounds later, whatever the driver does.
#[derive(Default)]
struct SignalPacer {
    deferred: u32,
}

impl SignalPacer {
    /// Whether the answers owed are signalled at the top of this round.
    fn signal_now(&mut self, driver_adding: bool, owed: bool) -> bool {
        if driver_adding && owed && self.deferred < MAX_DEFERRED_ROUNDS {
            self.deferred += 1;
            false
        } else {
            self.deferred = 0;
            owed
        }
    }
}

/// Shared between the device and its worker: which activation may run.
pub struct Control {
    /// The current activation's number; moving it on ends the activation being served.
    pub epoch: AtomicU64,
    /// Written whenever `epoch` moves, to wake the worker.
    pub wake: EventFd,
    /// Pausing for a snapshot.
    pub pause: PauseGate,
}

/// Commands from the device to its worker thread.
pub enum Command {
    /// The driver is ready: process this queue until the epoch moves past `epoch`.
    Activate(Activation),
    /// The VM is ending: flush and exit.
    Shutdown,
    /// A pause was asked for while no activation was served (see [`PauseGate`]).
    Pause,
}

/// What the worker needs to serve a queue.
pub struct Activation {
    pub epoch: u64,
    /// The queues the driver made ready, with their notification eventfds.
    pub queues: Vec<Queue>,
    pub notify: Vec<EventFd>,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
}

/// An activation is over: the worker no longer touches its queue or guest memory.
pub struct Ended {
    pub epoch: u64,
    pub notify: Vec<EventFd>,
}

/// The worker: owns the image (in its engine) for the device's whole life.
pub struct Worker {
    pub engine: Engine,
    pub control: Arc<Control>,
}

impl Worker {
    /// The thread body: serves activations until told to shut down, then flushes.
    pub fn run(mut self, commands: Receiver<Command>, ended: Sender<Ended>) {
        while let Ok(cmd) = commands.recv() {
            match cmd {
                Command::Activate(mut a) => {
                    self.serve(&mut a);
                    self.engine.abandon();
                    let _ = ended.send(Ended {
                        epoch: a.epoch,
                        notify: a.notify,
                    });
                    // Deferred work after the queue is gone (no guest memory needed).
                    self.idle();
                }
                Command::Shutdown => break,
                Command::Pause => self
                    .control
                    .pause
                    .park(Vec::new(), &mut self.engine.disk.image),
            }
        }
        if let Err(e) = self.engine.disk.image.flush() {
            tracing::error!("virtio-blk: final flush failed: {e}");
        }
        self.publish_image_stats();
    }

    /// Serves the queue until the epoch moves on.
    fn serve(&mut self, a: &mut Activation) {
        let control = self.control.clone();
        let epoch = a.epoch;
        let stop = move || control.epoch.load(Ordering::Acquire) != epoch;
        // Chains the driver queued before DRIVER_OK are served at once.
        let nq = a.queues.len();
        let mut more = vec![true; nq];
        let mut idle_pending = false;
        let mut pacer = SignalPacer::default();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(nq + 2);
        loop {
            if stop() {
                return;
            }
            // One interrupt for everything the last rounds answered, on every queue; while the
            // driver keeps adding requests (a queue has more), a few more rounds join it
            // (a pause signals before it parks: what a snapshot saves has been signalled).
            if pacer.signal_now(more.iter().any(|&m| m), self.engine.unsignalled()) {
                self.engine
                    .signal_answers(&mut a.queues, &a.mem, &a.interrupt);
            }
            if self.control.pause.requested() {
                // Nothing new is taken from any queue; what is in flight completes first.
                if self.engine.held() == 0 && self.engine.in_flight() > 0 {
                    self.engine
                        .settle(&mut a.queues, &a.mem, &a.interrupt, &stop);
                    if stop() {
                        return;
                    }
                }
                if self.engine.held() > 0 {
                    self.control
                        .pause
                        .refuse(PauseError::WritesWaiting(self.engine.held()));
                } else if self.engine.in_flight() > 0 {
                    self.control
                        .pause
                        .refuse(PauseError::InFlight(self.engine.in_flight()));
                } else {
                    let at = a
                        .queues
                        .iter()
                        .map(|q| QueueProgress {
                            next_avail: virtio_queue::QueueT::next_avail(q),
                            next_used: virtio_queue::QueueT::next_used(q),
                        })
                        .collect();
                    // (A pause asked for after the round began: its answers are signalled.)
                    self.engine
                        .signal_answers(&mut a.queues, &a.mem, &a.interrupt);
                    self.control.pause.park(at, &mut self.engine.disk.image);
                    // Chains the driver queued meanwhile, on any queue.
                    more.iter_mut().for_each(|m| *m = true);
                    continue;
                }
            }
            let now = Instant::now();
            let timeout = if more.iter().any(|&m| m) {
                0
            } else if let Some(d) = self.engine.retry_in(now) {
                i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
            } else if idle_pending && self.engine.in_flight() == 0 {
                IDLE_MS
            } else {
                -1
            };
            let pollfd = |fd: i32| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            fds.clear();
            fds.extend(a.notify.iter().map(|e| pollfd(e.as_raw_fd())));
            fds.push(pollfd(self.control.wake.as_raw_fd()));
            // (A negative fd is ignored by poll.)
            fds.push(pollfd(self.engine.notifier().unwrap_or(-1)));
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("virtio-blk worker: poll failed; stopping");
                return;
            }
            if fds[nq].revents != 0 {
                let _ = self.control.wake.read();
                continue;
            }
            for ((fd, notify), m) in fds.iter().zip(&a.notify).zip(more.iter_mut()) {
                if fd.revents != 0 {
                    let _ = notify.read();
                    *m = true;
                }
            }
            if fds[nq + 1].revents != 0 {
                // Data I/O finished: answer what completed (room in the queues again).
                let answered = self
                    .engine
                    .complete(&mut a.queues, &a.mem, &a.interrupt, &stop);
                if answered > 0 {
                    more.iter_mut().for_each(|m| *m = true);
                }
                idle_pending = true;
            }
            if self
                .engine
                .retry_in(Instant::now())
                .is_some_and(|d| d.is_zero())
            {
                let answered = self.engine.retry_held_queues(&mut a.queues, &a.mem, &stop);
                // Room in the queues again: chains the driver queued meanwhile (perhaps
                // without notifying, while held writes filled a queue) get a pass.
                if answered > 0 {
                    more.iter_mut().for_each(|m| *m = true);
                }
                idle_pending = true;
            }
            let mut passed = false;
            for (i, m) in more.iter_mut().enumerate() {
                if *m {
                    let r = self
                        .engine
                        .pass_queue(&mut a.queues, i, &a.mem, &a.interrupt, &stop);
                    *m = r.more && !r.stopped;
                    idle_pending = true;
                    passed = true;
                }
            }
            if !passed && n == 0 && idle_pending && self.engine.in_flight() == 0 {
                self.idle();
                idle_pending = false;
            }
        }
    }

    /// Deferred image work, and fresh figures for the statistics.
    fn idle(&mut self) {
        if let Err(e) = self.engine.disk.image.idle() {
            ratelimited_warn(&format!("virtio-blk: deferred image work failed: {e}"));
        }
        self.publish_image_stats();
    }

    fn publish_image_stats(&self) {
        let image = &self.engine.disk.image;
        let usage = image.host_usage().unwrap_or_default();
        self.engine
            .disk
            .stats
            .set_image(image.reclaim_stats(), usage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_that_keeps_adding_cannot_hold_its_interrupt_back_longer_than_the_bound() {
        let mut p = SignalPacer::default();
        let mut since = 0;
        for round in 0..100 {
            if p.signal_now(true, true) {
                since = 0;
            } else {
                since += 1;
            }
            assert!(
                since <= MAX_DEFERRED_ROUNDS,
                "round {round}: {since} rounds held"
            );
        }
    }

    #[test]
    fn a_waiting_driver_is_signalled_in_the_round_that_answered_it() {
        let mut p = SignalPacer::default();
        assert!(!p.signal_now(true, true), "held while the driver adds");
        assert!(p.signal_now(false, true), "signalled once it stops adding");
        assert!(p.signal_now(false, true));
        assert!(!p.signal_now(false, false), "nothing owed, nothing raised");
        assert!(!p.signal_now(true, false));
    }
}
