//! The executor: many guest requests in flight on one image, each completed as soon as its
//! data I/O ends.
//!
//! A request is planned by the image ([`crate::disk::DiskImage::plan_read`] /
//! [`crate::disk::DiskImage::plan_write`]: metadata decided on this thread), its data operations go
//! to an [`Engine`] stage by stage, and when the last one ends the image applies the plan's
//! metadata actions ([`crate::disk::DiskImage::finish`]) and the request is complete. Requests
//! stay ordered where it matters:
//! * a request waits while an earlier one that overlaps it in lock units (the cluster, at
//!   least a 4 KiB block) is in flight or waiting, when either of them writes: metadata
//!   decisions (allocation, copy on write, zeroing) are taken on what the earlier write left,
//!   never beside it, and a read sees the writes submitted before it; reads beside reads, and
//!   requests on different clusters, run side by side;
//! * a host cluster a write released is freed only once nothing is in flight
//!   ([`crate::disk::DiskImage::idle`]), so no read or write in flight ever lands in a cluster
//!   given to someone else;
//! * discard and write-zeroes wait until nothing is in flight and nothing starts beside
//!   them (they change metadata over large ranges and may commit frees);
//! * a flush makes the requests completed so far durable, without waiting for those in
//!   flight;
//! * when the image wants deferred work done (frees past their threshold), no new request
//!   starts until the pipeline is empty, then the work runs.

use std::collections::VecDeque;
use std::os::unix::io::RawFd;

use crate::cast::usize_from;
use crate::engine::{Completion, Engine};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;
use crate::plan::Plan;

/// What the pipeline needs of an image: the [`crate::disk::DiskImage`] methods it calls, with the
/// same meaning. Every `DiskImage` is one (the impl is next to that trait), so the pipeline
/// depends on this interface alone.
pub trait PlanningImage {
    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan>;
    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan>;
    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()>;
    fn lock_unit(&self) -> u64;
    fn needs_drain(&self) -> bool;
    fn flush_completed(&mut self) -> Result<()>;
    fn idle(&mut self) -> Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
}

