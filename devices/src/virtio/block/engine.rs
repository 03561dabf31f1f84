//! Serving a virtio-blk queue, one bounded pass at a time: pop at most queue-size chains,
//! parse each into a [`Request`], execute them in order (consecutive writes as one batch),
//! put each answer in the used ring, raise the interrupt once. Between passes and between
//! requests the caller's `stop` is asked, so a reset or shutdown is never starved by a guest
//! that keeps the ring full; what one pass holds in memory is bounded by the queue size
//! times the descriptors one chain may have.
//!
//! Writes that fail because the host file system is full are held under
//! `werror=enospc` ([`WriteErrorPolicy::Enospc`]): not answered, retried with backoff until
//! they succeed, while reads, flushes and the rest keep being served. Writes that arrive
//! meanwhile queue behind them. Requests in flight (held + popped) never exceed the queue
//! size.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::execute::{Disk, Executed, Outcome, BATCH_BYTES};
use super::request::{self, Invalid, Limits, Request};
use super::stats::BlockStats;
use crate::virtio::ratelimited_warn;
use crate::virtio::{Interrupt, INT_VRING};

/// First retry of a held write, then doubling up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A popped chain: its head index and what parsing made of it.
type Popped = (u16, Result<Request, Invalid>);

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Chains taken from the available ring.
    pub popped: usize,
    /// Chains answered (put in the used ring).
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
}

/// Serves one virtio-blk queue (any number of activations in turn) over a [`Disk`].
pub struct Engine {
    pub disk: Disk,
    limits: Limits,
    /// A name for log lines (the disk's).
    name: String,
    held: VecDeque<(u16, Request)>,
    hold: Option<Hold>,
    /// First retry delay of held writes (doubling up to [`MAX_RETRY_DELAY`]).
    first_retry: Duration,
}

impl Engine {
    pub fn new(disk: Disk, limits: Limits, name: String) -> Self {
        Engine {
            disk,
            limits,
            name,
            held: VecDeque::new(),
            hold: None,
            first_retry: FIRST_RETRY_DELAY,
        }
    }

    /// Sets the first retry delay of held writes (tests and fuzzing use a short one).
    pub fn with_first_retry(mut self, d: Duration) -> Self {
        self.first_retry = d;
        self
    }

    /// Requests held for lack of host space.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// How long until held writes should be retried (`None`: nothing held).
    pub fn retry_in(&self, now: Instant) -> Option<Duration> {
        self.hold
            .as_ref()
            .map(|h| h.next_retry.saturating_duration_since(now))
    }

    /// Forgets held requests: the activation they belong to has ended (their buffers are the
    /// guest's again; a reset driver does not expect them back).
    pub fn abandon(&mut self) {
        if !self.held.is_empty() {
            tracing::warn!(
                "virtio-blk {}: {} writes held for lack of host space dropped by a device reset or shutdown",
                self.name,
                self.held.len()
            );
        }
        self.held.clear();
        self.hold = None;
        self.publish_held();
    }

