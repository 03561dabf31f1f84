//! Serving a virtio-blk queue with many requests in flight: a pass pops at most the chains
//! the queue has room for, parses each into a [`Request`] and starts it on the image's
//! [`Pipeline`] (planned now, data I/O on the I/O engine; adjacent reads and writes merged,
//! see `merge`); each request is answered as soon
//! as its last step ends (used ring entry, then the interrupt, which EVENT_IDX may suppress
//! so interrupts stay few). Between pops, between steps and before starting anything, the
//! caller's `stop` is asked, so a reset or shutdown is never starved by a guest that keeps
//! the ring full; what one pass holds in memory is bounded by the queue size times the
//! descriptors one chain may have.
//!
//! Writes that fail because the host file system is full are held under
//! `werror=enospc` ([`WriteErrorPolicy::Enospc`]): not answered, retried one after another
//! with backoff until they succeed, while reads, flushes and the rest keep being served.
//! Writes that arrive meanwhile queue behind them. Requests in flight plus held never exceed
//! the queue size.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use block::engine::sync::SyncEngine;
use block::pipeline::{IoRequest, Pipeline};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::execute::{Disk, Failed, Next, Outcome, Progress};
use super::request::{self, Invalid, Limits, Request, RequestKind};
use super::stats::{BlockStats, QueueSnapshot};
use crate::virtio::ratelimited_warn;
use crate::virtio::{Interrupt, INT_VRING};

mod merge;

pub use super::execute::WriteErrorPolicy;

/// First retry of a held write, then doubling up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A request's answer: its queue, its head, where its status byte goes, the outcome.
type Answer = (usize, u16, GuestAddress, Outcome);

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Chains taken from the available ring.
    pub popped: usize,
    /// Chains answered (put in the used ring) during the pass.
    pub answered: usize,
    /// The pass stopped at its bound with chains possibly left: run another one.
    pub more: bool,
    /// `stop` said so: the activation is ending.
    pub stopped: bool,
}

/// Writes waiting for host space.
struct Hold {
    since: Instant,
    next_retry: Instant,
    delay: Duration,
    /// Requests held at the start, for the resume message.
    count: u64,
    /// A held request is being retried now.
    retrying: bool,
}

/// Times and counters of one queue, for the queue-state report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Activity {
    /// Requests started and answered since the activation began.
    pub started: u64,
    pub answered: u64,
    /// Interrupts raised (and suppressed by the driver's used_event).
    pub interrupts: u64,
    pub suppressed: u64,
    pub last_notify: Option<Instant>,
    pub last_completion: Option<Instant>,
}

/// Serves one virtio-blk queue (any number of activations in turn) over a [`Disk`].
pub struct Engine {
    pub disk: Disk,
    limits: Limits,
    /// A name for log lines (the disk's).
    name: String,
    pipeline: Pipeline,
    /// Requests started and not yet answered, by pipeline tag, with their queue's index.
    active: Vec<Option<(usize, Progress)>>,
    /// Per tag, the requests merged behind the one in `active` (same queue, same direction,
    /// the image read or write covering them all): answered with it.
    followers: Vec<Vec<Progress>>,
    /// Requests started and not yet answered, per queue.
    per_queue: Vec<usize>,
    free: Vec<usize>,
    n_active: usize,
    held: VecDeque<(usize, u16, Request)>,
    hold: Option<Hold>,
    /// First retry delay of held writes (doubling up to [`MAX_RETRY_DELAY`]).
    first_retry: Duration,
    completions: Vec<(u64, block::Result<()>)>,
    /// Passes in a row that found chains announced and could take none.
    unreadable_passes: u32,
    /// Answers put in the used rings and not yet signalled ([`Engine::signal_answers`]).
    unsignalled: bool,
    pub activity: Activity,
}

impl Engine {
    /// An engine whose data I/O runs synchronously on the calling thread.
    pub fn new(disk: Disk, limits: Limits, name: String) -> Self {
        Engine {
            disk,
            limits,
            name,
            pipeline: Pipeline::new(Box::new(SyncEngine::default())),
            active: Vec::new(),
            followers: Vec::new(),
            per_queue: Vec::new(),
            free: Vec::new(),
            n_active: 0,
            held: VecDeque::new(),
            hold: None,
            first_retry: FIRST_RETRY_DELAY,
            completions: Vec::new(),
            unreadable_passes: 0,
            unsignalled: false,
            activity: Activity::default(),
        }
    }

