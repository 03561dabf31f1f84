//! Offline reclamation (`thinvm image compact`): all-zero clusters become zero/unallocated
//! entries, freed space is punched, and clusters in the file's tail (data and metadata) are
//! moved into free clusters lower down so the file can be truncated.

use std::collections::{HashMap, HashSet};

use super::cluster::Mapping;
use super::entry::L1E_OFFSET_MASK;
use super::image::Qcow2Image;
use super::pending::{FreeReason, PENDING_FREE_BYTES};
use super::relocate::Owner;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::zero::is_zero;

/// What a compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    pub zero_clusters_reclaimed: u64,
    pub clusters_moved: u64,
}

impl Qcow2Image {
    /// Number of allocated host clusters (refcount > 0).
    pub fn allocated_host_clusters(&mut self) -> Result<u64> {
        self.ensure_free_map()?;
        Ok(self.free_map.as_ref().map_or(0, |f| f.used_count()))
    }

    /// Runs the offline compaction. `progress(done, total)` is called as work proceeds.
    pub fn compact(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.flush_all()?;
        let cs = self.cluster_size;
        let guest_clusters = self.header.size.div_ceil(cs);
        let mut stats = CompactStats::default();
        let total = guest_clusters * 2;
        let mut buf = vec![0u8; usize_from(cs)];

        // 1. Zero scan.
        let mut gc = 0;
        while gc < guest_clusters {
            let l1_idx = usize_from(gc / self.l2_entries);
            if self
                .l1
                .get(l1_idx)
                .is_none_or(|&e| e & L1E_OFFSET_MASK == 0)
            {
                gc = (l1_idx as u64 + 1) * self.l2_entries;
                progress(gc.min(guest_clusters), total);
                continue;
            }
            let m = self.mapping(gc)?;
            let candidate = match m {
                Mapping::Data { host, .. } => !self.zero_clusters.contains(host),
                Mapping::Compressed(_) => true,
                _ => false,
            };
            if candidate {
                self.read_cluster(gc, m, &mut buf)?;
                if is_zero(&buf) {
                    self.make_cluster_zero(gc, true, FreeReason::ZeroDetect)?;
                    stats.zero_clusters_reclaimed += 1;
                }
                if self.pending_free_bytes() >= PENDING_FREE_BYTES {
                    self.commit_frees()?;
                }
            }
            gc += 1;
            if gc % 4096 == 0 {
                progress(gc, total);
            }
        }
        self.commit_frees()?;
        progress(guest_clusters, total);

        // 2. Relocation, from the top of the file down.
        self.ensure_free_map()?;
        let mut owners = self.reverse_map()?;
        let mut moves_since_commit = 0u64;
        let to_move_estimate = {
            let fm = self
                .free_map
                .as_mut()
                .ok_or_else(|| Error::InvalidImage("no free map".into()))?;
            fm.end().saturating_sub(fm.used_count())
        };
        // Clusters moved away but still counted as used until their free is committed.
        let mut moved_away: HashSet<u64> = HashSet::new();
        loop {
            let fm = self
                .free_map
                .as_mut()
                .ok_or_else(|| Error::InvalidImage("no free map".into()))?;
            let mut top = fm.end();
            let top = loop {
                match fm.prev_used(top) {
                    Some(t) if moved_away.contains(&t) => top = t,
                    other => break other,
                }
            };
            let Some(top) = top else { break };
            let first_free = fm.first_free();
            if first_free >= top {
                break;
            }
            let top_off = top * cs;
            let moved = if self.meta.contains(&top) {
                self.move_metadata_cluster(top)?
            } else {
                match owners.remove(&top) {
                    Some(Owner::Data(gcs)) if self.refcount(top)? != gcs.len() as u64 => {
                        // More references than the refcount says is a corruption; fewer
                        // (an internal snapshot's, or a leak) pins the cluster.
                        let rc = self.refcount(top)?;
                        if rc < gcs.len() as u64 {
                            return Err(self.corruption(format!(
                                "compact: cluster at {top_off:#x} has {} references but refcount {rc}",
                                gcs.len()
                            )));
                        }
                        owners.insert(top, Owner::Pinned);
                        false
                    }
                    Some(Owner::Data(gcs)) => {
                        let new = self.move_data_cluster(top, &gcs)?;
                        moved_away.insert(top);
                        owners.insert(new, Owner::Data(gcs));
                        true
                    }
                    Some(Owner::Pinned) => {
                        owners.insert(top, Owner::Pinned);
                        false
                    }
                    None => {
                        tracing::warn!(
                            "compact: cluster at {top_off:#x} has no active reference (leaked or snapshot data); stopping relocation there"
                        );
                        false
                    }
                }
            };
            if !moved {
                break;
            }
            stats.clusters_moved += 1;
            moves_since_commit += 1;
            if moves_since_commit >= 1024 {
                self.commit_frees()?;
                moved_away.clear();
                moves_since_commit = 0;
            }
            progress(
                guest_clusters
                    + (stats.clusters_moved * guest_clusters / to_move_estimate.max(1))
                        .min(guest_clusters),
                total,
            );
        }
        self.flush_all()?;
        progress(total, total);
        Ok(stats)
    }

