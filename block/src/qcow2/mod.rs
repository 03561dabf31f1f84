//! qcow2 images (v2 and v3). Placeholder until the qcow2 driver lands.

use std::path::Path;

use crate::{Error, Result};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// A qcow2 image.
pub struct Qcow2Image {
    _private: (),
}

impl Qcow2Image {
    /// Opens a qcow2 image.
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
