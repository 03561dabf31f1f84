//! Moving clusters down so the file's tail can be cut off: online (after frees, while the
//! guest runs: tail metadata, shared zero clusters and a budget of data clusters, then the
//! free tail truncated) and offline (`compact`, which uses the same moves for everything).
//! Every move writes the new copy and its refcount before the reference changes, and frees
//! the old place only after.

use std::collections::{HashMap, HashSet};

use super::cluster::Mapping;
use super::compressed::CompressedExtent;
use super::entry::{
    read_l2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
    REFT_OFFSET_MASK, RESERVED_HIGH,
};
use super::image::Qcow2Image;
use super::pending::FreeReason;
use crate::cast::usize_from;
use crate::error::{Error, Result};

/// Online tail relocation starts once the file has this much free space inside it.
const TAIL_SLACK_BYTES: u64 = 1 << 20;

/// Data clusters moved per round of online tail relocation.
const TAIL_MOVE_BUDGET: u64 = 1024;

/// Where the active image references a host cluster from.
pub(crate) enum Owner {
    /// Data referenced by these guest clusters.
    Data(Vec<u64>),
    /// Holds (part of) compressed data, or is otherwise not movable here.
    Pinned,
}

impl Qcow2Image {
    /// Moves metadata out of the file's tail into free clusters lower down and truncates the
    /// free tail, so the file's apparent size shrinks.
    pub(crate) fn shrink_tail(&mut self) -> Result<()> {
        if self.read_only || self.free_map.is_none() {
            return Ok(());
        }
        // Move what sits in the tail (metadata first, then data) while the file has a
        // worthwhile amount of free space inside it.
        for _ in 0..16 {
            self.relocate_tail_metadata()?;
            let fm = self.fm()?;
            let slack = fm.end().saturating_sub(fm.used_count()) * self.cluster_size;
            if slack < TAIL_SLACK_BYTES || self.relocate_tail_data(TAIL_MOVE_BUDGET)? == 0 {
                break;
            }
        }
        let end = self.fm()?.end();
        let new_len = end * self.cluster_size;
        if self.file_len > new_len {
            // Decrements must be durable before the clusters disappear.
            self.write_dirty_refblocks()?;
            self.sync()?;
            self.rc_unsynced = false;
            self.file
                .set_len(new_len)
                .map_err(|e| Error::io("truncate qcow2 image", e))?;
            self.file_len = new_len;
        }
        Ok(())
    }

