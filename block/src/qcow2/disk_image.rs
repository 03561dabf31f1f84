//! [`DiskImage`] for qcow2: requests checked and dispatched to the planner, the mapping and
//! the zeroing code, and what a failed request leaves the image fit for.

use super::image::Qcow2Image;
use super::pending::{FreeReason, PENDING_FREE_BYTES};
use crate::disk::DiskImage;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::iobuf::IoBuf;
use crate::plan::Plan;
use crate::status::{HostUsage, MapExtent, ReclaimStats};
use crate::zero::DetectZeroes;

impl DiskImage for Qcow2Image {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        crate::disk::check_range(offset, crate::iobuf::total_len(bufs), self.header.size)?;
        let mut plan = Plan::default();
        self.plan_read_into(offset, bufs, &mut plan, 0)?;
        Ok(plan)
    }

    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        self.check_writable()?;
        crate::disk::check_range(offset, crate::iobuf::total_len(bufs), self.header.size)?;
        let r = self.plan_write_inner(offset, bufs);
        match r {
            Ok(plan) => Ok(plan),
            Err(e) => self.after_error(Err(e)).map(|()| Plan::default()),
        }
    }

    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()> {
        if !plan.is_write() {
            return data;
        }
        let r = self.finish_write(plan, data);
        self.after_error(r)
    }

    fn lock_unit(&self) -> u64 {
        self.cluster_size.max(crate::host_file::DIRECT_ALIGN)
    }

    fn needs_drain(&self) -> bool {
        !self.read_only && self.pending_free_bytes() >= PENDING_FREE_BYTES
    }

    fn flush_completed(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let r = self.flush_metadata();
        self.after_error(r)
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let r = self.flush_all();
        self.after_request(r)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        crate::disk::check_range(offset, len, self.header.size)?;
        let r = self.zero_guest(offset, len, may_unmap, FreeReason::WriteZeroes);
        self.after_request(r)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        crate::disk::check_range(offset, len, self.header.size)?;
        // Whole clusters read as zeros afterwards, never as the backing file's data; pieces
        // of clusters read as zeros where the overlay holds the cluster by itself and as
        // before elsewhere (a discard never allocates).
        let r = self.zero_guest(offset, len, true, FreeReason::Discard);
        self.after_request(r)
    }

    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<MapExtent> {
        crate::disk::check_range(offset, max_len, self.header.size)?;
        self.guest_block_status(offset, max_len)
    }

    fn set_detect_zeroes(&mut self, mode: DetectZeroes) {
        self.detect_zeroes = mode;
    }

    fn detect_zeroes(&self) -> DetectZeroes {
        self.detect_zeroes
    }

    fn reclaim_stats(&self) -> ReclaimStats {
        self.stats
    }

    fn host_usage(&self) -> Result<HostUsage> {
        HostUsage::of_file(&self.file)
    }

    fn discard_granularity(&self) -> u64 {
        self.cluster_size
    }

    fn idle(&mut self) -> Result<()> {
        if self.read_only || self.pending_frees.is_empty() {
            return Ok(());
        }
        let r = self.flush_all();
        self.after_request(r)
    }
}

impl Qcow2Image {
    pub(crate) fn check_writable(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.broken {
            return Err(Error::Corrupt(
                "an earlier write failed half-way; reopen the image".into(),
            ));
        }
        self.rewrite_tables_if_needed()
    }

    /// Post-processing of a discard or write-zeroes request (which run with no other I/O in
    /// flight): see [`Self::after_error`], and commit deferred frees in batches.
    pub(crate) fn after_request(&mut self, r: Result<()>) -> Result<()> {
        self.after_error(r)?;
        if self.pending_free_bytes() >= PENDING_FREE_BYTES {
            self.commit_frees()?;
            self.shrink_tail()?;
        }
        Ok(())
    }

    /// Marks the image unusable if a request failed half-way through metadata updates (or
    /// to be rewritten from memory when the host file system was full).
    pub(crate) fn after_error(&mut self, r: Result<()>) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e @ (Error::OutOfRange { .. } | Error::ReadOnly | Error::InvalidArgument(_))) => {
                Err(e)
            }
            Err(e @ Error::Corrupt(_)) => Err(e),
            Err(e) if e.is_no_space() => {
                // The host file system is full (ENOSPC, EDQUOT). A failed step allocated
                // space or wrote into new space before anything in memory pointed at it, so
                // the in-memory tables are consistent (at worst with leaked clusters) and the
                // image stays writable: the request can be retried once space is freed.
                // Cached tables stay dirty until written; the write-through ones (header, L1
                // and refcount tables) may now be ahead of the file, so they are written
                // again before the next change.
                self.rewrite_tables = true;
                Err(e)
            }
            Err(e) => {
                // An I/O error in the middle of an update: in-memory metadata may be ahead of
                // the file. Refuse further writes rather than risk corrupting it.
                self.broken = true;
                Err(e)
            }
        }
    }
}
