//! Per-disk statistics, updated by the worker and read by the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use block::{HostUsage, ReclaimStats};

/// Request counters (atomic, lock-free to update) and the latest image figures.
#[derive(Default)]
pub struct BlockStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Writes that ran as part of a batch (several queued writes at once).
    pub batched_writes: AtomicU64,
    /// Reads that ran merged with the ones continuing them (one image read for several).
    pub merged_reads: AtomicU64,
    /// Writes that ran merged with the ones continuing them (one image write for several).
    pub merged_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub discard_bytes: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub write_zeroes_bytes: AtomicU64,
    pub get_ids: AtomicU64,
    /// Requests completed with IOERR.
    pub errors: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains dropped without a status (malformed beyond reply).
    pub dropped: AtomicU64,
    /// Requests held right now because the host file system is full (`werror=enospc`).
    pub held: AtomicU64,
    /// Requests started and not yet answered right now.
    pub in_flight: AtomicU64,
    /// Times the device started holding writes for lack of host space.
    pub no_space_pauses: AtomicU64,
    image: Mutex<(ReclaimStats, HostUsage)>,
    queue: Mutex<Option<QueueSnapshot>>,
}

/// The device side of a queue as the worker last left it, for the queue-state report
/// (SIGUSR1, `--stats-interval`): with the ring addresses, the report reads the guest's
/// side (available index, used_event) and the device's (used index, avail_event) live.
#[derive(Clone, Copy, Debug)]
pub struct QueueSnapshot {
    pub size: u16,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
    /// The device's next available index to pop, and next used index to fill.
    pub next_avail: u16,
    pub next_used: u16,
    /// Requests started and not answered; of the pipeline's, waiting for an earlier one.
    pub in_flight: usize,
    pub waiting: usize,
    pub held: usize,
    pub interrupt_status: u32,
    pub interrupts: u64,
    pub suppressed: u64,
    pub last_notify: Option<Instant>,
    pub last_completion: Option<Instant>,
    pub aio: &'static str,
}

impl QueueSnapshot {
    /// One line: the snapshot, with the ring indices read from guest memory now.
    pub fn describe(&self, mem: &GuestMemoryMmap) -> String {
        let n = u64::from(self.size);
        let read = |addr: u64| -> String {
            mem.read_obj::<u16>(GuestAddress(addr))
                .map(|v| u16::from_le(v).to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let ago = |t: Option<Instant>| match t {
            Some(t) => format!("{:.3} s ago", t.elapsed().as_secs_f64()),
            None => "never".into(),
        };
        format!(
            "avail idx {} (device at {}), used idx {} (device at {}), used_event {}, avail_event {}{}, in flight {} (waiting {}, held {}), interrupt status {:#x}, interrupts {} (+{} suppressed), last notification {}, last completion {}, aio {}",
            read(self.avail_ring + 2),
            self.next_avail,
            read(self.used_ring + 2),
            self.next_used,
            read(self.avail_ring + 4 + 2 * n),
            read(self.used_ring + 4 + 8 * n),
            if self.event_idx { "" } else { " (EVENT_IDX off)" },
            self.in_flight,
            self.waiting,
            self.held,
            self.interrupt_status,
            self.interrupts,
            self.suppressed,
            ago(self.last_notify),
            ago(self.last_completion),
            self.aio,
        )
    }
}

/// A consistent copy of the statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub batched_writes: u64,
    pub merged_reads: u64,
    pub merged_writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub discard_bytes: u64,
    pub write_zeroes: u64,
    pub write_zeroes_bytes: u64,
    pub get_ids: u64,
    pub errors: u64,
    pub unsupported: u64,
    pub dropped: u64,
    pub held: u64,
    pub in_flight: u64,
    pub no_space_pauses: u64,
    pub reclaim: ReclaimStats,
    pub usage: HostUsage,
}

impl BlockStats {
    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Ordering::Relaxed);
    }

    /// Records the image's latest reclaim counters and host usage.
    pub fn set_image(&self, reclaim: ReclaimStats, usage: HostUsage) {
        match self.image.lock() {
            Ok(mut g) => *g = (reclaim, usage),
            Err(p) => *p.into_inner() = (reclaim, usage),
        }
    }

    /// Records the queue's state (the worker, after each pass and completion).
    pub fn set_queue(&self, q: Option<QueueSnapshot>) {
        match self.queue.lock() {
            Ok(mut g) => *g = q,
            Err(p) => *p.into_inner() = q,
        }
    }

    /// The queue's state as last recorded (`None`: not active).
    pub fn queue(&self) -> Option<QueueSnapshot> {
        match self.queue.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (reclaim, usage) = match self.image.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        StatsSnapshot {
            reads: l(&self.reads),
            read_bytes: l(&self.read_bytes),
            writes: l(&self.writes),
            write_bytes: l(&self.write_bytes),
            batched_writes: l(&self.batched_writes),
            merged_reads: l(&self.merged_reads),
            merged_writes: l(&self.merged_writes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            discard_bytes: l(&self.discard_bytes),
            write_zeroes: l(&self.write_zeroes),
            write_zeroes_bytes: l(&self.write_zeroes_bytes),
            get_ids: l(&self.get_ids),
            errors: l(&self.errors),
            unsupported: l(&self.unsupported),
            dropped: l(&self.dropped),
            held: l(&self.held),
            in_flight: l(&self.in_flight),
            no_space_pauses: l(&self.no_space_pauses),
            reclaim,
            usage,
        }
    }
}
