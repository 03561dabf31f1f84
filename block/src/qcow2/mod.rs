//! qcow2 images (v2 and v3). Placeholder API until the qcow2 driver lands: the types and
//! function signatures here are the contract the image tool and the device layer code against.

use std::path::Path;

use crate::{Error, ImageFormat, Result};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// qcow2 format versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Qcow2Version {
    /// Version 2, `compat=0.10`.
    V2,
    /// Version 3, `compat=1.1` (QEMU's default).
    #[default]
    V3,
}

impl Qcow2Version {
    /// QEMU's `compat=` name of the version.
    pub fn compat_name(self) -> &'static str {
        match self {
            Qcow2Version::V2 => "0.10",
            Qcow2Version::V3 => "1.1",
        }
    }
}

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
pub fn create(path: &Path, _opts: &CreateOptions) -> Result<()> {
    Err(Error::Unsupported(format!(
        "{}: qcow2 creation is not implemented yet",
        path.display()
    )))
}

/// A qcow2 image.
pub struct Qcow2Image {
    _private: (),
}

impl Qcow2Image {
    /// Opens a qcow2 image (and its backing chain, read-only).
    pub fn open(path: &Path, _read_only: bool) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "{}: qcow2 is not implemented yet",
            path.display()
        )))
    }
}

impl crate::DiskImage for Qcow2Image {
    fn format(&self) -> crate::ImageFormat {
        crate::ImageFormat::Qcow2
    }
    fn virtual_size(&self) -> u64 {
        0
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn block_status(&mut self, _offset: u64, _max_len: u64) -> Result<crate::MapExtent> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn set_detect_zeroes(&mut self, _mode: crate::DetectZeroes) {}
    fn detect_zeroes(&self) -> crate::DetectZeroes {
        crate::DetectZeroes::Off
    }
    fn reclaim_stats(&self) -> crate::ReclaimStats {
        crate::ReclaimStats::default()
    }
    fn host_usage(&self) -> Result<crate::HostUsage> {
        Err(Error::Unsupported("qcow2".into()))
    }
    fn discard_granularity(&self) -> u64 {
        65536
    }
}
