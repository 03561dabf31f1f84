//! The ordered writes every metadata (and data) write passes through: positioned writes that
//! track the file's length, fdatasyncs that keep refcount increases ahead of the L2/L1
//! entries that need them and L2/L1 removals ahead of refcount decreases, the header, and
//! the flushes that write every dirty table in that order.
//!
//! Write ordering, as QEMU's cache dependencies:
//! * a refcount increase reaches the file before any L2/L1 entry that depends on it;
//! * a refcount decrease reaches the file only after the L2/L1 write that removed the
//!   reference (frees are queued in [`Qcow2Image::pending_frees`] until then);
//! * an fdatasync separates the two classes of writes whenever the order matters, so a crash
//!   (process kill or power loss) can leak clusters but never leave a reference to a cluster
//!   whose refcount is too low.

use super::image::Qcow2Image;
use crate::error::{Error, Result};

impl Qcow2Image {
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))
    }

    /// Issues an fdatasync if refcount writes are not yet durable (before L2/L1 writes).
    pub(crate) fn order_after_refcounts(&mut self) -> Result<()> {
        if self.rc_unsynced {
            self.sync()?;
            self.rc_unsynced = false;
        }
        Ok(())
    }

    /// Issues an fdatasync if L2/L1 writes are not yet durable (before refcount writes that
    /// may carry decrements).
    pub(crate) fn order_after_l2(&mut self) -> Result<()> {
        if self.l2_unsynced {
            self.sync()?;
            self.l2_unsynced = false;
        }
        Ok(())
    }

    pub(crate) fn pwrite(&mut self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(format!("write {what}"), e))?;
        let end = offset + buf.len() as u64;
        if end > self.file_len {
            self.file_len = end;
        }
        Ok(())
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

    /// After a write that failed for lack of host space: writes the header, the L1 table and
    /// the refcount table from memory (refcount blocks first, as for any L1 change), so the
    /// file again holds what memory says.
    pub(crate) fn rewrite_tables_if_needed(&mut self) -> Result<()> {
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
