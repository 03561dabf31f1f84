//! The qcow2 image's in-memory state ([`Qcow2Image`]): the header and tables, caches, the
//! allocator's index, deferred frees and the flags that order writes; its accessors, and
//! what happens on corruption and on close. The work on it is split by concern over the
//! sibling modules (each adds an `impl Qcow2Image` block).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cache::TableCache;
use super::free_map::FreeMap;
use super::header::{incompat, Header, Qcow2Version};
use super::pending::PendingFree;
use super::snapshot::SnapshotTable;
use super::zero_clusters::ZeroClusters;
use crate::disk::DiskImage;
use crate::error::Error;
use crate::host_file::HostFile;
use crate::status::ReclaimStats;
use crate::zero::DetectZeroes;

/// Internal open modes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OpenFlags {
    /// Do not open the backing chain.
    pub(crate) no_backing: bool,
    /// Open writable despite the corrupt bit, and skip automatic fixes (for `check -r`).
    pub(crate) repair: bool,
    /// `O_DIRECT` for the image and its backing chain.
    pub(crate) direct: bool,
    /// Lock the image and its backing chain with force-share (read-only only).
    pub(crate) force_share: bool,
}

/// A qcow2 image.
pub struct Qcow2Image {
    pub(crate) file: Arc<HostFile>,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
    pub(crate) cluster_bits: u32,
    pub(crate) cluster_size: u64,
    /// Entries per L2 table.
    pub(crate) l2_entries: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2_cache: TableCache,
    pub(crate) reftable: Vec<u64>,
    pub(crate) rc_cache: TableCache,
    /// Refcount entries per refcount block.
    pub(crate) rb_entries: u64,
    /// Largest refcount value.
    pub(crate) rc_max: u64,
    /// Used/free state of every host cluster (built on first allocation).
    pub(crate) free_map: Option<FreeMap>,
    /// Current length of the file.
    pub(crate) file_len: u64,
    /// Host clusters holding metadata (header, L1, refcount table, refcount blocks, L2
    /// tables, snapshot tables): data entries must never point at them.
    pub(crate) meta: HashSet<u64>,
    /// The internal snapshots' L1 tables (validated at open).
    pub(crate) snapshots: SnapshotTable,
    pub(crate) backing: Option<Box<dyn DiskImage>>,
    pub(crate) read_only: bool,
    pub(crate) detect_zeroes: DetectZeroes,
    pub(crate) stats: ReclaimStats,
    /// Host clusters whose L2 reference was dropped in the cache; their refcount drops once
    /// the L2 tables are on disk. `(cluster index, punch, reason)`.
    pub(crate) pending_frees: Vec<PendingFree>,
    /// L2/L1 writes issued since the last fdatasync (refcount decrements must not reach the
    /// disk before them).
    pub(crate) l2_unsynced: bool,
    /// Refcount writes issued since the last fdatasync (L2 entries must not reach the disk
    /// before them).
    pub(crate) rc_unsynced: bool,
    /// v2 images with a backing file: shared all-zero clusters (host offsets) that zeroed
    /// guest clusters map to (the 2008 RFC's scheme).
    pub(crate) zero_clusters: ZeroClusters,
    /// Last decompressed cluster (L2 entry, data).
    pub(crate) compressed_cache: Option<(u64, Vec<u8>)>,
    /// Whether the file system accepted hole punching so far.
    pub(crate) punch_supported: bool,
    /// Whether the file system accepted `fallocate` of new clusters so far.
    pub(crate) prealloc_supported: bool,
    /// Set after a write failed half-way: the in-memory state can no longer be trusted.
    pub(crate) broken: bool,
    /// Set after a write failed for lack of host space: the header, L1 and refcount tables
    /// are written again from memory before the next change.
    pub(crate) rewrite_tables: bool,
    /// Metadata tables (L1 and L2 tables, refcount blocks) read from the file by whole-image
    /// walks (check, repair, refcount rebuild) since open.
    pub(crate) walk_table_reads: u64,
}

impl Qcow2Image {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version.
    pub fn version(&self) -> Qcow2Version {
        if self.header.version == 2 {
            Qcow2Version::V2
        } else {
            Qcow2Version::V3
        }
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// How many metadata tables (L1 and L2 tables, refcount blocks) whole-image walks (check,
    /// repair, the refcount rebuild of a dirty image) have read from the file since open: their
    /// work is bounded by the distinct tables the image holds, and tests assert it.
    pub fn walk_table_reads(&self) -> u64 {
        self.walk_table_reads
    }

    /// Whether the image has a backing file (even if it was not opened).
    pub(crate) fn has_backing(&self) -> bool {
        self.header.backing_file.is_some()
    }

    /// Clusters of the tables the header points at, which never overlap one another: header,
    /// L1 table, refcount table and snapshot table.
    pub(crate) fn fixed_metadata(&self) -> Vec<std::ops::Range<u64>> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size;
        let h = &self.header;
        let clusters = |off: u64, len: u64| (off >> cb)..(off + len).div_ceil(cs);
        let header = 0..1;
        let mut fixed: Vec<std::ops::Range<u64>> = vec![header];
        if h.l1_size > 0 {
            fixed.push(clusters(h.l1_table_offset, u64::from(h.l1_size) * 8));
        }
        fixed.push(clusters(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) << cb,
        ));
        if self.snapshots.bytes > 0 {
            fixed.push(clusters(h.snapshots_offset, self.snapshots.bytes));
        }
        fixed
    }

    /// Records metadata corruption: the image is marked corrupt (v3) and becomes read-only.
    pub(crate) fn corruption(&mut self, msg: String) -> Error {
        tracing::error!("{}: {msg}; marking image corrupt", self.path.display());
        if !self.read_only {
            if self.header.version >= 3 {
                self.header.incompatible_features |= incompat::CORRUPT;
                if let Err(e) = self.write_header() {
                    tracing::error!("could not mark image corrupt: {e}");
                }
            }
            self.read_only = true;
        }
        Error::Corrupt(msg)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if !self.read_only && !self.broken {
            if let Err(e) = self.flush_all() {
                tracing::error!("{}: flushing on close failed: {e}", self.path.display());
            }
        }
    }
}