    /// Host cluster -> who references it, for every active data / compressed reference.
    pub(crate) fn reverse_map(&mut self) -> Result<HashMap<u64, Owner>> {
        self.active_references(&|_| true)
    }

    /// Moves the metadata cluster `top` down; false when it cannot be moved.
    pub(crate) fn move_metadata_cluster(&mut self, top: u64) -> Result<bool> {
        let cs = self.cluster_size;
        if self.move_table_cluster(top)? {
            return Ok(true);
        }
        let l1_first = self.header.l1_table_offset / cs;
        let l1_n = (u64::from(self.header.l1_size) * 8).div_ceil(cs);
        if self.header.l1_size > 0 && (l1_first..l1_first + l1_n).contains(&top) {
            return self.move_l1_table();
        }
        let rt_first = self.header.refcount_table_offset / cs;
        let rt_n = u64::from(self.header.refcount_table_clusters);
        if (rt_first..rt_first + rt_n).contains(&top) {
            return self.move_reftable();
        }
        Ok(false)
    }

    /// Moves the active L1 table to the lowest free run that fits it.
    pub(crate) fn move_l1_table(&mut self) -> Result<bool> {
        let cs = self.cluster_size;
        let n = (u64::from(self.header.l1_size) * 8).div_ceil(cs);
        let old_first = self.header.l1_table_offset / cs;
        let start = self.alloc_contiguous(n)?;
        if start >= old_first {
            for c in start..start + n {
                self.set_refcount(c, 0)?;
            }
            return Ok(false);
        }
        let mut raw = Vec::with_capacity(usize_from(n * cs));
        for e in &self.l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize(usize_from(n * cs), 0);
        self.write_dirty_refblocks()?;
        self.order_after_refcounts()?;
        self.pwrite(&raw, start * cs, "L1 table")?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.pwrite(&(start * cs).to_be_bytes(), 40, "header (L1 table pointer)")?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.rc_unsynced = false;
        self.l2_unsynced = false;
        self.header.l1_table_offset = start * cs;
        for c in start..start + n {
            self.meta.insert(c);
        }
        for c in old_first..old_first + n {
            self.meta.remove(&c);
            self.set_refcount(c, 0)?;
        }
        Ok(true)
    }

    /// Moves the refcount table to the lowest free run that fits it.
    pub(crate) fn move_reftable(&mut self) -> Result<bool> {
        let cs = self.cluster_size;
        let n = u64::from(self.header.refcount_table_clusters);
        let old_first = self.header.refcount_table_offset / cs;
        let start = self.alloc_contiguous(n)?;
        if start >= old_first {
            for c in start..start + n {
                self.set_refcount(c, 0)?;
            }
            return Ok(false);
        }
        self.write_dirty_refblocks()?;
        let mut raw = Vec::with_capacity(usize_from(n * cs));
        for e in &self.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize(usize_from(n * cs), 0);
        self.pwrite(&raw, start * cs, "refcount table")?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.pwrite(
            &(start * cs).to_be_bytes(),
            48,
            "header (refcount table pointer)",
        )?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync qcow2 image", e))?;
        self.rc_unsynced = false;
        self.l2_unsynced = false;
        self.header.refcount_table_offset = start * cs;
        for c in start..start + n {
            self.meta.insert(c);
        }
        for c in old_first..old_first + n {
            self.meta.remove(&c);
            self.set_refcount(c, 0)?;
        }
        Ok(true)
    }
}