    /// Answers are waiting for [`Engine::signal_answers`].
    pub fn unsignalled(&self) -> bool {
        self.unsignalled
    }

    /// Raises the interrupt for the answers given since the last signal, unless the driver
    /// suppressed it on every queue (EVENT_IDX). [`Engine::pass_queue`], [`Engine::complete`]
    /// and [`Engine::retry_held_queues`] only record that answers are owed: the caller runs
    /// this once per round over every queue, so a round that completes I/O and serves
    /// several queues raises one interrupt, not one per queue and step (the queues of a
    /// virtio-mmio device share one interrupt line, and its handler looks at every queue).
    pub fn signal_answers(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) {
        if std::mem::take(&mut self.unsignalled) {
            self.raise(queues, mem, interrupt);
        }
    }

    /// Runs data I/O on `io` (io_uring, I/O threads) instead.
    pub fn with_io_engine(mut self, io: Box<dyn block::engine::Engine>) -> Self {
        self.pipeline = Pipeline::new(io);
        self
    }

    /// Sets the first retry delay of held writes (tests and fuzzing use a short one).
    pub fn with_first_retry(mut self, d: Duration) -> Self {
        self.first_retry = d;
        self
    }

    /// The I/O engine's name.
    pub fn aio(&self) -> block::engine::Aio {
        self.pipeline.aio()
    }

