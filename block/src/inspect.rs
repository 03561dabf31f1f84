//! Whole-image inspection and maintenance: `info`, `check`/`repair`, and (later) `compact`.
//! Placeholder API until the qcow2 driver lands; the types are the contract for the image tool.

use std::path::Path;

use crate::{probe_format, Error, HostUsage, ImageFormat, Result};

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

/// Reads the information of an image and of every layer below it (first element: `path`).
pub fn info_chain(path: &Path) -> Result<Vec<ImageInfo>> {
    match probe_format(path)? {
        ImageFormat::Raw => {
            let img = crate::raw::RawImage::open(path, true)?;
            Ok(vec![ImageInfo {
                filename: path.display().to_string(),
                format: ImageFormat::Raw,
                virtual_size: crate::DiskImage::virtual_size(&img),
                usage: crate::DiskImage::host_usage(&img)?,
                cluster_size: None,
                backing_filename: None,
                full_backing_filename: None,
                backing_filename_format: None,
                qcow2: None,
            }])
        }
        ImageFormat::Qcow2 => Err(Error::Unsupported(
            "qcow2 info is not implemented yet".into(),
        )),
    }
}

/// Which problems `check` may repair, as `qemu-img check -r leaks|all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    Leaks,
    All,
}

/// The result of a consistency check, with `qemu-img check --output=json`'s fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    /// Refcounts too low, L2 entries pointing at invalid places, overlapping metadata ...
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// Errors that prevented checking part of the image.
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// One human-readable line per problem found (`ERROR ...`, `Leaked cluster ...`).
    pub messages: Vec<String>,
}

/// Checks (and with `repair`, repairs) an image.
pub fn check(path: &Path, _repair: Option<RepairMode>) -> Result<CheckReport> {
    match probe_format(path)? {
        ImageFormat::Raw => Err(Error::Unsupported(
            "raw images have no metadata to check".into(),
        )),
        ImageFormat::Qcow2 => Err(Error::Unsupported(
            "qcow2 check is not implemented yet".into(),
        )),
    }
}

/// What `compact` did (issue 3).
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
/// file can be truncated. `progress(done, total)` is called as work proceeds.
pub fn compact(path: &Path, _progress: &mut dyn FnMut(u64, u64)) -> Result<CompactReport> {
    Err(Error::Unsupported(format!(
        "{}: compact is not implemented yet",
        path.display()
    )))
}
