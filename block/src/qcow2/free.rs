//! Deferred frees: a dropped reference's refcount decrement waits in
//! [`Qcow2Image::pending_frees`] until the L2 write that removed it is on disk, then is
//! applied in a batch (statistics, hole punching, COPIED flags of clusters that became
//! unshared, and moving the survivor of a shared cluster that loses one of two references).

use super::entry::OFLAG_COPIED;
use super::image::Qcow2Image;
use super::pending::{FreeReason, PendingFree};
use super::zero_clusters::ZeroCluster;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::zero::is_zero;

impl Qcow2Image {
    /// Queues a refcount decrement of host cluster `idx` until the L2 change that dropped the
    /// reference is on disk.
    pub(crate) fn queue_free(&mut self, idx: u64, punch: bool, reason: FreeReason) {
        self.pending_frees.push(PendingFree {
            cluster: idx,
            punch,
            reason,
        });
    }

    pub(crate) fn pending_free_bytes(&self) -> u64 {
        self.pending_frees.len() as u64 * self.cluster_size
    }

    /// Writes the L2 tables that dropped references, then applies the queued refcount
    /// decrements, punches holes for released clusters and fixes COPIED flags of clusters
    /// that became unshared.
    pub(crate) fn commit_frees(&mut self) -> Result<()> {
        if self.pending_frees.is_empty() {
            return Ok(());
        }
        self.ensure_free_map()?;
        self.write_dirty_refblocks()?;
        self.write_dirty_l2()?;
        let pending = std::mem::take(&mut self.pending_frees);
        let mut punch: Vec<u64> = Vec::new();
        // Decrements that would leave a shared cluster with a single reference wait until the
        // rest of the batch is applied (see `move_last_reference`).
        let mut unsharing: Vec<PendingFree> = Vec::new();
        for pf in pending {
            if self.refcount(pf.cluster)? == 2 && !unsharing.iter().any(|u| u.cluster == pf.cluster)
            {
                unsharing.push(pf);
                continue;
            }
            self.apply_free(pf, &mut punch)?;
        }
        for pf in unsharing {
            if self.refcount(pf.cluster)? == 2 {
                self.move_last_reference(pf.cluster, &mut punch)?;
            } else {
                // The other reference went in the same batch.
                self.apply_free(pf, &mut punch)?;
            }
        }
        punch.sort_unstable();
        punch.dedup();
        let mut i = 0;
        while i < punch.len() {
            let start = punch[i];
            let mut n = 1;
            while i + usize_from(n) < punch.len() && punch[i + usize_from(n)] == start + n {
                n += 1;
            }
            self.punch_clusters(start, n)?;
            i += usize_from(n);
        }
        Ok(())
    }

    /// Applies one queued refcount decrement: statistics, and the hole punch when the
    /// cluster becomes free.
    pub(crate) fn apply_free(&mut self, pf: PendingFree, punch: &mut Vec<u64>) -> Result<()> {
        let rc = self.refcount(pf.cluster)?;
        if rc == 0 {
            tracing::warn!(
                "{}: freeing cluster {} whose refcount is already 0",
                self.path.display(),
                pf.cluster
            );
            return Ok(());
        }
        self.set_refcount(pf.cluster, rc - 1)?;
        if rc == 1 {
            let bytes = self.cluster_size;
            match pf.reason {
                FreeReason::ZeroDetect => self.stats.zero_detect_bytes += bytes,
                FreeReason::Discard => self.stats.discard_bytes += bytes,
                FreeReason::WriteZeroes => self.stats.write_zeroes_bytes += bytes,
                FreeReason::Internal => {}
            }
            self.zero_clusters.remove(pf.cluster * self.cluster_size);
            if pf.punch {
                punch.push(pf.cluster);
            }
        }
        Ok(())
    }

    /// Shared cluster `cluster` (refcount 2) loses one of its two references. Its
    /// survivor would need COPIED the moment the refcount drops to 1, and no order of the two
    /// writes survives a crash in between (`qemu-img check` calls either mismatch a
    /// corruption). So an active survivor moves to a fresh copy first (allocated with
    /// refcount 1 and mapped with COPIED, refcount before L2 as for any allocation), and only
    /// then does the old cluster drop to 0 (after that L2 change is on disk). In practice the
    /// shared clusters are v2 zero clusters; others come from internal snapshots.
    pub(crate) fn move_last_reference(&mut self, cluster: u64, punch: &mut Vec<u64>) -> Result<()> {
        let cs = self.cluster_size;
        let host = cluster * cs;
        self.zero_clusters.remove(host);
        let Some(&(gc, entry)) = self.active_data_references(host, true)?.first() else {
            // The survivor is not in an active, exclusively owned L2 table (e.g. an internal
            // snapshot's, where COPIED does not apply): plain decrement.
            self.set_refcount(cluster, 1)?;
            return self.fix_copied_flag(cluster);
        };
        let mut data = vec![0u8; usize_from(cs)];
        super::table_read::read_exact_or_eof(&self.file, &mut data, host)?;
        let fresh = if is_zero(&data) {
            let fresh = self.new_zero_cluster(1)?;
            self.zero_clusters.insert(ZeroCluster {
                host: fresh,
                single_ref: Some(gc),
            });
            fresh
        } else {
            let (c, _) = self.alloc_clusters(1)?;
            self.pwrite(&data, c * cs, "copy of a shared cluster")?;
            c * cs
        };
        // Keep the entry's flags (v3's ZERO flag on an allocated cluster).
        self.set_l2_entry(
            gc,
            fresh | OFLAG_COPIED | (entry & super::entry::OFLAG_ZERO),
        )?;
        self.write_dirty_l2()?;
        // Ordered after the L2 write by `write_refblock_slot`.
        self.set_refcount(cluster, 0)?;
        punch.push(cluster);
        Ok(())
    }

    /// A shared cluster became exclusively owned: set COPIED on its remaining active L2
    /// reference (as `qemu-img check` requires), and stop using it as a shared zero cluster.
    pub(crate) fn fix_copied_flag(&mut self, cluster: u64) -> Result<()> {
        let host = cluster * self.cluster_size;
        self.zero_clusters.remove(host);
        if let Some(&(gc, e)) = self.active_data_references(host, true)?.first() {
            if e & OFLAG_COPIED == 0 {
                self.set_l2_entry(gc, e | OFLAG_COPIED)?;
            }
        }
        Ok(())
    }

    /// Releases the host space of `n` clusters starting at `start` (or zeroes it where the
    /// file system cannot punch holes, so stale data never lingers).
    pub(crate) fn punch_clusters(&mut self, start: u64, n: u64) -> Result<()> {
        let off = start * self.cluster_size;
        if off >= self.file_len {
            return Ok(());
        }
        let len = (n * self.cluster_size).min(self.file_len - off);
        if self.punch_supported {
            match self.file.punch_hole(off, len) {
                Ok(()) => return Ok(()),
                Err(e) if crate::host_file::is_unsupported(&e) => {
                    self.punch_supported = false;
                }
                Err(e) => return Err(Error::io("punch hole in qcow2 image", e)),
            }
        }
        // Fallback: the space stays allocated until the tail is truncated or the cluster is
        // reused; nothing more to do (freed clusters are never read).
        Ok(())
    }
}