    fn publish_held(&self) {
        let n = self.held.len() as u64;
        self.disk
            .stats
            .held
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// One pass over the queue: pops at most `queue size - held` chains, executes them,
    /// answers them and raises the interrupt if the driver wants one.
    pub fn pass(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> PassReport {
        let mut report = PassReport::default();
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
        let budget = usize::from(q.size()).saturating_sub(self.held.len());
        if let Err(e) = q.disable_notification(mem) {
            ratelimited_warn(&format!("virtio-blk: queue: {e}"));
        }
        let mut popped: VecDeque<Popped> = VecDeque::with_capacity(budget);
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
            // At the bound (or nothing may be taken while the held writes fill the queue:
            // then their retry timer wakes the worker, not the ring).
            budget > 0
        };
        while let Some((head, parsed)) = popped.pop_front() {
            if stop() {
                report.stopped = true;
                break;
            }
            let req = match parsed {
                Ok(req) => req,
                Err(invalid) => {
                    self.answer_invalid(q, mem, head, invalid);
                    report.answered += 1;
                    continue;
                }
            };
            if !self.held.is_empty() && req.kind.writes() {
                // Behind the held writes, in order.
                self.held.push_back((head, req));
                continue;
            }
            let mut batch = vec![(head, req)];
            if self.held.is_empty() {
                take_batch(&mut batch, &mut popped);
            }
            match self.run(&batch, mem, stop) {
                // A reset that came while the image worked (a host call that blocked): the
                // ring is not ours to write any more.
                Executed::Done(_) if stop() => {
                    report.stopped = true;
                    break;
                }
                Executed::Done(out) => {
                    for (head, req) in &batch {
                        self.answer(q, mem, *head, req, out);
                    }
                    report.answered += batch.len();
                }
                Executed::NoSpace(e) => self.start_hold(batch, &e),
                Executed::Stopped => {
                    report.stopped = true;
                    break;
                }
            }
        }
        if report.answered > 0 {
            notify(q, mem, interrupt);
        }
        self.publish_held();
        report
    }

    /// Retries the held writes (when their timer is due): in order, until one fails again
    /// for lack of space. Returns the requests answered.
    pub fn retry_held(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        let now = Instant::now();
        match &self.hold {
            Some(h) if h.next_retry <= now => {}
            _ => return 0,
        }
        let mut answered = 0;
        while let Some(first) = self.held.pop_front() {
            if stop() {
                self.held.push_front(first);
                break;
            }
            let mut batch = vec![first];
            take_batch(&mut batch, &mut self.held);
            match self.run(&batch, mem, stop) {
                Executed::Done(_) if stop() => break,
                Executed::Done(out) => {
                    for (head, req) in &batch {
                        self.answer(q, mem, *head, req, out);
                    }
                    answered += batch.len();
                }
                Executed::NoSpace(_) => {
                    for item in batch.into_iter().rev() {
                        self.held.push_front(item);
                    }
                    if let Some(h) = &mut self.hold {
                        h.delay = (h.delay * 2).min(MAX_RETRY_DELAY);
                        h.next_retry = Instant::now() + h.delay;
                    }
                    break;
                }
                Executed::Stopped => {
                    for item in batch.into_iter().rev() {
                        self.held.push_front(item);
                    }
                    break;
                }
            }
        }
        if self.held.is_empty() {
            if let Some(h) = self.hold.take() {
                tracing::warn!(
                    "virtio-blk {}: host space available again; {} held writes completed after {:.1} s",
                    self.name,
                    h.count,
                    h.since.elapsed().as_secs_f64()
                );
            }
        }
        if answered > 0 {
            notify(q, mem, interrupt);
        }
        self.publish_held();
        answered
    }

    /// Executes one request, or a batch of writes.
    fn run(
        &mut self,
        batch: &[(u16, Request)],
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> Executed {
        match batch {
            [(_, req)] => self.disk.execute(req, mem, stop),
            many => {
                let reqs: Vec<&Request> = many.iter().map(|(_, r)| r).collect();
                self.disk.execute_write_batch(&reqs, mem)
            }
        }
    }

    fn start_hold(&mut self, batch: Vec<(u16, Request)>, e: &block::Error) {
        let n = batch.len() as u64;
        // Anything already held stays in front (a flush or read that failed joins the end).
        self.held.extend(batch);
        match &mut self.hold {
            Some(h) => h.count += n,
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
                    count: n,
                });
            }
        }
    }

    /// Writes the status byte and returns the chain with the bytes written.
    fn answer(&self, q: &mut Queue, mem: &GuestMemoryMmap, head: u16, req: &Request, out: Outcome) {
        let stats = &self.disk.stats;
        if out.status == VIRTIO_BLK_S_IOERR as u8 {
            BlockStats::add(&stats.errors, 1);
        }
        let used = if vm_memory::Bytes::write_obj(mem, out.status, req.status).is_ok() {
            out.written.saturating_add(1)
        } else {
            0
        };
        add_used(q, mem, head, used);
    }

    fn answer_invalid(&self, q: &mut Queue, mem: &GuestMemoryMmap, head: u16, invalid: Invalid) {
        let stats = &self.disk.stats;
        match invalid {
            Invalid::Status { status, code, msg } => {
                ratelimited_warn(&format!("virtio-blk: {msg}"));
                if u32::from(code) == VIRTIO_BLK_S_UNSUPP {
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
}

/// Moves the writes at the front of `from` that can join the write in `batch` (at most
/// [`BATCH_BYTES`] together) into `batch`.
fn take_batch(batch: &mut Vec<(u16, Request)>, from: &mut VecDeque<impl BatchItem>) {
    let Some(mut bytes) = batch.first().and_then(|(_, r)| Disk::batchable(r)) else {
        return;
    };
    while let Some(next) = from.front().and_then(|x| x.request()) {
        let Some(n) = Disk::batchable(next) else {
            break;
        };
        if bytes + n > BATCH_BYTES {
            break;
        }
        bytes += n;
        match from.pop_front().and_then(|x| x.into_request()) {
            Some(item) => batch.push(item),
            None => break,
        }
    }
}

/// The items a batch is taken from: popped chains (parsed or not) and held requests.
trait BatchItem {
    fn request(&self) -> Option<&Request>;
    fn into_request(self) -> Option<(u16, Request)>;
}

impl BatchItem for Popped {
    fn request(&self) -> Option<&Request> {
        self.1.as_ref().ok()
    }
    fn into_request(self) -> Option<(u16, Request)> {
        self.1.ok().map(|r| (self.0, r))
    }
}

impl BatchItem for (u16, Request) {
    fn request(&self) -> Option<&Request> {
        Some(&self.1)
    }
    fn into_request(self) -> Option<(u16, Request)> {
        Some(self)
    }
}

fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, used: u32) {
    if let Err(e) = q.add_used(mem, head, used) {
        ratelimited_warn(&format!("virtio-blk: cannot return a used buffer: {e}"));
    }
}

/// Raises the used-buffer interrupt unless the driver suppressed it.
fn notify(q: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match q.needs_notification(mem) {
        Ok(false) => {}
        _ => interrupt.trigger(INT_VRING),
    }
}
