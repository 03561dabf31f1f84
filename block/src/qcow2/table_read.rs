//! Reads of the image file for metadata: [`read_exact_or_eof`], and [`TableReader`] for
//! whole-image walks that skip tables lying in holes.

use crate::error::{Error, Result};
use crate::host_file::HostFile;

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
        let next = match file.seek_data(offset) {
            Ok(Some(next)) => Some(next),
            // No data at or after `offset`.
            Ok(None) => Some(file_len),
            // SEEK_DATA unsupported (or an offset lseek cannot take): read.
            Err(_) => None,
        };
        if let Some(next) = next {
            if next > offset {
                self.hole = (offset, next);
            }
            if next >= end {
                return Ok(false);
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
