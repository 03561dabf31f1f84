//! qcow2 images, versions 2 (compat 0.10) and 3 (compat 1.1).
//!
//! Split like QEMU's driver:
//! * [`header`]: the header, extensions and feature bits (`qcow2.c`'s header code);
//! * [`cluster`]: guest-to-host mapping through L1/L2 tables, reads, allocating writes,
//!   copy-on-write and zeroing (`qcow2-cluster.c`);
//! * [`refcount`]: refcounts of every width, the cluster allocator and its free-space index,
//!   refcount table growth, deferred frees, hole punching and tail truncation
//!   (`qcow2-refcount.c`);
//! * [`cache`]: bounded L2 / refcount-block caches (`qcow2-cache.c`);
//! * [`check`]: consistency check, leak repair and refcount rebuild;
//! * [`create`]: image creation; [`compressed`]: compressed clusters;
//! * [`compact`]: offline reclamation and relocation;
//! * [`snapshot`]: the internal snapshot table, read and validated at open;
//! * [`free_map`]: the allocator's index of used and free host clusters.

pub mod cache;
pub mod check;
pub mod cluster;
pub mod compact;
pub mod compressed;
pub mod create;
pub mod free_map;
pub mod header;
mod planner;
pub mod refcount;
pub mod snapshot;

use std::collections::HashSet;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::Chain;
use crate::disk::DiskImage;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::host_file::HostFile;
use crate::iobuf::IoBuf;
use crate::plan::Plan;
use crate::probe::Probed;
use crate::status::{HostUsage, MapExtent, ReclaimStats};
use crate::zero::DetectZeroes;
use cache::TableCache;
use free_map::FreeMap;
use header::{incompat, Header};

pub use create::{create, CreateOptions, Qcow2Version};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// Host offset bits of L1 and L2 entries.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of refcount table entries.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits 56..=61 of a standard L2 entry / L1 entry: reserved, must be zero.
pub(crate) const RESERVED_HIGH: u64 = 0x3f00_0000_0000_0000;
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
pub(crate) const OFLAG_ZERO: u64 = 1;

pub use crate::chain::MAX_CHAIN_DEPTH;

