//! Opening a qcow2 image: the header, L1 and refcount tables read and checked against each
//! other and the file, caches sized from the chain's budget, the backing chain opened, and
//! the fixes a writable open makes first (dirty refcounts rebuilt, autoclear bits cleared).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cache::TableCache;
use super::check;
use super::entry::{L1E_OFFSET_MASK, REFT_OFFSET_MASK};
use super::header::{self, incompat, Header};
use super::image::{OpenFlags, Qcow2Image};
use super::snapshot;
use super::table_read::read_exact_or_eof;
use super::zero_clusters::ZeroClusters;
use crate::cast::usize_from;
use crate::chain::Chain;
use crate::disk::DiskImage;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::host_file::HostFile;
use crate::probe::Probed;
use crate::status::ReclaimStats;
use crate::zero::DetectZeroes;

/// Default upper bound of the L2 cache (QEMU's default on Linux).
const MAX_L2_CACHE_BYTES: u64 = 32 << 20;

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

    pub(crate) fn open_with(path: &Path, read_only: bool, flags: OpenFlags) -> Result<Self> {
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
        let mut l1_raw = vec![0u8; usize_from(l1_bytes)];
        read_exact_or_eof(&file, &mut l1_raw, header.l1_table_offset)?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(l1_raw);

        // Refcount table.
        let mut rt_raw = vec![0u8; usize_from(rt_bytes)];
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
        let (l2_cap, rc_cap) = (usize_from(l2_cap), usize_from(rc_cap));
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
            l2_cache: TableCache::new(usize_from(cluster_size), l2_cap),
            reftable,
            rc_cache: TableCache::new(usize_from(cluster_size), rc_cap),
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
            zero_clusters: ZeroClusters::default(),
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

    /// Collects the host clusters that hold metadata. Returns the first overlap found
    /// between tables that must not share a cluster: a refcount block with any other
    /// table, or an L2 table with anything but another L2 table (several L1 entries may
    /// share an L2 table, with refcounts to match).
    pub(crate) fn build_meta_set(&mut self) -> Option<String> {
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
        other => Error::Backing {
            what: "backing file",
            name: name.to_string(),
            source: Box::new(other),
        },
    };
    let file = open_host_file(&path, true, direct)?;
    let (format, probed) = match format {
        Some(f) => (f, None),
        None => (
            crate::probe::probe_file(&file, &path).map_err(|e| Error::Backing {
                what: "cannot open backing file",
                name: name.to_string(),
                source: Box::new(e),
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