/// A request for the pipeline.
#[derive(Clone, Debug)]
pub enum IoRequest {
    /// Read `bufs` (their concatenation) from guest offset `offset`.
    Read {
        offset: u64,
        bufs: Vec<IoBuf>,
    },
    /// Write the concatenation of `bufs` at guest offset `offset`.
    Write {
        offset: u64,
        bufs: Vec<IoBuf>,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

impl IoRequest {
    fn is_barrier(&self) -> bool {
        matches!(
            self,
            IoRequest::Discard { .. } | IoRequest::WriteZeroes { .. }
        )
    }
}

/// A request whose plan is running.
struct Running {
    tag: u64,
    plan: Plan,
    stage: usize,
    outstanding: usize,
    error: Option<std::io::Error>,
    /// Lock units (first, last) of the request.
    units: (u64, u64),
    write: bool,
}

/// Requests in flight on one image.
pub struct Pipeline {
    engine: Box<dyn Engine>,
    running: Vec<Option<Running>>,
    free: Vec<usize>,
    busy: usize,
    waiting: VecDeque<(u64, IoRequest)>,
    done: Vec<(u64, Result<()>)>,
    reaped: Vec<Completion>,
}

impl Pipeline {
    pub fn new(engine: Box<dyn Engine>) -> Self {
        Pipeline {
            engine,
            running: Vec::new(),
            free: Vec::new(),
            busy: 0,
            waiting: VecDeque::new(),
            done: Vec::new(),
            reaped: Vec::new(),
        }
    }

    /// The engine's name.
    pub fn aio(&self) -> crate::engine::Aio {
        self.engine.aio()
    }

    /// Requests submitted and not yet returned by [`Pipeline::poll`].
    pub fn in_flight(&self) -> usize {
        self.busy + self.waiting.len() + self.done.len()
    }

    /// Requests whose data I/O is running.
    pub fn running(&self) -> usize {
        self.busy
    }

    /// Requests waiting for an earlier one (same cluster, barrier, deferred work).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The engine's completion eventfd (poll it, then call [`Pipeline::poll`]).
    pub fn notifier(&self) -> Option<RawFd> {
        self.engine.notifier()
    }

    /// Queues `req` and starts it if nothing it must wait for is in flight. Its completion
    /// is returned, with `tag`, by a later [`Pipeline::poll`].
    ///
    /// # Safety
    /// The memory of the request's buffers must stay valid (see [`IoBuf::new`]) until its
    /// completion has been returned by [`Pipeline::poll`].
    pub unsafe fn submit<I: PlanningImage + ?Sized>(
        &mut self,
        image: &mut I,
        tag: u64,
        req: IoRequest,
    ) {
        self.waiting.push_back((tag, req));
        self.start(image);
    }

    /// Hands the operations queued so far to the kernel (also done by [`Pipeline::poll`]).
    pub fn kick(&mut self) {
        if let Err(e) = self.engine.kick() {
            tracing::error!("I/O engine: {e}");
        }
    }

    /// Hands queued operations to the kernel, collects finished ones, moves requests on
    /// (next stage, metadata actions, requests that waited), and appends the completed
    /// requests to `out`. With `wait`, blocks until this call completed at least one request
    /// (if any is in flight); what `out` already held does not count.
    pub fn poll<I: PlanningImage + ?Sized>(
        &mut self,
        image: &mut I,
        wait: bool,
        out: &mut Vec<(u64, Result<()>)>,
    ) {
        // What `out` held before: blocking depends on what this call added, not on what the
        // caller already had (a caller collecting across calls would otherwise spin).
        let before = out.len();
        loop {
            // (Reaping hands queued operations to the kernel first, in the same call as a
            // wait.)
            let block =
                wait && self.done.is_empty() && out.len() == before && self.engine.in_flight() > 0;
            self.engine.reap(block, &mut self.reaped);
            let reaped = std::mem::take(&mut self.reaped);
            for (idx, r) in reaped {
                self.op_done(image, usize_from(idx), r);
            }
            self.start(image);
            // Operations queued meanwhile (next stages, requests that waited) go out now.
            if let Err(e) = self.engine.kick() {
                tracing::error!("I/O engine: {e}");
            }
            out.append(&mut self.done);
            // Waiting requests move only when running ones end.
            let progress_possible = self.engine.in_flight() > 0;
            if !wait || out.len() > before || !progress_possible {
                return;
            }
        }
    }

    /// Waits for everything in flight; appends the completions to `out`.
    pub fn drain<I: PlanningImage + ?Sized>(
        &mut self,
        image: &mut I,
        out: &mut Vec<(u64, Result<()>)>,
    ) {
        loop {
            self.poll(image, true, out);
            if self.busy == 0 && self.engine.in_flight() == 0 {
                self.start(image);
                out.append(&mut self.done);
                if self.busy == 0 && self.engine.in_flight() == 0 {
                    if !self.waiting.is_empty() {
                        // (Cannot happen: with nothing running, every waiting request can
                        // start. Never spin on it.)
                        tracing::error!("pipeline: {} requests cannot start", self.waiting.len());
                    }
                    return;
                }
            }
        }
    }

    fn op_done<I: PlanningImage + ?Sized>(
        &mut self,
        image: &mut I,
        idx: usize,
        r: std::io::Result<()>,
    ) {
        let Some(Some(run)) = self.running.get_mut(idx) else {
            return;
        };
        run.outstanding = run.outstanding.saturating_sub(1);
        if let Err(e) = r {
            run.error.get_or_insert(e);
        }
        if run.outstanding > 0 {
            return;
        }
        run.stage += 1;
        self.advance(image, idx);
    }

    /// Submits the operations of the running request's current stage (skipping empty
    /// stages), or finishes the request when no stage is left or one failed.
    fn advance<I: PlanningImage + ?Sized>(&mut self, image: &mut I, idx: usize) {
        let Some(Some(run)) = self.running.get_mut(idx) else {
            return;
        };
        while run.error.is_none() && run.stage < run.plan.stages.len() {
            let ops = std::mem::take(&mut run.plan.stages[run.stage]);
            if ops.is_empty() {
                run.stage += 1;
                continue;
            }
            run.outstanding = ops.len();
            for op in ops {
                // SAFETY: the operation's buffers are the request's (valid until its
                // completion is returned, `Pipeline::submit`'s contract) or bounce buffers
                // of its plan (kept in `run.plan` until the request completes, which is after
                // all its operations ended).
                unsafe { self.engine.submit(idx as u64, op) };
            }
            return;
        }
        let Some(run) = self.running[idx].take() else {
            return;
        };
        self.free.push(idx);
        self.busy -= 1;
        let data = match run.error {
            None => Ok(()),
            Some(e) => Err(Error::io("data I/O", e)),
        };
        let r = image.finish(run.plan, data);
        self.done.push((run.tag, r));
    }

    fn units<I: PlanningImage + ?Sized>(image: &I, offset: u64, len: u64) -> (u64, u64) {
        let unit = image.lock_unit().max(1);
        (offset / unit, (offset + len.max(1) - 1) / unit)
    }

    /// The lock units and kind (write?) of a read or write; `None` for the rest.
    fn extent<I: PlanningImage + ?Sized>(image: &I, req: &IoRequest) -> Option<((u64, u64), bool)> {
        match req {
            IoRequest::Read { offset, bufs } => Some((
                Self::units(image, *offset, crate::iobuf::total_len(bufs)),
                false,
            )),
            IoRequest::Write { offset, bufs } => Some((
                Self::units(image, *offset, crate::iobuf::total_len(bufs)),
                true,
            )),
            _ => None,
        }
    }

    /// Whether a request over `units` (a write if `write`) must wait for one running: they
    /// overlap and one of them writes.
    fn conflicts_running(&self, units: (u64, u64), write: bool) -> bool {
        self.running
            .iter()
            .flatten()
            .any(|r| (write || r.write) && r.units.0 <= units.1 && units.0 <= r.units.1)
    }

    /// Starts every waiting request that may start now, in order.
    fn start<I: PlanningImage + ?Sized>(&mut self, image: &mut I) {
        let mut i = 0;
        while i < self.waiting.len() {
            if image.needs_drain() {
                if self.busy > 0 {
                    return;
                }
                if let Err(e) = image.idle() {
                    tracing::warn!("deferred image work failed: {e}");
                }
                if image.needs_drain() {
                    // Nothing more it can do now: go on rather than stall.
                    tracing::warn!("deferred image work could not finish; continuing");
                }
            }
            if self.waiting[i].1.is_barrier() && (i > 0 || self.busy > 0) {
                return;
            }
            let can_start = match Self::extent(image, &self.waiting[i].1) {
                Some((units, write)) => {
                    !self.conflicts_running(units, write)
                        && !self.waiting.iter().take(i).any(|(_, w)| {
                            Self::extent(image, w).is_some_and(|(u, w_write)| {
                                (write || w_write) && u.0 <= units.1 && units.0 <= u.1
                            })
                        })
                }
                None => true,
            };
            if !can_start {
                i += 1;
                continue;
            }
            let Some((tag, req)) = self.waiting.remove(i) else {
                return;
            };
            self.begin(image, tag, req);
        }
    }

    /// Plans and starts one request (or runs it at once: flush, discard, write-zeroes).
    fn begin<I: PlanningImage + ?Sized>(&mut self, image: &mut I, tag: u64, req: IoRequest) {
        let extent = Self::extent(image, &req);
        let plan = match req {
            IoRequest::Flush => {
                let r = image.flush_completed();
                self.done.push((tag, r));
                return;
            }
            IoRequest::Discard { offset, len } => {
                let r = image.discard(offset, len);
                self.done.push((tag, r));
                return;
            }
            IoRequest::WriteZeroes { offset, len, unmap } => {
                let r = image.write_zeroes(offset, len, unmap);
                self.done.push((tag, r));
                return;
            }
            IoRequest::Read { offset, bufs } => image.plan_read(offset, &bufs),
            IoRequest::Write { offset, bufs } => image.plan_write(offset, &bufs),
        };
        let (units, write) = extent.unwrap_or(((0, 0), false));
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.done.push((tag, Err(e)));
                return;
            }
        };
        let run = Running {
            tag,
            plan,
            stage: 0,
            outstanding: 0,
            error: None,
            units,
            write,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.running[i] = Some(run);
                i
            }
            None => {
                self.running.push(Some(run));
                self.running.len() - 1
            }
        };
        self.busy += 1;
        self.advance(image, idx);
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Operations still in the engine write into buffers that may go away after this:
        // wait for them (their requests are abandoned, their plans dropped after).
        let mut out = Vec::new();
        while self.engine.in_flight() > 0 {
            let before = out.len();
            self.engine.reap(true, &mut out);
            if out.len() == before && self.engine.in_flight() > 0 {
                break;
            }
        }
    }
}
