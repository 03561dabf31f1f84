//! The thread-pool engine (`aio=threads`, QEMU's thread-pool AIO): operations run on the
//! crate's pool of I/O threads (`crate::parallel`), at most a set number at a time;
//! finished ones come back on a channel and wake an eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use super::api::{run_sync, Aio, Completion, DataOp, Engine};
use super::eventfd::{drain_eventfd, new_eventfd, signal};

/// Operations on the I/O threads.
pub struct ThreadEngine {
    max: usize,
    running: usize,
    /// Submitted, waiting for a free thread.
    backlog: VecDeque<(u64, DataOp)>,
    /// Finished at once on the calling thread (bounced O_DIRECT operations).
    ready: Vec<Completion>,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    event: Arc<OwnedFd>,
}

impl ThreadEngine {
    /// An engine running at most `max` operations at once.
    pub fn new(max: usize) -> io::Result<Self> {
        if crate::parallel::pool().is_none() {
            return Err(io::Error::other("cannot start the block I/O threads"));
        }
        let (tx, rx) = channel();
        Ok(ThreadEngine {
            max: max.clamp(1, crate::parallel::MAX_THREADS),
            running: 0,
            backlog: VecDeque::new(),
            ready: Vec::new(),
            tx,
            rx,
            event: Arc::new(new_eventfd()?),
        })
    }

    fn dispatch(&mut self) {
        let Some(pool) = crate::parallel::pool() else {
            // (Checked in `new`: the pool, once started, stays.)
            for (tag, op) in self.backlog.drain(..) {
                self.ready.push((tag, run_sync(&op)));
            }
            return;
        };
        while self.running < self.max {
            let Some((tag, op)) = self.backlog.pop_front() else {
                break;
            };
            self.running += 1;
            let tx = self.tx.clone();
            let event = self.event.clone();
            pool.spawn(move || {
                let r = run_sync(&op);
                let _ = tx.send((tag, r));
                signal(event.as_raw_fd());
            });
        }
    }
}

impl Engine for ThreadEngine {
    fn aio(&self) -> Aio {
        Aio::Threads
    }

    unsafe fn submit(&mut self, tag: u64, op: DataOp) {
        if op.needs_bounce() {
            // A read-modify-write of partial blocks: never two at once (see the module
            // header of `engine`).
            self.ready.push((tag, run_sync(&op)));
            signal(self.event.as_raw_fd());
            return;
        }
        self.backlog.push_back((tag, op));
        self.dispatch();
    }

    fn reap(&mut self, wait: bool, out: &mut Vec<Completion>) {
        drain_eventfd(self.event.as_raw_fd());
        let before = out.len();
        out.append(&mut self.ready);
        while let Ok(c) = self.rx.try_recv() {
            self.running -= 1;
            out.push(c);
        }
        if wait && self.running > 0 && out.len() == before {
            if let Ok(c) = self.rx.recv() {
                self.running -= 1;
                out.push(c);
            }
        }
        self.dispatch();
    }

    fn notifier(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.running + self.backlog.len() + self.ready.len()
    }
}