    /// While the last used cluster is an L2 table or a refcount block and a free cluster
    /// exists below it, move it down.
    pub(crate) fn relocate_tail_metadata(&mut self) -> Result<()> {
        for _ in 0..4096 {
            let fm = self.fm()?;
            let end = fm.end();
            if end == 0 {
                return Ok(());
            }
            let top = end - 1;
            let first_free = fm.first_free();
            if first_free >= top {
                return Ok(());
            }
            let top_off = top * self.cluster_size;
            if !self.meta.contains(&top) {
                // The only data cluster worth moving online: a shared zero cluster.
                if self.zero_clusters.contains(top_off) && self.move_zero_cluster(top)? {
                    continue;
                }
                return Ok(());
            }
            if !self.move_table_cluster(top)? {
                // L1 table, refcount table, snapshot metadata: left where they are.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Moves a shared zero cluster (v2 overlays) to the lowest free cluster, rewriting every
    /// reference (as any data cluster moves). Returns false when not all references are in
    /// the active tables.
    pub(crate) fn move_zero_cluster(&mut self, old: u64) -> Result<bool> {
        let rc = self.refcount(old)?;
        let refs = self.active_data_references(old * self.cluster_size, false)?;
        if refs.len() as u64 != rc || rc == 0 {
            return Ok(false);
        }
        let gcs: Vec<u64> = refs.iter().map(|&(gc, _)| gc).collect();
        self.move_data_cluster(old, &gcs)?;
        self.commit_frees()?;
        Ok(true)
    }

    /// Moves the active L2 table or the refcount block at cluster `top` to the lowest free
    /// cluster (online and offline relocation alike); false when `top` is neither (the L1
    /// table, the refcount table, snapshot metadata, a shared L2 table).
    pub(crate) fn move_table_cluster(&mut self, top: u64) -> Result<bool> {
        let top_off = top * self.cluster_size;
        if let Some(l1_idx) = self
            .l1
            .iter()
            .position(|&e| e & L1E_OFFSET_MASK == top_off && e & OFLAG_COPIED != 0)
        {
            self.move_l2_table(l1_idx, top)?;
            return Ok(true);
        }
        if let Some(ti) = self
            .reftable
            .iter()
            .position(|&e| e & REFT_OFFSET_MASK == top_off)
        {
            self.move_refblock(ti, top)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Before a metadata cluster moves (its old place is freed and punched): it must be what
    /// the move takes it for and nothing else, named by exactly `l1_refs` L1 entries and
    /// `rt_refs` refcount table entries, outside the tables the header points at, with
    /// refcount 1. Anything else is a corruption, not a move.
    pub(crate) fn check_movable(
        &mut self,
        old: u64,
        what: &str,
        l1_refs: usize,
        rt_refs: usize,
    ) -> Result<()> {
        let off = old * self.cluster_size;
        let by_l1 = self
            .l1
            .iter()
            .filter(|&&e| e & L1E_OFFSET_MASK == off)
            .count();
        let by_rt = self
            .reftable
            .iter()
            .filter(|&&e| e & REFT_OFFSET_MASK == off)
            .count();
        let fixed = self.fixed_metadata().iter().any(|r| r.contains(&old));
        let rc = self.refcount(old)?;
        if by_l1 != l1_refs || by_rt != rt_refs || fixed || rc != 1 {
            return Err(self.corruption(format!(
                "{what} at {off:#x} cannot move: named by {by_l1} L1 and {by_rt} refcount table entries, refcount {rc}{}",
                if fixed { ", inside the header's tables" } else { "" }
            )));
        }
        Ok(())
    }

    /// Moves the L2 table of L1 entry `l1_idx` (at cluster `old`) to the lowest free cluster.
    pub(crate) fn move_l2_table(&mut self, l1_idx: usize, old: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let old_off = old * cs;
        self.check_l2_offset(l1_idx, self.l1[l1_idx])?;
        self.check_movable(old, "L2 table", 1, 0)?;
        let slot = self.load_l2(old_off)?;
        let (new, _) = self.alloc_clusters(1)?;
        let new_off = new * cs;
        self.write_dirty_refblocks()?;
        self.order_after_refcounts()?;
        let data = self.l2_cache.data(slot).to_vec();
        self.pwrite(&data, new_off, "L2 table")?;
        self.l2_cache.rebind(slot, new_off);
        self.l2_cache.mark_clean(slot);
        self.meta.insert(new);
        self.l1[l1_idx] = new_off | OFLAG_COPIED;
        self.write_l1_entry(l1_idx)?;
        self.meta.remove(&old);
        self.set_refcount(old, 0)?;
        self.punch_clusters(old, 1)?;
        Ok(new)
    }

    /// Moves refcount block `ti` (at cluster `old`) to the lowest free cluster.
    pub(crate) fn move_refblock(&mut self, ti: usize, old: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let old_off = old * cs;
        self.check_movable(old, "refcount block", 0, 1)?;
        self.load_refblock(ti, old_off)?;
        let (new, _) = self.alloc_clusters(1)?;
        let new_off = new * cs;
        // The block may have been evicted by the allocation; load it again.
        let slot = self.load_refblock(ti, old_off)?;
        self.write_dirty_refblocks()?;
        let data = self.rc_cache.data(slot).to_vec();
        self.order_after_l2()?;
        self.pwrite(&data, new_off, "refcount block")?;
        self.sync()?;
        self.rc_unsynced = false;
        self.reftable[ti] = new_off;
        let rt_off = self.header.refcount_table_offset + ti as u64 * 8;
        self.pwrite(&new_off.to_be_bytes(), rt_off, "refcount table entry")?;
        self.l2_unsynced = true;
        self.rc_cache.rebind(slot, new_off);
        self.meta.insert(new);
        self.meta.remove(&old);
        self.set_refcount(old, 0)?;
        self.punch_clusters(old, 1)?;
        Ok(new)
    }

    /// Who references the host clusters `wanted` accepts, from the active L1 table: every L1
    /// entry, and every L2 entry that names a wanted cluster or is malformed, is validated
    /// first (a bad one is a corruption: the image is marked corrupt and nothing is moved;
    /// compaction wants every cluster, so it validates every entry); each L2 table is read
    /// once, and the clusters
    /// of a table that several L1 entries name are pinned (moving them would need every
    /// naming entry rewritten).
    pub(crate) fn active_references(
        &mut self,
        wanted: &dyn Fn(u64) -> bool,
    ) -> Result<HashMap<u64, Owner>> {
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
            for j in 0..usize_from(self.l2_entries) {
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
    pub(crate) fn move_data_cluster(&mut self, old: u64, gcs: &[u64]) -> Result<u64> {
        let cs = self.cluster_size;
        let rc = self.refcount(old)?;
        let (new, _) = self.alloc_clusters(1)?;
        if rc > 1 {
            self.set_refcount(new, rc)?;
        }
        let mut buf = vec![0u8; usize_from(cs)];
        super::table_read::read_exact_or_eof(&self.file, &mut buf, old * cs)?;
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
        self.zero_clusters.rehost(old * cs, new * cs);
        for _ in 0..rc {
            self.queue_free(old, true, FreeReason::Internal);
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use crate::disk::DiskImage;
    use crate::format::ImageFormat;
    use crate::qcow2::create::{create, CreateOptions, Qcow2Version};
    use crate::qcow2::image::Qcow2Image;

    /// A v2 overlay over a backing file of 0x55 bytes: its data clusters zeroed one after
    /// the other end up mapped to one shared zero cluster allocated at the end of the file.
    /// Online tail relocation moves that cluster down (rewriting every reference) so the
    /// file can be cut to its metadata and the one zero cluster.
    #[test]
    fn the_shared_zero_cluster_moves_down_and_the_file_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x55u8; 2 << 20]).unwrap();
        let path = dir.path().join("v2.qcow2");
        let opts = CreateOptions {
            size: Some(2 << 20),
            version: Qcow2Version::V2,
            backing_file: Some(base.to_string_lossy().into_owned()),
            backing_format: Some(ImageFormat::Raw),
            ..CreateOptions::default()
        };
        create(&path, &opts).unwrap();
        let mut img = Qcow2Image::open(&path, false).unwrap();
        let cs = img.cluster_size;
        // Less than TAIL_SLACK_BYTES is freed: no data cluster moves, only the zero cluster.
        let n = 8;
        img.write_at(0, &vec![0xaau8; usize::try_from(n * cs).unwrap()])
            .unwrap();
        img.flush().unwrap();
        let full = img.file_len / cs;
        // The last data cluster becomes the zero cluster in place; the next one moves both
        // references to a fresh zero cluster at the end of the file; the rest share it.
        for gc in (0..n).rev() {
            img.write_zeroes(gc * cs, cs, true).unwrap();
        }
        img.flush().unwrap();
        let zero = img.zero_clusters.to_vec();
        assert_eq!(zero.len(), 1, "{zero:?}");
        let zero = zero[0].host / cs;
        assert_eq!(img.refcount(zero).unwrap(), n);
        assert!(
            img.file_len / cs < full - n + 2,
            "file cut to metadata and the zero cluster: {} clusters (was {full})",
            img.file_len / cs
        );
        assert!(zero < img.file_len / cs);
        let mut buf = vec![1u8; usize::try_from(n * cs + cs).unwrap()];
        img.read_at(0, &mut buf).unwrap();
        let (zeroed, beyond) = buf.split_at(usize::try_from(n * cs).unwrap());
        assert!(zeroed.iter().all(|&b| b == 0), "zeroed clusters read zeros");
        assert!(
            beyond.iter().all(|&b| b == 0x55),
            "the rest reads the backing file"
        );
        drop(img);
        let mut img = Qcow2Image::open_for_repair(&path).unwrap();
        let report = img.check(None).unwrap();
        assert_eq!(report.corruptions, 0, "{report:?}");
        assert_eq!(report.leaks, 0, "{report:?}");
    }
}
