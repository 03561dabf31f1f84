//! Pausing a disk's worker (for a snapshot): the device asks; the worker stops taking chains
//! from every queue, waits until each request in flight on any queue has completed and its
//! used-ring entry is written ([`super::engine::Engine::settle`]), then parks, reports where
//! each queue it serves stands, and runs image jobs for the VMM while parked (flush, or
//! switching to a new overlay: the frozen layer of a snapshot). Writes held for lack of host
//! space are requests not answered: the worker then refuses to park.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use block::DiskImage;

use crate::virtio::{PauseError, QueueProgress};

/// Work done on the worker's image while it is parked.
pub type ImageJob = Box<dyn FnOnce(&mut Box<dyn DiskImage>) + Send>;

#[derive(Default)]
struct GateState {
    requested: bool,
    /// Set by the worker once parked: where each queue it serves stands (empty: no
    /// activation).
    parked: Option<Vec<QueueProgress>>,
    refused: Option<PauseError>,
    jobs: VecDeque<ImageJob>,
    jobs_done: u64,
}

/// Shared by the device and its worker.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Device side: asks for a pause (the caller wakes the worker) and waits up to `wait`.
    pub fn request(
        &self,
        wake: impl Fn(),
        wait: Duration,
    ) -> Result<Vec<QueueProgress>, PauseError> {
        {
            let mut g = self.lock();
            g.requested = true;
            g.parked = None;
            g.refused = None;
        }
        wake();
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        loop {
            if let Some(p) = &g.parked {
                return Ok(p.clone());
            }
            if let Some(why) = g.refused.take() {
                g.requested = false;
                return Err(why);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                g.requested = false;
                return Err(PauseError::Timeout(wait));
            }
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Device side: lets the worker go on.
    pub fn release(&self) {
        let mut g = self.lock();
        g.requested = false;
        g.parked = None;
        self.cv.notify_all();
    }

    /// VMM side: runs `job` on the parked worker's image and waits for it.
    pub fn run_job(&self, job: ImageJob, wait: Duration) -> Result<(), PauseError> {
        let mut g = self.lock();
        if g.parked.is_none() {
            return Err(PauseError::NotPaused);
        }
        let ticket = g.jobs_done + g.jobs.len() as u64 + 1;
        g.jobs.push_back(job);
        self.cv.notify_all();
        let deadline = Instant::now() + wait;
        while g.jobs_done < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PauseError::Timeout(wait));
            }
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        Ok(())
    }

    /// Worker side: whether a pause is asked for.
    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Worker side: cannot park now (why).
    pub fn refuse(&self, why: PauseError) {
        let mut g = self.lock();
        g.refused = Some(why);
        self.cv.notify_all();
    }

    /// Worker side: parks until released, running image jobs meanwhile.
    pub fn park(&self, progress: Vec<QueueProgress>, image: &mut Box<dyn DiskImage>) {
        let mut g = self.lock();
        if !g.requested {
            return;
        }
        g.parked = Some(progress);
        self.cv.notify_all();
        while g.requested {
            if let Some(job) = g.jobs.pop_front() {
                drop(g);
                job(image);
                g = self.lock();
                g.jobs_done += 1;
                self.cv.notify_all();
                continue;
            }
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }
}
