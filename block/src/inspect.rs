//! Whole-image inspection and maintenance: `info`, `check`/`repair` and `compact`.
//!
//! Images are locked as QEMU's tools lock them ([`crate::lock`]): `info` and `check` are
//! read-only opens that fail while another process writes the image unless asked to
//! force-share (`-U`), `check` with repair and `compact` are writers.

use std::path::Path;

use crate::disk::DiskImage;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::probe::probe_format;
pub use crate::qcow2::check::report::{CheckReport, RepairMode};
use crate::qcow2::Qcow2Image;
use crate::status::HostUsage;

/// Format-specific details of a qcow2 image (what `qemu-img info` shows under
/// "Format specific information").
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Qcow2Details {
    /// `0.10` (v2) or `1.1` (v3).
    pub compat: String,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    /// The dirty bit is set (the image was not closed cleanly with lazy refcounts).
    pub dirty: bool,
    /// The corrupt bit is set.
    pub corrupt: bool,
    pub extended_l2: bool,
    /// `zlib` or `zstd`.
    pub compression_type: String,
}

/// What `thinvm image info` reports about one image (one layer of a chain).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Host usage of this file.
    pub usage: HostUsage,
    /// Cluster size (qcow2 only).
    pub cluster_size: Option<u64>,
    /// The backing file name as stored in the header.
    pub backing_filename: Option<String>,
    /// The backing file path, resolved against this image's directory.
    pub full_backing_filename: Option<String>,
    /// The backing format from the header extension, if present.
    pub backing_filename_format: Option<ImageFormat>,
    /// qcow2 details.
    pub qcow2: Option<Qcow2Details>,
}

/// Information about one image file (not following its backing file).
pub fn info(path: &Path) -> Result<ImageInfo> {
    info_shared(path, false)
}

/// [`info`], with force-share when `force_share` (`-U`). A raw image is always opened with
/// force-share: only its size is read, and `qemu-img info` takes no lock on raw files either.
pub fn info_shared(path: &Path, force_share: bool) -> Result<ImageInfo> {
    let filename = path.display().to_string();
    match probe_format(path)? {
        ImageFormat::Raw => {
            let img = crate::raw::RawImage::open_with_options(
                path,
                &crate::options::OpenOptions {
                    read_only: true,
                    force_share: true,
                    ..Default::default()
                },
            )?;
            Ok(ImageInfo {
                filename,
                format: ImageFormat::Raw,
                virtual_size: img.virtual_size(),
                usage: img.host_usage()?,
                cluster_size: None,
                backing_filename: None,
                full_backing_filename: None,
                backing_filename_format: None,
                qcow2: None,
            })
        }
        ImageFormat::Qcow2 => {
            let img = Qcow2Image::open_without_backing_shared(path, true, force_share)?;
            let h = img.header();
            use crate::qcow2::header::{compat, incompat, CompressionType};
            Ok(ImageInfo {
                filename,
                format: ImageFormat::Qcow2,
                virtual_size: h.size,
                usage: img.host_usage()?,
                cluster_size: Some(img.cluster_size()),
                backing_filename: h.backing_file.clone(),
                full_backing_filename: h.backing_file.as_ref().map(|b| {
                    crate::qcow2::resolve_backing_path(path, b)
                        .display()
                        .to_string()
                }),
                backing_filename_format: h.backing_format,
                qcow2: Some(Qcow2Details {
                    compat: img.version().compat_name().to_string(),
                    refcount_bits: h.refcount_bits(),
                    lazy_refcounts: h.compatible_features & compat::LAZY_REFCOUNTS != 0,
                    dirty: h.incompatible_features & incompat::DIRTY != 0,
                    corrupt: h.incompatible_features & incompat::CORRUPT != 0,
                    extended_l2: h.incompatible_features & incompat::EXTENDED_L2 != 0,
                    compression_type: match h.compression_type {
                        CompressionType::Deflate => "zlib".into(),
                        CompressionType::Zstd => "zstd".into(),
                    },
                }),
            })
        }
    }
}

/// Reads the information of an image and of every layer below it (first element: `path`).
/// Every layer must be a different file (see [`crate::chain`]).
pub fn info_chain(path: &Path) -> Result<Vec<ImageInfo>> {
    info_chain_shared(path, false)
}

