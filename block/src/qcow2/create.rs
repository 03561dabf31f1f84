//! Creating qcow2 images.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub use super::header::Qcow2Version;
use super::header::{self, CompressionType, Header};
use super::refblock::set_entry;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::format::ImageFormat;

/// Options for [`create`], with `qemu-img create -f qcow2 -o ...` meanings.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes; `None` takes the backing file's size (an error without one).
    pub size: Option<u64>,
    /// Cluster size in bytes, a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Format version.
    pub version: Qcow2Version,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (v2 allows only 16).
    pub refcount_bits: u32,
    /// Backing file name as stored in the header (relative names are resolved against the
    /// new image's directory).
    pub backing_file: Option<String>,
    /// Backing file format; `None` probes it (and records the probed format).
    pub backing_format: Option<ImageFormat>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: Qcow2Version::V3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Creates a new, empty qcow2 image (overwriting `path`).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cs} invalid: must be a power of two between 512 and 2M"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(Error::InvalidArgument(format!(
            "refcount_bits {rb} invalid: must be a power of two up to 64"
        )));
    }
    if opts.version == Qcow2Version::V2 && rb != 16 {
        return Err(Error::InvalidArgument(
            "compat=0.10 images only support refcount_bits=16".into(),
        ));
    }
    let refcount_order = rb.trailing_zeros();

    // Backing file: validate it opens, take its size and format.
    let mut backing_format = opts.backing_format;
    let mut backing_size = None;
    if let Some(name) = &opts.backing_file {
        if name.len() > header::MAX_BACKING_NAME as usize {
            return Err(Error::InvalidArgument(format!(
                "backing file name too long ({} bytes, limit {})",
                name.len(),
                header::MAX_BACKING_NAME
            )));
        }
        let bpath = super::resolve_backing_path(path, name);
        // A probed format is recorded, and so trusted from then on: the probe follows the
        // guest's rules (a probed qcow2 naming another file is refused, see `probe`).
        let img = crate::open::open(
            &bpath,
            &crate::options::OpenOptions {
                read_only: true,
                format: backing_format,
                probe: crate::probe::ProbePolicy::Guest,
                // Only its size is read, as `qemu-img create` does (which force-shares).
                force_share: true,
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            Error::Probe(msg) => Error::Probe(format!(
                "could not open backing file '{name}': {msg} (-F qcow2 when creating an overlay)"
            )),
            e => Error::Backing {
                what: "could not open backing file",
                name: name.to_string(),
                source: Box::new(e),
            },
        })?;
        backing_format = Some(img.format());
        backing_size = Some(img.virtual_size());
    }
    let size = match (opts.size, backing_size) {
        (Some(s), _) => s,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::InvalidArgument(
                "image size required (no backing file to take it from)".into(),
            ))
        }
    };
    // QEMU requires whole sectors.
    let size = size.div_ceil(512) * 512;

    let l1_entries = Header::l1_entries_for(size, cluster_bits);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(Error::InvalidArgument(format!(
            "image size {size} too large for cluster size {cs}"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let rb_entries = (cs * 8) >> refcount_order;
    // Self-consistent layout: header, refcount table, refcount blocks, L1 table.
    let mut rt_clusters = 1u64;
    let mut rb_count;
    loop {
        let mut total = 1 + rt_clusters + l1_clusters;
        rb_count = 1;
        loop {
            let need = (total + rb_count).div_ceil(rb_entries);
            if need <= rb_count {
                break;
            }
            rb_count = need;
        }
        total += rb_count;
        if rt_clusters * cs / 8 >= rb_count && total > 0 {
            break;
        }
        rt_clusters = (rb_count * 8).div_ceil(cs);
    }
    if rt_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::InvalidArgument(
            "image too large: refcount table would exceed 8 MiB".into(),
        ));
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total_clusters = 1 + rt_clusters + rb_count + l1_clusters;

    let mut h = Header {
        version: if opts.version == Qcow2Version::V2 {
            2
        } else {
            3
        },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: u32::try_from(l1_entries)
            .map_err(|_| Error::InvalidArgument("L1 table too large".into()))?,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: u32::try_from(rt_clusters)
            .map_err(|_| Error::InvalidArgument("refcount table too large".into()))?,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: if opts.version == Qcow2Version::V2 {
            header::V2_HEADER_LEN
        } else {
            header::V3_HEADER_LEN
        },
        compression_type: CompressionType::Deflate,
        backing_file: opts.backing_file.clone(),
        backing_format: if opts.backing_file.is_some() {
            backing_format
        } else {
            None
        },
        feature_names: Vec::new(),
        unknown_extensions: Vec::new(),
    };
    let hdr = h.serialize()?;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    // An existing file in use by another process is refused before it is truncated.
    let _lock = crate::lock::acquire(&file, path, crate::lock::LockMode::Create)?;
    let io = |e| Error::io(format!("write {}", path.display()), e);
    file.set_len(0).map_err(io)?;
    let mut image = vec![0u8; usize_from(total_clusters * cs)];
    image[..hdr.len()].copy_from_slice(&hdr);
    for i in 0..rb_count {
        let e = (rb_off + i * cs).to_be_bytes();
        let p = usize_from(rt_off + i * 8);
        image[p..p + 8].copy_from_slice(&e);
    }
    for c in 0..total_clusters {
        let block = usize_from(c / rb_entries);
        let start = usize_from(rb_off) + block * usize_from(cs);
        let blk = &mut image[start..start + usize_from(cs)];
        set_entry(blk, c % rb_entries, refcount_order, 1);
    }
    file.write_all_at(&image, 0).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}