/// Default upper bound of the L2 cache (QEMU's default on Linux).
const MAX_L2_CACHE_BYTES: u64 = 32 << 20;
/// Freed clusters waiting for their L2 tables to reach the disk before their refcounts drop;
/// committed in a batch once this many bytes are pending (or on flush / idle).
pub(crate) const PENDING_FREE_BYTES: u64 = 256 << 20;

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
    pub(crate) snapshots: snapshot::SnapshotTable,
    pub(crate) backing: Option<Box<dyn DiskImage>>,
    pub(crate) read_only: bool,
    pub(crate) detect_zeroes: DetectZeroes,
    pub(crate) stats: ReclaimStats,
    /// Host clusters whose L2 reference was dropped in the cache; their refcount drops once
    /// the L2 tables are on disk. `(cluster index, punch, reason)`.
    pub(crate) pending_frees: Vec<refcount::PendingFree>,
    /// L2/L1 writes issued since the last fdatasync (refcount decrements must not reach the
    /// disk before them).
    pub(crate) l2_unsynced: bool,
    /// Refcount writes issued since the last fdatasync (L2 entries must not reach the disk
    /// before them).
    pub(crate) rc_unsynced: bool,
    /// v2 images with a backing file: shared all-zero clusters (host offsets) that zeroed
    /// guest clusters map to (the 2008 RFC's scheme).
    pub(crate) zero_clusters: Vec<cluster::ZeroCluster>,
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
    /// Opens a qcow2 image (and its backing chain, read-only). Backing files whose format
    /// is not recorded are held to [`crate::probe::ProbePolicy::Guest`]'s rules.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, read_only, OpenFlags::default())
    }

    /// Opens a qcow2 image with the read-only, direct-I/O and probing settings of `opts`.
    /// `opts.format` `None` means the caller found the format by probing: the image is then
    /// held to `opts.probe`'s rules (see [`crate::probe`]).
    pub fn open_with_options(path: &Path, opts: &crate::options::OpenOptions) -> Result<Self> {
        if opts.format == Some(ImageFormat::Raw) {
            return Err(Error::InvalidArgument(format!(
                "{} was given as raw, not qcow2",
                path.display()
            )));
        }
        let file = open_host_file(path, opts.read_only, opts.direct)?;
        let mut chain = Chain::new(opts.probe.follows_probed_names(opts.read_only));
        Self::open_file(
            file,
            path,
            opts.read_only,
            &mut chain,
            OpenFlags {
                direct: opts.direct,
                force_share: opts.force_share,
                ..OpenFlags::default()
            },
            opts.format.is_none().then_some(Probed::Image),
        )
    }

    /// Opens the image alone, without its backing chain (for `info`, `check`, `compact`:
    /// reads of unallocated clusters then return zeros).
    pub fn open_without_backing(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_without_backing_shared(path, read_only, false)
    }

    /// [`Qcow2Image::open_without_backing`], read-only opens optionally with force-share.
    pub fn open_without_backing_shared(
        path: &Path,
        read_only: bool,
        force_share: bool,
    ) -> Result<Self> {
        Self::open_with(
            path,
            read_only,
            OpenFlags {
                no_backing: true,
                force_share,
                ..OpenFlags::default()
            },
        )
    }

    /// Opens the image for repair: writable even when marked corrupt, without backing.
    pub fn open_for_repair(path: &Path) -> Result<Self> {
        Self::open_with(
            path,
            false,
            OpenFlags {
                no_backing: true,
                repair: true,
                ..OpenFlags::default()
            },
        )
    }

    fn open_with(path: &Path, read_only: bool, flags: OpenFlags) -> Result<Self> {
        let file = open_host_file(path, read_only, flags.direct)?;
        Self::open_file(file, path, read_only, &mut Chain::new(false), flags, None)
    }

    /// Opens the qcow2 image in `file` (at `path`) as the next image of `chain`. `probed`
    /// says whether and how its format was probed: a probed image that names a backing file
    /// is refused unless the chain follows probed names.
    pub(crate) fn open_file(
        file: HostFile,
        path: &Path,
        read_only: bool,
        chain: &mut Chain,
        flags: OpenFlags,
        probed: Option<Probed>,
    ) -> Result<Self> {
        let stat = file
            .metadata()
            .map_err(|e| Error::io("stat qcow2 image", e))?;
        chain.enter(path, &stat)?;
        // Locked after the identity check, so an image that comes back in its own chain is
        // reported as a loop rather than as in use by this process.
        let mut file = file;
        file.lock(
            path,
            crate::lock::LockMode::for_open(read_only, flags.force_share)?,
        )?;
        let file_len = stat.len();
        let head_len = file_len.min(1 << header::MAX_CLUSTER_BITS) as usize;
        let mut head = vec![0u8; head_len];
        read_exact_or_eof(&file, &mut head, 0)?;
        let header = Header::parse(&head, file_len)?;
        drop(head);
        if let (Some(how), Some(named)) = (probed, &header.backing_file) {
            if !chain.follows_probed_names {
                return Err(crate::probe::names_a_file(path, named, how));
            }
        }
        let snapshots = snapshot::read_snapshot_table(&file, &header)?;
        if snapshots.bytes > 0 {
            let snap = (
                header.snapshots_offset,
                header.snapshots_offset + snapshots.bytes,
            );
            let l1 = (
                header.l1_table_offset,
                header.l1_table_offset + u64::from(header.l1_size) * 8,
            );
            let rt = (
                header.refcount_table_offset,
                header.refcount_table_offset
                    + (u64::from(header.refcount_table_clusters) << header.cluster_bits),
            );
            for (what, r) in [("L1 table", l1), ("refcount table", rt)] {
                if r.0 < r.1 && snap.0 < r.1 && r.0 < snap.1 {
                    return Err(Error::InvalidImage(format!(
                        "snapshot table at {:#x} ({} bytes) overlaps the {what}",
                        snap.0, snapshots.bytes
                    )));
                }
            }
        }

        let cluster_bits = header.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let mut read_only = read_only;
        if header.incompatible_features & incompat::CORRUPT != 0 && !read_only && !flags.repair {
            tracing::warn!(
                "{}: image is marked corrupt; opening read-only (run `thinvm image check -r all`)",
                path.display()
            );
            read_only = true;
        }

        // The tables read here and the decompression buffer, from the chain's budget.
        let l1_bytes = u64::from(header.l1_size) * 8;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cluster_size;
        chain.charge(
            path,
            "L1 table, refcount table and decompression buffer",
            l1_bytes + rt_bytes + cluster_size,
        )?;

        // L1 table.
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        read_exact_or_eof(&file, &mut l1_raw, header.l1_table_offset)?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(l1_raw);

        // Refcount table.
        let mut rt_raw = vec![0u8; rt_bytes as usize];
        read_exact_or_eof(&file, &mut rt_raw, header.refcount_table_offset)?;
        let reftable: Vec<u64> = rt_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(rt_raw);

        let l2_entries = cluster_size / 8;
        let l2_tables_needed = Header::l1_entries_for(header.size, cluster_bits).max(1);
        let l2_wanted = l2_tables_needed
            .min(MAX_L2_CACHE_BYTES / cluster_size)
            .max(crate::chain::MIN_CACHE_TABLES);
        let rc_wanted = (l2_wanted / 4).max(crate::chain::MIN_CACHE_TABLES);
        let (l2_cap, rc_cap) = chain.grant_caches(path, l2_wanted, rc_wanted, cluster_size)?;
        let (l2_cap, rc_cap) = (l2_cap as usize, rc_cap as usize);
        let rb_entries = (cluster_size * 8) >> header.refcount_order;
        let rc_max = if header.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << header.refcount_order)) - 1
        };

        let backing = match &header.backing_file {
            Some(name) if !flags.no_backing => Some(open_backing(
                path,
                name,
                header.backing_format,
                chain,
                flags.direct,
                flags.force_share,
            )?),
            _ => None,
        };

        let mut img = Qcow2Image {
            file: Arc::new(file),
            path: path.to_path_buf(),
            cluster_bits,
            cluster_size,
            l2_entries,
            l1,
            l2_cache: TableCache::new(cluster_size as usize, l2_cap),
            reftable,
            rc_cache: TableCache::new(cluster_size as usize, rc_cap),
            rb_entries,
            rc_max,
            free_map: None,
            file_len,
            meta: HashSet::new(),
            snapshots,
            backing,
            read_only,
            detect_zeroes: DetectZeroes::Off,
            stats: ReclaimStats::default(),
            pending_frees: Vec::new(),
            l2_unsynced: false,
            rc_unsynced: false,
            zero_clusters: Vec::new(),
            compressed_cache: None,
            punch_supported: true,
            prealloc_supported: true,
            broken: false,
            rewrite_tables: false,
            walk_table_reads: 0,
            header,
        };
        let overlap = img.build_meta_set();

        // Metadata past the end of the file (a truncated or forged image), or tables sharing
        // clusters they must not share: writing could allocate data over them or move one
        // table with another's contents, so only read-only opens and repair accept them.
        let end_cluster = img.file_len.div_ceil(cluster_size);
        if !img.read_only && !flags.repair {
            if let Some(msg) = overlap {
                return Err(Error::InvalidImage(format!(
                    "{msg}: corrupt image (open it read-only, or run `thinvm image check -r all`)"
                )));
            }
            if let Some(&c) = img.meta.iter().filter(|&&c| c >= end_cluster).min() {
                return Err(Error::InvalidImage(format!(
                    "metadata at offset {:#x} lies beyond the end of the file ({} bytes): truncated or corrupt image (open it read-only, or run `thinvm image check -r all`)",
                    c * cluster_size,
                    img.file_len
                )));
            }
        }

        if !img.read_only && !flags.repair {
            if img.header.incompatible_features & incompat::DIRTY != 0 {
                tracing::info!(
                    "{}: dirty bit set; rebuilding refcounts",
                    img.path.display()
                );
                check::rebuild_refcounts(&mut img)?;
                img.header.incompatible_features &= !incompat::DIRTY;
                img.write_header()?;
            }
            if img.header.autoclear_features != 0 {
                // We maintain none of the autoclear features (bitmaps, raw external data):
                // clear them before we modify anything, as the spec requires.
                img.header.autoclear_features = 0;
                img.write_header()?;
            }
        } else if img.header.incompatible_features & incompat::DIRTY != 0 {
            tracing::warn!(
                "{}: dirty bit set (refcounts may be stale); opened read-only, reads are unaffected",
                img.path.display()
            );
        }
        Ok(img)
    }

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

    /// Consistency check (and repair), as `qemu-img check [-r]`.
    pub fn check(
        &mut self,
        repair: Option<crate::inspect::RepairMode>,
    ) -> Result<crate::inspect::CheckReport> {
        check::check(self, repair)
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

    /// Collects the host clusters that hold metadata. Returns the first overlap found
    /// between tables that must not share a cluster: a refcount block with any other
    /// table, or an L2 table with anything but another L2 table (several L1 entries may
    /// share an L2 table, with refcounts to match).
    fn build_meta_set(&mut self) -> Option<String> {
        let cb = self.cluster_bits;
        let fixed = self.fixed_metadata();
        let mut meta = HashSet::new();
        for r in &fixed {
            meta.extend(r.clone());
        }
        let in_fixed = |c: u64| fixed.iter().any(|r| r.contains(&c));
        let mut overlap = None;
        let mut refblocks = HashSet::new();
        for (i, &e) in self.reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let c = off >> cb;
            if (in_fixed(c) || !refblocks.insert(c)) && overlap.is_none() {
                overlap = Some(format!(
                    "refcount block {i} at {off:#x} overlaps another metadata table"
                ));
            }
        }
        for (i, &e) in self.l1.iter().enumerate() {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let c = off >> cb;
            if (in_fixed(c) || refblocks.contains(&c)) && overlap.is_none() {
                overlap = Some(format!(
                    "L2 table {i} at {off:#x} overlaps another metadata table"
                ));
            }
            meta.insert(c);
        }
        meta.extend(refblocks);
        self.meta = meta;
        overlap
    }

    /// Rewrites the header cluster's header part (fields, extensions, backing name).
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let bytes = self.header.serialize()?;
        self.file
            .write_all_at(&bytes, 0)
            .map_err(|e| Error::io("write qcow2 header", e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 header", e))
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

    fn check_writable(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.broken {
            return Err(Error::Corrupt(
                "an earlier write failed half-way; reopen the image".into(),
            ));
        }
        self.rewrite_tables_if_needed()
    }

    /// After a write that failed for lack of host space: writes the header, the L1 table and
    /// the refcount table from memory (refcount blocks first, as for any L1 change), so the
    /// file again holds what memory says.
    fn rewrite_tables_if_needed(&mut self) -> Result<()> {
        if !self.rewrite_tables {
            return Ok(());
        }
        self.write_dirty_refblocks()?;
        self.order_after_refcounts()?;
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&l1, self.header.l1_table_offset, "L1 table")?;
        let rt: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&rt, self.header.refcount_table_offset, "refcount table")?;
        self.write_header()?;
        self.l2_unsynced = true;
        self.rewrite_tables = false;
        Ok(())
    }

    /// Writes every dirty metadata table in the right order and syncs the file, without the
    /// work that needs all I/O to have finished (committing frees, shrinking the file): what
    /// a flush does while other requests are in flight.
    pub(crate) fn flush_metadata(&mut self) -> Result<()> {
        self.rewrite_tables_if_needed()?;
        self.write_dirty_refblocks()?;
        self.write_dirty_l2()?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.l2_unsynced = false;
        self.rc_unsynced = false;
        Ok(())
    }

    /// Writes every dirty metadata table in the right order and syncs the file.
    pub(crate) fn flush_all(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.rewrite_tables_if_needed()?;
        self.commit_frees()?;
        self.write_dirty_refblocks()?;
        self.write_dirty_l2()?;
        self.shrink_tail()?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.l2_unsynced = false;
        self.rc_unsynced = false;
        Ok(())
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

/// Reads metadata tables for whole-image walks (check, refcount rebuild, the allocator's
/// index) so that they cost what the file holds rather than what its tables claim: a table
/// that lies in a hole of a sparse file, or past its end, reads as zeros and is skipped
/// without reading (one `lseek(SEEK_DATA)` per hole, remembered for the tables after it).
#[derive(Default)]
pub(crate) struct TableReader {
    /// Known: no data in `[.0, .1)`.
    hole: (u64, u64),
    /// Tables actually read.
    pub reads: u64,
}

impl TableReader {
    /// Forgets the holes seen so far (after the file was written).
    pub fn forget_holes(&mut self) {
        self.hole = (0, 0);
    }

    /// Reads the table at `offset` into `buf`; `Ok(false)` (and `buf` untouched) when the
    /// file holds only zeros there.
    pub fn read(
        &mut self,
        file: &HostFile,
        file_len: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<bool> {
        let end = offset.saturating_add(buf.len() as u64);
        if offset >= file_len || (self.hole.0 <= offset && end <= self.hole.1) {
            return Ok(false);
        }
        if let Ok(pos) = i64::try_from(offset) {
            // SAFETY: lseek on the image's open descriptor touches no memory; positioned I/O
            // (pread/pwrite) does not use the file position it moves.
            let next = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
            let next = if next >= 0 {
                Some(next as u64)
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                // No data at or after `offset`.
                Some(file_len)
            } else {
                // SEEK_DATA unsupported: read.
                None
            };
            if let Some(next) = next {
                if next > offset {
                    self.hole = (offset, next);
                }
                if next >= end {
                    return Ok(false);
                }
            }
        }
        read_exact_or_eof(file, buf, offset)?;
        self.reads += 1;
        Ok(true)
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes beyond the end of the file read as zeros.
pub(crate) fn read_exact_or_eof(file: &HostFile, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_or_zeros(buf, offset)
        .map_err(|e| Error::io("read qcow2 image", e))
}

/// Resolves a backing file name relative to the overlay's directory.
pub fn resolve_backing_path(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }
}

/// Opens an image file (see [`HostFile::open`]: regular files and block devices only).
fn open_host_file(path: &Path, read_only: bool, direct: bool) -> Result<HostFile> {
    HostFile::open(path, read_only, direct).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens the backing file `name` of `overlay` read-only as the next image of `chain`,
/// probing its format when the overlay does not record it ([`crate::probe`]'s rules).
fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<ImageFormat>,
    chain: &mut Chain,
    direct: bool,
    force_share: bool,
) -> Result<Box<dyn DiskImage>> {
    let path = resolve_backing_path(overlay, name);
    // Errors that already name the file or the chain pass as they are.
    let wrap = |e: Error| match e {
        e @ (Error::Open { .. } | Error::Probe(_) | Error::Chain(_) | Error::Locked { .. }) => e,
        other => Error::InvalidImage(format!("backing file '{name}': {other}")),
    };
    let file = open_host_file(&path, true, direct)?;
    let (format, probed) = match format {
        Some(f) => (f, None),
        None => (
            crate::probe::probe_file(&file, &path).map_err(|e| {
                Error::InvalidImage(format!("cannot open backing file '{name}': {e}"))
            })?,
            Some(Probed::BackingOf { overlay, name }),
        ),
    };
    Ok(match format {
        ImageFormat::Raw => {
            let stat = file
                .metadata()
                .map_err(|e| Error::io("stat backing file", e))?;
            chain.enter(&path, &stat)?;
            let mut file = file;
            file.lock(&path, crate::lock::LockMode::for_open(true, force_share)?)?;
            Box::new(crate::raw::RawImage::from_host_file(file, true).map_err(wrap)?)
        }
        ImageFormat::Qcow2 => Box::new(
            Qcow2Image::open_file(
                file,
                &path,
                true,
                chain,
                OpenFlags {
                    direct,
                    force_share,
                    ..OpenFlags::default()
                },
                probed,
            )
            .map_err(wrap)?,
        ),
    })
}

impl DiskImage for Qcow2Image {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        crate::disk::check_range(offset, crate::iobuf::total_len(bufs), self.header.size)?;
        let mut plan = Plan::default();
        self.plan_read_into(offset, bufs, &mut plan, 0)?;
        Ok(plan)
    }

    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        self.check_writable()?;
        crate::disk::check_range(offset, crate::iobuf::total_len(bufs), self.header.size)?;
        let r = self.plan_write_inner(offset, bufs);
        match r {
            Ok(plan) => Ok(plan),
            Err(e) => self.after_error(Err(e)).map(|()| Plan::default()),
        }
    }

    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()> {
        if !plan.is_write() {
            return data;
        }
        let r = self.finish_write(plan, data);
        self.after_error(r)
    }

    fn lock_unit(&self) -> u64 {
        self.cluster_size.max(crate::host_file::DIRECT_ALIGN)
    }

    fn needs_drain(&self) -> bool {
        !self.read_only && self.pending_free_bytes() >= PENDING_FREE_BYTES
    }

    fn flush_completed(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let r = self.flush_metadata();
        self.after_error(r)
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let r = self.flush_all();
        self.after_request(r)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        crate::disk::check_range(offset, len, self.header.size)?;
        let r = self.zero_guest(offset, len, may_unmap, refcount::FreeReason::WriteZeroes);
        self.after_request(r)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        crate::disk::check_range(offset, len, self.header.size)?;
        // A discarded range reads as zeros afterwards, never as the backing file's data.
        let r = self.zero_guest(offset, len, true, refcount::FreeReason::Discard);
        self.after_request(r)
    }

    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<MapExtent> {
        crate::disk::check_range(offset, max_len, self.header.size)?;
        self.guest_block_status(offset, max_len)
    }

    fn set_detect_zeroes(&mut self, mode: DetectZeroes) {
        self.detect_zeroes = mode;
    }

    fn detect_zeroes(&self) -> DetectZeroes {
        self.detect_zeroes
    }

    fn reclaim_stats(&self) -> ReclaimStats {
        self.stats
    }

    fn host_usage(&self) -> Result<HostUsage> {
        HostUsage::of_file(&self.file)
    }

    fn discard_granularity(&self) -> u64 {
        self.cluster_size
    }

    fn idle(&mut self) -> Result<()> {
        if self.read_only || self.pending_frees.is_empty() {
            return Ok(());
        }
        let r = self.flush_all();
        self.after_request(r)
    }
}

impl Qcow2Image {
    /// Post-processing of a discard or write-zeroes request (which run with no other I/O in
    /// flight): see [`Self::after_error`], and commit deferred frees in batches.
    fn after_request(&mut self, r: Result<()>) -> Result<()> {
        self.after_error(r)?;
        if self.pending_free_bytes() >= PENDING_FREE_BYTES {
            self.commit_frees()?;
            self.shrink_tail()?;
        }
        Ok(())
    }

    /// Marks the image unusable if a request failed half-way through metadata updates (or
    /// to be rewritten from memory when the host file system was full).
    fn after_error(&mut self, r: Result<()>) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e @ (Error::OutOfRange { .. } | Error::ReadOnly | Error::InvalidArgument(_))) => {
                Err(e)
            }
            Err(e @ Error::Corrupt(_)) => Err(e),
            Err(e) if e.is_no_space() => {
                // The host file system is full (ENOSPC, EDQUOT). A failed step allocated
                // space or wrote into new space before anything in memory pointed at it, so
                // the in-memory tables are consistent (at worst with leaked clusters) and the
                // image stays writable: the request can be retried once space is freed.
                // Cached tables stay dirty until written; the write-through ones (header, L1
                // and refcount tables) may now be ahead of the file, so they are written
                // again before the next change.
                self.rewrite_tables = true;
                Err(e)
            }
            Err(e) => {
                // An I/O error in the middle of an update: in-memory metadata may be ahead of
                // the file. Refuse further writes rather than risk corrupting it.
                self.broken = true;
                Err(e)
            }
        }
    }
}
