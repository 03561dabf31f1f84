//! Refcount decrements waiting for the L2 write that removed the reference (crash-safe
//! freeing: the reference goes first, then the refcount), and why each cluster is freed.

/// Freed clusters waiting for their L2 tables to reach the disk before their refcounts drop;
/// committed in a batch once this many bytes are pending (or on flush / idle).
pub(crate) const PENDING_FREE_BYTES: u64 = 256 << 20;

/// Why a cluster is being freed (for the reclaim statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeReason {
    /// An ordinary write turned out to be zeros (detect-zeroes).
    ZeroDetect,
    Discard,
    WriteZeroes,
    /// Replaced by copy-on-write, relocation or other internal reasons.
    Internal,
}

/// A refcount decrement waiting for the L2 write that removed the reference.
#[derive(Clone, Copy, Debug)]
pub struct PendingFree {
    pub cluster: u64,
    pub punch: bool,
    pub reason: FreeReason,
}
