//! Per-disk statistics, updated by the worker and read by the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
}

/// A consistent copy of the statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub batched_writes: u64,
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
