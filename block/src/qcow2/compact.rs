//! Offline reclamation (`thinvm image compact`): all-zero clusters become zero/unallocated
//! entries, freed space is punched, and clusters in the file's tail (data and metadata) are
//! moved into free clusters lower down so the file can be truncated.

use std::collections::{HashMap, HashSet};

use super::cluster::{read_l2, Mapping};
use super::compressed::CompressedExtent;
use super::refcount::FreeReason;
use super::{
    Qcow2Image, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
    RESERVED_HIGH,
};
use crate::error::{Error, Result};
use crate::zero::is_zero;

/// What a compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    pub zero_clusters_reclaimed: u64,
    pub clusters_moved: u64,
}

/// Where the active image references a host cluster from.
enum Owner {
    /// Data referenced by these guest clusters.
    Data(Vec<u64>),
    /// Holds (part of) compressed data, or is otherwise not movable here.
    Pinned,
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
        let mut buf = vec![0u8; cs as usize];

        // 1. Zero scan.
        let mut gc = 0;
        while gc < guest_clusters {
            let l1_idx = (gc / self.l2_entries) as usize;
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
                Mapping::Data { host, .. } => !self.zero_clusters.iter().any(|z| z.host == host),
                Mapping::Compressed(_) => true,
                _ => false,
            };
            if candidate {
                self.read_cluster(gc, m, &mut buf)?;
                if is_zero(&buf) {
                    self.make_cluster_zero(gc, true, FreeReason::ZeroDetect)?;
                    stats.zero_clusters_reclaimed += 1;
                }
                if self.pending_free_bytes() >= super::PENDING_FREE_BYTES {
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
    fn reverse_map(&mut self) -> Result<HashMap<u64, Owner>> {
        self.active_references(&|_| true)
    }

    /// Who references the host clusters `wanted` accepts, from the active L1 table: every L1
    /// entry, and every L2 entry that names a wanted cluster or is malformed, is validated
    /// first (a bad one is a corruption: the image is marked corrupt and nothing is moved;
    /// compaction wants every cluster, so it validates every entry); each L2 table is read
    /// once, and the clusters
    /// of a table that several L1 entries name are pinned (moving them would need every
    /// naming entry rewritten).
    fn active_references(&mut self, wanted: &dyn Fn(u64) -> bool) -> Result<HashMap<u64, Owner>> {
        let cs = self.cluster_size;
        let mut tables: HashMap<u64, (usize, u64)> = HashMap::new();
        for l1_idx in 0..self.l1.len() {
            let e = self.l1[l1_idx];
            if e & L1E_OFFSET_MASK == 0 {
                continue;
            }
            let off = self.check_l2_offset(l1_idx, e)?;
            tables.entry(off).or_insert((l1_idx, 0)).1 += 1;
        }
        let mut order: Vec<(u64, (usize, u64))> = tables.into_iter().collect();
        order.sort_unstable_by_key(|t| t.1 .0);
        let mut map: HashMap<u64, Owner> = HashMap::new();
        for (off, (l1_idx, naming)) in order {
            let slot = self.load_l2(off)?;
            let table = self.l2_cache.data(slot).to_vec();
            for j in 0..self.l2_entries as usize {
                let e = read_l2(&table, j);
                if e == 0 {
                    continue;
                }
                let gc = l1_idx as u64 * self.l2_entries + j as u64;
                // Entries that may name a wanted cluster are validated in full; the others
                // only for what needs no lookup (reserved bits, alignment, past the end).
                let host = e & L2E_OFFSET_MASK;
                let named = if e & OFLAG_COMPRESSED != 0 {
                    CompressedExtent::decode(
                        e & !(OFLAG_COMPRESSED | OFLAG_COPIED),
                        self.cluster_bits,
                    )
                    .clusters(self.cluster_bits)
                    .any(wanted)
                } else {
                    wanted(host / cs)
                };
                let odd = e & OFLAG_COMPRESSED == 0
                    && (e & RESERVED_HIGH != 0
                        || host % cs != 0
                        || (host >= self.file_len && e & OFLAG_ZERO == 0));
                if !named && !odd {
                    continue;
                }
                let m = self.classify(gc, e)?;
                let host = match m {
                    Mapping::Compressed(ext) => {
                        for c in ext.clusters(self.cluster_bits) {
                            if wanted(c) {
                                map.insert(c, Owner::Pinned);
                            }
                        }
                        continue;
                    }
                    Mapping::Data { host, .. }
                    | Mapping::Zero {
                        host: Some(host), ..
                    } => host,
                    Mapping::Zero { host: None, .. } | Mapping::Unallocated => continue,
                };
                let c = host / cs;
                if !wanted(c) {
                    continue;
                }
                if naming > 1 {
                    map.insert(c, Owner::Pinned);
                    continue;
                }
                match map.entry(c).or_insert_with(|| Owner::Data(Vec::new())) {
                    Owner::Data(v) => v.push(gc),
                    Owner::Pinned => {}
                }
            }
        }
        Ok(map)
    }

    /// Online shrinking: moves up to `budget` data clusters from the end of the file into
    /// free clusters lower down (highest first), so the tail can be truncated. Returns how
    /// many were moved. Stops at the first cluster that cannot be moved (compressed data,
    /// references from snapshots).
    pub(crate) fn relocate_tail_data(&mut self, budget: u64) -> Result<u64> {
        self.ensure_free_map()?;
        let pending: HashSet<u64> = self.pending_frees.iter().map(|p| p.cluster).collect();
        let mut candidates: Vec<u64> = Vec::new();
        {
            let fm = self
                .free_map
                .as_mut()
                .ok_or_else(|| Error::InvalidImage("no free map".into()))?;
            let first_free = fm.first_free();
            let mut c = fm.end();
            while (candidates.len() as u64) < budget {
                match fm.prev_used(c) {
                    Some(t) if t > first_free => {
                        c = t;
                        if !self.meta.contains(&t) && !pending.contains(&t) {
                            candidates.push(t);
                        }
                    }
                    _ => break,
                }
            }
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        let wanted: HashSet<u64> = candidates.iter().copied().collect();
        let refs = self.active_references(&|c| wanted.contains(&c))?;
        let mut moved = 0;
        for c in candidates {
            let Some(Owner::Data(gcs)) = refs.get(&c) else {
                break;
            };
            if self.refcount(c)? != gcs.len() as u64 {
                break; // referenced from a snapshot too
            }
            let first_free = self.free_map.as_mut().map_or(u64::MAX, |f| f.first_free());
            if first_free >= c {
                break;
            }
            let gcs = gcs.clone();
            self.move_data_cluster(c, &gcs)?;
            moved += 1;
        }
        self.commit_frees()?;
        Ok(moved)
    }

    /// Moves a data cluster referenced by `gcs` to the lowest free cluster.
    fn move_data_cluster(&mut self, old: u64, gcs: &[u64]) -> Result<u64> {
        let cs = self.cluster_size;
        let rc = self.refcount(old)?;
        let (new, _) = self.alloc_clusters(1)?;
        if rc > 1 {
            self.set_refcount(new, rc)?;
        }
        let mut buf = vec![0u8; cs as usize];
        super::read_exact_or_eof(&self.file, &mut buf, old * cs)?;
        self.pwrite(&buf, new * cs, "relocated data")?;
        let flag = if rc == 1 { OFLAG_COPIED } else { 0 };
        for &gc in gcs {
            // Keep every other flag of the entry (a preallocated zero cluster stays zero).
            let e = self.l2_entry(gc)?;
            if e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK != old * cs {
                return Err(self.corruption(format!(
                    "relocation: the L2 entry of guest cluster {gc} ({e:#x}) no longer names cluster {old}"
                )));
            }
            let ne = (e & !(L2E_OFFSET_MASK | OFLAG_COPIED)) | (new * cs) | flag;
            self.set_l2_entry(gc, ne)?;
        }
        for z in &mut self.zero_clusters {
            if z.host == old * cs {
                z.host = new * cs;
            }
        }
        for _ in 0..rc {
            self.queue_free(old, true, FreeReason::Internal);
        }
        Ok(new)
    }

    /// Moves the metadata cluster `top` down; false when it cannot be moved.
    fn move_metadata_cluster(&mut self, top: u64) -> Result<bool> {
        let cs = self.cluster_size;
        let top_off = top * cs;
        if let Some(i) = self
            .l1
            .iter()
            .position(|&e| e & L1E_OFFSET_MASK == top_off && e & OFLAG_COPIED != 0)
        {
            self.move_l2_table(i, top)?;
            return Ok(true);
        }
        if let Some(ti) = self
            .reftable
            .iter()
            .position(|&e| e & super::REFT_OFFSET_MASK == top_off)
        {
            self.move_refblock(ti, top)?;
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
    fn move_l1_table(&mut self) -> Result<bool> {
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
        let mut raw = Vec::with_capacity((n * cs) as usize);
        for e in &self.l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((n * cs) as usize, 0);
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
    fn move_reftable(&mut self) -> Result<bool> {
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
        let mut raw = Vec::with_capacity((n * cs) as usize);
        for e in &self.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((n * cs) as usize, 0);
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