/// [`info_chain`], with force-share when `force_share` (`-U`).
pub fn info_chain_shared(path: &Path, force_share: bool) -> Result<Vec<ImageInfo>> {
    let mut chain = crate::chain::Chain::new(true);
    let stat = |p: &Path| {
        std::fs::metadata(p).map_err(|source| Error::Open {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut out = vec![info_shared(path, force_share)?];
    chain.enter(path, &stat(path)?)?;
    while let Some(next) = out.last().and_then(|i| i.full_backing_filename.clone()) {
        let p = std::path::PathBuf::from(&next);
        chain.enter(&p, &stat(&p)?)?;
        let mut i = info_shared(&p, force_share)?;
        if let Some(f) = out.last().and_then(|l| l.backing_filename_format) {
            if f != i.format {
                return Err(Error::InvalidImage(format!(
                    "backing file {next} is {} but the header says {}",
                    i.format.name(),
                    f.name()
                )));
            }
        }
        i.filename = next;
        out.push(i);
    }
    Ok(out)
}

/// Checks (and with `repair`, repairs) an image.
pub fn check(path: &Path, repair: Option<RepairMode>) -> Result<CheckReport> {
    check_shared(path, repair, false)
}

/// [`check`], with force-share when `force_share` (`-U`; refused with `repair`).
pub fn check_shared(
    path: &Path,
    repair: Option<RepairMode>,
    force_share: bool,
) -> Result<CheckReport> {
    if force_share && repair.is_some() {
        return Err(Error::InvalidArgument(
            "force-share (-U) is only allowed for read-only opens, not with repair (-r)".into(),
        ));
    }
    match probe_format(path)? {
        ImageFormat::Raw => Err(Error::Unsupported(
            "raw images have no metadata to check".into(),
        )),
        ImageFormat::Qcow2 => {
            let mut img = match repair {
                Some(_) => Qcow2Image::open_for_repair(path)?,
                None => Qcow2Image::open_without_backing_shared(path, true, force_share)?,
            };
            img.check(repair)
        }
    }
}

/// What `compact` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Host usage before and after.
    pub before: HostUsage,
    pub after: HostUsage,
    /// Allocated clusters (data + metadata) before and after.
    pub allocated_clusters_before: u64,
    pub allocated_clusters_after: u64,
    /// Data clusters found all-zero and turned into zero/unallocated entries.
    pub zero_clusters_reclaimed: u64,
    /// Clusters (data or metadata) moved towards the start of the file.
    pub clusters_moved: u64,
}

/// Offline reclamation of an image: all-zero clusters become zero/unallocated entries (never
/// exposing backing data), freed ranges are punched, and tail clusters are moved down so the
/// file can be truncated. `progress(done, total)` is called as work proceeds. The format is
/// probed, so an image that names a backing file is refused ([`compact_with_format`] takes
/// the format).
pub fn compact(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<CompactReport> {
    compact_with_format(path, None, progress)
}

/// [`compact`] of an image whose format is given (`None`: probed, under
/// [`crate::probe::ProbePolicy::HostTool`]'s rules for a writable open).
pub fn compact_with_format(
    path: &Path,
    format: Option<ImageFormat>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompactReport> {
    let found = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    if found != ImageFormat::Qcow2 {
        return Err(Error::Unsupported(
            "compact works on qcow2 images (a raw image can be made sparse with `fallocate -d`)"
                .into(),
        ));
    }
    let mut img = Qcow2Image::open_with_options(
        path,
        &crate::options::OpenOptions {
            read_only: false,
            format,
            probe: crate::probe::ProbePolicy::HostTool,
            ..Default::default()
        },
    )?;
    let before = img.host_usage()?;
    let allocated_clusters_before = img.allocated_host_clusters()?;
    let stats = img.compact(progress)?;
    let allocated_clusters_after = img.allocated_host_clusters()?;
    let after = img.host_usage()?;
    Ok(CompactReport {
        before,
        after,
        allocated_clusters_before,
        allocated_clusters_after,
        zero_clusters_reclaimed: stats.zero_clusters_reclaimed,
        clusters_moved: stats.clusters_moved,
    })
}
