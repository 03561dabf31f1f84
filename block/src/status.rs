//! What an image reports about itself: host space given back ([`ReclaimStats`]), host
//! storage used ([`HostUsage`]) and the status of a guest range ([`MapExtent`]).

use crate::error::{Error, Result};
use crate::host_file::HostFile;

/// Counters of host space given back, by the path that gave it back (bytes of host clusters
/// released, not guest bytes requested).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimStats {
    /// Released because an ordinary write turned out to be all zeros.
    pub zero_detect_bytes: u64,
    /// Released by discard requests.
    pub discard_bytes: u64,
    /// Released by write-zeroes requests.
    pub write_zeroes_bytes: u64,
}

/// How much host storage the image file uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostUsage {
    /// Bytes of the file actually allocated on the host (`st_blocks * 512`, what `du` shows).
    pub allocated_bytes: u64,
    /// The file's apparent size (`st_size`, what `ls -l` shows).
    pub apparent_bytes: u64,
}

impl HostUsage {
    /// Reads the usage of an open file.
    pub fn of_file(file: &HostFile) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat image file", e))?;
        Ok(HostUsage {
            allocated_bytes: meta.blocks().saturating_mul(512),
            apparent_bytes: meta.size(),
        })
    }
}

/// The status of one guest-visible range, as `qemu-img map --output=json` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapExtent {
    /// Guest offset of the extent.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Depth in the backing chain where the data comes from (0 = this image). For ranges
    /// that no layer allocates, the depth of the last layer (the chain's length - 1) plus one
    /// if it is beyond every layer, as QEMU reports it.
    pub depth: u32,
    /// Whether some layer of the chain provides the data (false: unallocated everywhere).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range is backed by data in a file.
    pub data: bool,
    /// Host offset in the file of `depth` where the data lives, if it is stored uncompressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}