    /// Requests held for lack of host space.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Requests started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.n_active
    }

    /// Requests of the pipeline waiting for an earlier one (same cluster, barrier).
    pub fn waiting(&self) -> usize {
        self.pipeline.waiting()
    }

    /// The eventfd that becomes readable when data I/O completed ([`Engine::complete`]).
    pub fn notifier(&self) -> Option<RawFd> {
        self.pipeline.notifier()
    }

    /// How long until held writes should be retried (`None`: nothing to retry).
    pub fn retry_in(&self, now: Instant) -> Option<Duration> {
        self.hold
            .as_ref()
            .filter(|h| !h.retrying)
            .map(|h| h.next_retry.saturating_duration_since(now))
    }

    /// Ends the activation's requests: waits for the I/O in flight (its buffers are guest
    /// memory the driver gets back), answers nothing, forgets held requests (a reset driver
    /// does not expect them back).
    pub fn abandon(&mut self) {
        let mut out = Vec::new();
        self.pipeline.drain(self.disk.image.as_mut(), &mut out);
        self.active.clear();
        self.followers.clear();
        self.per_queue.clear();
        self.free.clear();
        self.n_active = 0;
        if !self.held.is_empty() {
            tracing::warn!(
                "virtio-blk {}: {} writes held for lack of host space dropped by a device reset or shutdown",
                self.name,
                self.held.len()
            );
        }
        self.held.clear();
        self.hold = None;
        self.unreadable_passes = 0;
        self.unsignalled = false;
        self.activity = Activity::default();
        self.publish();
        self.disk.stats.set_queue(None);
    }

    fn publish(&self) {
        let s = &self.disk.stats;
        s.held.store(self.held.len() as u64, Ordering::Relaxed);
        s.in_flight.store(self.n_active as u64, Ordering::Relaxed);
    }

    /// Records the queue's state for the queue-state report.
    pub fn publish_queue(&self, q: &Queue, interrupt: &Interrupt) {
        self.disk.stats.set_queue(Some(QueueSnapshot {
            size: q.size(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            event_idx: q.event_idx_enabled(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            in_flight: self.n_active,
            waiting: self.pipeline.waiting(),
            held: self.held.len(),
            interrupt_status: interrupt.status(),
            interrupts: self.activity.interrupts,
            suppressed: self.activity.suppressed,
            last_notify: self.activity.last_notify,
            last_completion: self.activity.last_completion,
            aio: self.pipeline.aio().name(),
        }));
    }

    /// A round of one pass over a device's only queue (see [`Engine::pass_queue`]), ending
    /// with the interrupt if answers are owed.
    pub fn pass(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> PassReport {
        let queues = std::slice::from_mut(q);
        let report = self.pass_queue(queues, 0, mem, interrupt, stop);
        self.signal_answers(queues, mem, interrupt);
        report
    }

    /// One pass over queue `qi` of `queues`: pops at most `queue size - held - in flight`
    /// chains, starts them and answers those already done (on any queue); the interrupt is
    /// owed until [`Engine::signal_answers`].
    pub fn pass_queue(
        &mut self,
        queues: &mut [Queue],
        qi: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> PassReport {
        let mut report = PassReport::default();
        if self.per_queue.len() < queues.len() {
            self.per_queue.resize(queues.len(), 0);
        }
        let Some(q) = queues.get_mut(qi) else {
            return report;
        };
        // An available index more than a queue ahead of the device names chains the driver
        // cannot have made available (virtio-queue refuses to pop any): a broken ring, left
        // alone until the driver notifies again, instead of a pass run over and over.
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if (idx - Wrapping(q.next_avail())).0 > q.size() => {
                ratelimited_warn(&format!(
                    "virtio-blk: available index {} is more than {} ahead of the device's {}: ring ignored until the next notification",
                    idx.0,
                    q.size(),
                    q.next_avail()
                ));
                return report;
            }
            Ok(_) => {}
            Err(e) => {
                ratelimited_warn(&format!("virtio-blk: queue: {e}"));
                return report;
            }
        }
        self.activity.last_notify = Some(Instant::now());
        let budget = usize::from(q.size()).saturating_sub(self.held.len() + self.per_queue[qi]);
        if let Err(e) = q.disable_notification(mem) {
            ratelimited_warn(&format!("virtio-blk: queue: {e}"));
        }
        let mut popped: VecDeque<(u16, Result<Request, Invalid>)> = VecDeque::with_capacity(budget);
        let mut drained = false;
        while popped.len() < budget {
            if stop() {
                report.stopped = true;
                return report;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                drained = true;
                break;
            };
            let head = chain.head_index();
            popped.push_back((head, request::parse(chain, mem, &self.limits)));
        }
        report.popped = popped.len();
        report.more = if drained {
            // Re-arm notifications; chains that arrived meanwhile make another pass.
            matches!(q.enable_notification(mem), Ok(true))
        } else {
            // At the bound (or nothing may be taken while held and in-flight requests fill
            // the queue: then their completions or retry timer wake the worker).
            budget > 0
        };
        let writes = popped
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r,
                    Ok(Request {
                        kind: RequestKind::Write { .. },
                        ..
                    })
                )
            })
            .count() as u64;
        if writes > 1 {
            BlockStats::add(&self.disk.stats.batched_writes, writes);
        }
        while let Some((head, parsed)) = popped.pop_front() {
            if stop() {
                report.stopped = true;
                break;
            }
            let req = match parsed {
                Ok(req) => req,
                Err(invalid) => {
                    self.answer_invalid(&mut queues[qi], mem, head, invalid);
                    report.answered += 1;
                    continue;
                }
            };
            if (self.hold.is_some() || !self.held.is_empty()) && req.kind.writes() {
                // Behind the held writes, in order.
                self.held.push_back((qi, head, req));
                continue;
            }
            // A read or write continued by the chains after it runs merged with them.
            let p = match self.start_merged(qi, Progress::new(head, req), &mut popped, mem) {
                Ok(done) => {
                    for done in done {
                        self.answer(queues, mem, done);
                        report.answered += 1;
                    }
                    continue;
                }
                Err(p) => p,
            };
            if let Some(done) = self.start(qi, p, mem) {
                self.answer(queues, mem, done);
                report.answered += 1;
            }
        }
        if !report.stopped {
            report.answered += self.process(queues, mem, stop);
        }
        if drained && report.more && report.popped == 0 {
            // Chains are announced but none could be taken: once, a chain that arrived
            // between the last look and re-arming notifications (the next pass takes it);
            // again and again, an available ring whose entries cannot be read (virtio-queue
            // then pops nothing): left alone until the next notification, not spun on.
            self.unreadable_passes += 1;
            if self.unreadable_passes > 2 {
                ratelimited_warn(
                    "virtio-blk: the available ring announces requests that cannot be read: ring ignored until the next notification",
                );
                report.more = false;
            }
        } else {
            self.unreadable_passes = 0;
        }
        if report.answered > 0 {
            self.unsignalled = true;
        }
        self.publish();
        self.publish_queue(&queues[qi], interrupt);
        report
    }

    /// Collects finished I/O and answers what completed (the worker calls it when the
    /// engine's notifier is readable; the interrupt is owed until
    /// [`Engine::signal_answers`]). Returns the requests answered.
    pub fn complete(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let answered = self.process(queues, mem, stop);
        if answered > 0 {
            self.unsignalled = true;
        }
        self.publish();
        if let Some(q) = queues.first() {
            self.publish_queue(q, interrupt);
        }
        answered
    }

    /// Waits until every request in flight on every queue has completed and been answered
    /// (its status written, its used-ring entry added, the interrupt raised if the driver
    /// wants one): what a pause needs before the queues' positions are saved. Takes nothing
    /// new from any queue. Stops early when `stop` says the activation is ending or a write
    /// is held for lack of host space (it will not complete by waiting). Returns the
    /// requests answered.
    pub fn settle(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let mut answered = 0;
        while self.n_active > 0 && self.held.is_empty() && !stop() {
            let mut done = std::mem::take(&mut self.completions);
            // Blocks until at least one request completes (its I/O is the host's, bounded).
            self.pipeline
                .poll(self.disk.image.as_mut(), true, &mut done);
            if done.is_empty() {
                // A blocking poll returns nothing only when no I/O is running that could
                // complete them (cannot happen; never spin: the pause is refused).
                self.completions = done;
                tracing::error!(
                    "virtio-blk {}: {} requests in flight, {} in the pipeline, none running",
                    self.name,
                    self.n_active,
                    self.pipeline.in_flight()
                );
                break;
            }
            for (tag, r) in done.drain(..) {
                // Tags are slot indices this engine gave out: one that is not is ignored.
                if let Ok(idx) = usize::try_from(tag) {
                    answered += self.step_done(queues, mem, idx, r, stop);
                }
            }
            self.completions = done;
        }
        // (What a pause saves must include the signal: raised now, with any still owed.)
        if answered > 0 {
            self.unsignalled = true;
        }
        self.signal_answers(queues, mem, interrupt);
        self.publish();
        answered
    }

    /// A round that retries the held writes of a device's only queue (see
    /// [`Engine::retry_held_queues`]), ending with the interrupt if answers are owed.
    pub fn retry_held(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let queues = std::slice::from_mut(q);
        let answered = self.retry_held_queues(queues, mem, stop);
        self.signal_answers(queues, mem, interrupt);
        answered
    }

    /// Retries the held writes (when their timer is due): the first one now, the next ones
    /// each when the one before succeeded (the interrupt is owed until
    /// [`Engine::signal_answers`]). Returns the requests answered.
    pub fn retry_held_queues(
        &mut self,
        q: &mut [Queue],
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let now = Instant::now();
        match &self.hold {
            Some(h) if h.next_retry <= now && !h.retrying => {}
            _ => return 0,
        }
        if stop() {
            return 0;
        }
        let mut answered = self.retry_next(q, mem);
        answered += self.process(q, mem, stop);
        if answered > 0 {
            self.unsignalled = true;
        }
        self.publish();
        answered
    }

    /// Starts the first held request (or ends the hold when none is left). Returns the
    /// requests answered at once.
    fn retry_next(&mut self, q: &mut [Queue], mem: &GuestMemoryMmap) -> usize {
        let Some((qi, head, req)) = self.held.pop_front() else {
            if let Some(h) = self.hold.take() {
                tracing::warn!(
                    "virtio-blk {}: host space available again; {} held writes completed after {:.1} s",
                    self.name,
                    h.count,
                    h.since.elapsed().as_secs_f64()
                );
            }
            return 0;
        };
        if let Some(h) = &mut self.hold {
            h.retrying = true;
        }
        let mut p = Progress::new(head, req);
        p.retry = true;
        match self.start(qi, p, mem) {
            Some(done) => {
                // (Answered at once: nothing to write, e.g. a bad guest buffer.)
                self.answer(q, mem, done);
                if let Some(h) = &mut self.hold {
                    h.retrying = false;
                }
                1 + self.retry_next(q, mem)
            }
            None => 0,
        }
    }

    /// Starts a request: its first step goes to the pipeline, or it is done at once.
    fn start(&mut self, qi: usize, mut p: Progress, mem: &GuestMemoryMmap) -> Option<Answer> {
        let io = match self.disk.next(&mut p, mem) {
            Next::Done(out) => return Some((qi, p.head, p.req.status, out)),
            Next::Submit(io) => io,
        };
        self.submit(qi, p, Vec::new(), io);
        None
    }

    /// Hands `io`, the next step of `p` (and of the requests merged behind it, `followers`), to
    /// the pipeline.
    fn submit(&mut self, qi: usize, p: Progress, followers: Vec<Progress>, io: IoRequest) {
        let n = 1 + followers.len();
        if self.per_queue.len() <= qi {
            self.per_queue.resize(qi + 1, 0);
        }
        self.per_queue[qi] += n;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.active.push(None);
                self.followers.push(Vec::new());
                self.active.len() - 1
            }
        };
        self.active[idx] = Some((qi, p));
        self.followers[idx] = followers;
        self.n_active += n;
        self.activity.started += n as u64;
        // SAFETY: the request's buffers are guest memory (kept mapped by the activation's
        // `mem`, which the worker holds until `abandon` has drained the pipeline) or the
        // bounce buffer in its `Progress`, kept in `active` until its completion is reaped.
        unsafe {
            self.pipeline
                .submit(self.disk.image.as_mut(), idx as u64, io)
        };
    }

    /// Reaps completions and moves their requests on; returns the requests answered.
    fn process(
        &mut self,
        q: &mut [Queue],
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let mut answered = 0;
        loop {
            let mut done = std::mem::take(&mut self.completions);
            self.pipeline
                .poll(self.disk.image.as_mut(), false, &mut done);
            if done.is_empty() {
                self.completions = done;
                return answered;
            }
            for (tag, r) in done.drain(..) {
                // Tags are slot indices this engine gave out: one that is not is ignored.
                if let Ok(idx) = usize::try_from(tag) {
                    answered += self.step_done(q, mem, idx, r, stop);
                }
            }
            self.completions = done;
        }
    }

    /// One step of request `idx` ended with `r`. Returns the requests answered (0 or more:
    /// a held request's success starts the next held one).
    fn step_done(
        &mut self,
        q: &mut [Queue],
        mem: &GuestMemoryMmap,
        idx: usize,
        r: block::Result<()>,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let Some((qi, mut p)) = self.active.get_mut(idx).and_then(|s| s.take()) else {
            return 0;
        };
        let followers = self
            .followers
            .get_mut(idx)
            .map(std::mem::take)
            .unwrap_or_default();
        if !followers.is_empty() {
            return self.merged_done(q, mem, idx, qi, p, followers, r, stop);
        }
        let next = match self.disk.step_done(&mut p, mem, r) {
            Ok(()) if stop() => {
                // The activation is ending: the request stays unanswered.
                self.active[idx] = Some((qi, p));
                return 0;
            }
            Ok(()) => self.disk.next(&mut p, mem),
            Err(Failed::Done(out)) => Next::Done(out),
            Err(Failed::NoSpace(e)) => {
                self.release(idx, qi, 1);
                let retried = p.retry;
                self.hold_request(qi, p, &e);
                if retried {
                    if let Some(h) = &mut self.hold {
                        h.retrying = false;
                        h.delay = (h.delay * 2).min(MAX_RETRY_DELAY);
                        h.next_retry = Instant::now() + h.delay;
                    }
                }
                return 0;
            }
        };
        match next {
            Next::Submit(io) => {
                self.active[idx] = Some((qi, p));
                // SAFETY: as in `start`.
                unsafe {
                    self.pipeline
                        .submit(self.disk.image.as_mut(), idx as u64, io)
                };
                0
            }
            Next::Done(out) => {
                self.release(idx, qi, 1);
                self.answer(q, mem, (qi, p.head, p.req.status, out));
                let mut answered = 1;
                if p.retry {
                    if let Some(h) = &mut self.hold {
                        h.retrying = false;
                    }
                    // The next held write, at once.
                    answered += self.retry_next(q, mem);
                }
                answered
            }
        }
    }

    /// Tag `idx` is free again; the `n` requests it carried (merged ones: several) are no
    /// longer in flight on queue `qi`.
    fn release(&mut self, idx: usize, qi: usize, n: usize) {
        self.free.push(idx);
        self.n_active -= n;
        if let Some(c) = self.per_queue.get_mut(qi) {
            *c = c.saturating_sub(n);
        }
    }

    /// Holds a write that found the host full: a retried one goes back to the front, any
    /// other joins the end.
    fn hold_request(&mut self, qi: usize, p: Progress, e: &block::Error) {
        if p.retry {
            self.held.push_front((qi, p.head, p.req));
            return;
        }
        self.held.push_back((qi, p.head, p.req));
        match &mut self.hold {
            Some(h) => h.count += 1,
            None => {
                BlockStats::add(&self.disk.stats.no_space_pauses, 1);
                tracing::warn!(
                    "virtio-blk {}: the host file system is full ({e}): the guest's writes wait until space is freed (werror=report fails them instead)",
                    self.name
                );
                let now = Instant::now();
                self.hold = Some(Hold {
                    since: now,
                    next_retry: now + self.first_retry,
                    delay: self.first_retry,
                    count: 1,
                    retrying: false,
                });
            }
        }
    }

    /// Writes the status byte and returns the chain with the bytes written.
    fn answer(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap, done: Answer) {
        let (qi, head, status, out) = done;
        let Some(q) = queues.get_mut(qi) else {
            return;
        };
        self.activity.answered += 1;
        self.activity.last_completion = Some(Instant::now());
        if out.status == request::STATUS_IOERR {
            BlockStats::add(&self.disk.stats.errors, 1);
        }
        let used = if vm_memory::Bytes::write_obj(mem, out.status, status).is_ok() {
            out.written.saturating_add(1)
        } else {
            0
        };
        add_used(q, mem, head, used);
    }

    fn answer_invalid(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        invalid: Invalid,
    ) {
        let stats = &self.disk.stats;
        self.activity.answered += 1;
        self.activity.last_completion = Some(Instant::now());
        match invalid {
            Invalid::Status { status, code, msg } => {
                ratelimited_warn(&format!("virtio-blk: {msg}"));
                if code == request::STATUS_UNSUPP {
                    BlockStats::add(&stats.unsupported, 1);
                } else {
                    BlockStats::add(&stats.errors, 1);
                }
                let used = u32::from(vm_memory::Bytes::write_obj(mem, code, status).is_ok());
                add_used(q, mem, head, used);
            }
            Invalid::Drop(msg) => {
                ratelimited_warn(&format!("virtio-blk: dropping request: {msg}"));
                BlockStats::add(&stats.dropped, 1);
                add_used(q, mem, head, 0);
            }
        }
    }

    /// Raises the used-buffer interrupt unless the driver suppressed it on every queue
    /// (EVENT_IDX; the queues share one interrupt line on virtio-mmio).
    fn raise(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        let mut wanted = false;
        for q in queues.iter_mut() {
            // (Every queue is asked: the question moves its own signalled index on.)
            wanted |= !matches!(q.needs_notification(mem), Ok(false));
        }
        if wanted {
            self.activity.interrupts += 1;
            interrupt.trigger(INT_VRING);
        } else {
            self.activity.suppressed += 1;
        }
    }
}

fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, used: u32) {
    if let Err(e) = q.add_used(mem, head, used) {
        ratelimited_warn(&format!("virtio-blk: cannot return a used buffer: {e}"));
    }
}
