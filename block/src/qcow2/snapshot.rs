//! The internal snapshot table: read and validated at open against QEMU's caps (65536
//! snapshots, 64 MiB of table, 1 KiB of extra data per entry, 32 MiB per L1 table), so the
//! whole-image walks (check, refcount rebuild) and compaction know every snapshot's L1 table
//! without trusting a single length from the file. Snapshots are kept, never created, applied
//! or deleted here.

use super::header::{
    table_end, Header, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
    SNAPSHOT_ENTRY_FIXED,
};
use super::table_read::read_exact_or_eof;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::host_file::HostFile;

/// The L1 table of one internal snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotL1 {
    /// Host offset (cluster aligned; 0 only when `size` is 0).
    pub offset: u64,
    /// Number of entries (at most QEMU's 32 MiB worth).
    pub size: u32,
}

impl SnapshotL1 {
    /// Bytes of the table.
    pub fn bytes(&self) -> u64 {
        u64::from(self.size) * 8
    }
}

/// The snapshot table as read at open.
#[derive(Clone, Debug, Default)]
pub struct SnapshotTable {
    /// One entry per snapshot, in table order.
    pub l1_tables: Vec<SnapshotL1>,
    /// Bytes the table occupies from `snapshots_offset` (entries with their padding).
    pub bytes: u64,
}

fn invalid(msg: String) -> Error {
    Error::InvalidImage(msg)
}

/// Reads the table in growing windows: small tables cost one small read, hostile ones at
/// most [`MAX_SNAPSHOT_TABLE_BYTES`].
struct Window<'f> {
    file: &'f HostFile,
    start: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    /// The `len` bytes at `pos` (relative to the table start), within the table's cap.
    fn get(&mut self, pos: u64, len: u64) -> Result<&[u8]> {
        let end = pos.saturating_add(len);
        if end > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(invalid(format!(
                "snapshot table larger than {} MiB (QEMU's limit)",
                MAX_SNAPSHOT_TABLE_BYTES >> 20
            )));
        }
        if end > self.buf.len() as u64 {
            let old = self.buf.len();
            let want = end
                .max(old as u64 * 2)
                .clamp(64 << 10, MAX_SNAPSHOT_TABLE_BYTES);
            self.buf.resize(want as usize, 0);
            read_exact_or_eof(self.file, &mut self.buf[old..], self.start + old as u64)?;
        }
        Ok(&self.buf[usize_from(pos)..usize_from(end)])
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads and validates the snapshot table the header describes (bytes past the end of the
/// file read as zeros).
pub(crate) fn read_snapshot_table(file: &HostFile, header: &Header) -> Result<SnapshotTable> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(SnapshotTable::default());
    }
    let cs = header.cluster_size();
    let mut win = Window {
        file,
        start: header.snapshots_offset,
        buf: Vec::new(),
    };
    let mut pos = 0u64;
    let mut l1_tables = Vec::with_capacity(n.min(4096) as usize);
    for i in 0..n {
        let fixed = win.get(pos, SNAPSHOT_ENTRY_FIXED)?;
        let mut off8 = [0u8; 8];
        off8.copy_from_slice(&fixed[0..8]);
        let l1 = SnapshotL1 {
            offset: u64::from_be_bytes(off8),
            size: be32(fixed, 8),
        };
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = be32(fixed, 36);
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(invalid(format!(
                "snapshot {i}: {extra} bytes of extra data (QEMU's limit is {MAX_SNAPSHOT_EXTRA_DATA})"
            )));
        }
        if l1.bytes() > MAX_L1_BYTES {
            return Err(invalid(format!(
                "snapshot {i}: L1 table of {} entries, larger than {} MiB",
                l1.size,
                MAX_L1_BYTES >> 20
            )));
        }
        if l1.offset % cs != 0 || (l1.size > 0 && l1.offset < cs) {
            return Err(invalid(format!(
                "snapshot {i}: L1 table offset {:#x} invalid (in the header or not cluster aligned)",
                l1.offset
            )));
        }
        if table_end(l1.offset, l1.bytes()).is_none() {
            return Err(invalid(format!(
                "snapshot {i}: L1 table at {:#x} with {} entries ends beyond the maximum image size (2^56)",
                l1.offset, l1.size
            )));
        }
        let entry = (SNAPSHOT_ENTRY_FIXED + u64::from(extra) + id_len + name_len).div_ceil(8) * 8;
        // The whole entry must fit the table's cap too (an id or name may reach 64 KiB).
        win.get(pos, entry)?;
        pos += entry;
        l1_tables.push(l1);
    }
    Ok(SnapshotTable {
        l1_tables,
        bytes: pos,
    })
}
