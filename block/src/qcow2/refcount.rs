//! Refcounts (every width from 1 to 64 bits), the cluster allocator with its free-space index,
//! refcount table growth, deferred frees, hole punching, metadata relocation and tail
//! truncation (QEMU's `qcow2-refcount.c`).
//!
//! Write ordering, as QEMU's cache dependencies:
//! * a refcount increase reaches the file before any L2/L1 entry that depends on it;
//! * a refcount decrease reaches the file only after the L2/L1 write that removed the
//!   reference (frees are queued in [`Qcow2Image::pending_frees`] until then);
//! * an fdatasync separates the two classes of writes whenever the order matters, so a crash
//!   (process kill or power loss) can leak clusters but never leave a reference to a cluster
//!   whose refcount is too low.

pub use super::free_map::FreeMap;
use super::{Qcow2Image, L1E_OFFSET_MASK, OFLAG_COPIED, REFT_OFFSET_MASK};
use crate::error::{Error, Result};
use crate::zero::is_zero;

/// Online tail relocation starts once the file has this much free space inside it.
const TAIL_SLACK_BYTES: u64 = 1 << 20;
/// Data clusters moved per round of online tail relocation.
const TAIL_MOVE_BUDGET: u64 = 1024;

/// Why a cluster is being freed (for the reclaim statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeReason {
    /// An ordinary write turned out to be zeros (detect-zeroes).
    ZeroDetect,
    Discard,
    WriteZeroes,
    /// Replaced by copy-on-write, relocation or other internal reasons.
    Internal,
}

/// A refcount decrement waiting for the L2 write that removed the reference.
#[derive(Clone, Copy, Debug)]
pub struct PendingFree {
    pub cluster: u64,
    pub punch: bool,
    pub reason: FreeReason,
}

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], index: u64, order: u32) -> u64 {
    let i = index as usize;
    match order {
        0 => u64::from((block[i / 8] >> (i % 8)) & 1),
        1 => u64::from((block[i / 4] >> (2 * (i % 4))) & 3),
        2 => u64::from((block[i / 2] >> (4 * (i % 2))) & 0xf),
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Calls `f(word, bits)` for each group of 64 entries (of the first `n` of `block`) that has
/// a nonzero entry, with bit `k` set where entry `64 * word + k` is nonzero. All-zero groups
/// are skipped a word at a time.
pub(crate) fn used_words(block: &[u8], order: u32, n: u64, mut f: impl FnMut(u64, u64)) {
    // Bytes that hold 64 entries.
    let group = 8usize << order;
    for (w, chunk) in block.chunks(group).enumerate() {
        let first = w as u64 * 64;
        if first >= n {
            break;
        }
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let mut bits = 0u64;
        for k in 0..(n - first).min(64) {
            if get_entry(block, first + k, order) != 0 {
                bits |= 1 << k;
            }
        }
        f(w as u64, bits);
    }
}

/// Writes entry `index`; returns the byte range touched `(pos, len)`.
pub fn set_entry(block: &mut [u8], index: u64, order: u32, value: u64) -> (usize, usize) {
    let i = index as usize;
    match order {
        0 => {
            let b = &mut block[i / 8];
            *b = (*b & !(1 << (i % 8))) | (((value & 1) as u8) << (i % 8));
            (i / 8, 1)
        }
        1 => {
            let sh = 2 * (i % 4);
            let b = &mut block[i / 4];
            *b = (*b & !(3 << sh)) | (((value & 3) as u8) << sh);
            (i / 4, 1)
        }
        2 => {
            let sh = 4 * (i % 2);
            let b = &mut block[i / 2];
            *b = (*b & !(0xf << sh)) | (((value & 0xf) as u8) << sh);
            (i / 2, 1)
        }
        3 => {
            block[i] = value as u8;
            (i, 1)
        }
        4 => {
            block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (2 * i, 2)
        }
        5 => {
            block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes());
            (4 * i, 4)
        }
        _ => {
            block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes());
            (8 * i, 8)
        }
    }
}

impl Qcow2Image {
    fn sync(&mut self) -> Result<()> {
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
    fn order_after_l2(&mut self) -> Result<()> {
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

    /// Validates a refcount block offset from the refcount table.
    fn check_refblock_offset(&mut self, ti: usize, off: u64) -> Result<()> {
        if off % self.cluster_size != 0 {
            return Err(
                self.corruption(format!("refcount block {ti} at unaligned offset {off:#x}"))
            );
        }
        if off < self.cluster_size || off >= super::header::MAX_HOST_OFFSET {
            return Err(self.corruption(format!("refcount block {ti} at invalid offset {off:#x}")));
        }
        if off >= self.file_len {
            return Err(self.corruption(format!(
                "refcount block {ti} at {off:#x} lies beyond the end of the file"
            )));
        }
        Ok(())
    }

    /// Loads the refcount block at `off` into the cache.
    pub(crate) fn load_refblock(&mut self, ti: usize, off: u64) -> Result<usize> {
        if let Some(slot) = self.rc_cache.lookup(off) {
            return Ok(slot);
        }
        self.check_refblock_offset(ti, off)?;
        let slot = self.rc_cache.victim();
        if self.rc_cache.is_dirty(slot) {
            self.write_refblock_slot(slot)?;
        }
        self.rc_cache.install(slot, off);
        let file = &self.file;
        super::read_exact_or_eof(file, self.rc_cache.data_mut(slot), off)?;
        Ok(slot)
    }

    /// Writes back the dirty parts of one cached refcount block.
    fn write_refblock_slot(&mut self, slot: usize) -> Result<()> {
        let Some(base) = self.rc_cache.offset_of(slot) else {
            return Ok(());
        };
        self.order_after_l2()?;
        for (pos, len) in self.rc_cache.dirty_ranges(slot) {
            let data = self.rc_cache.data(slot)[pos..pos + len].to_vec();
            self.pwrite(&data, base + pos as u64, "refcount block")?;
        }
        self.rc_cache.mark_clean(slot);
        self.rc_unsynced = true;
        Ok(())
    }

    /// Writes back every dirty refcount block.
    pub(crate) fn write_dirty_refblocks(&mut self) -> Result<()> {
        for slot in self.rc_cache.dirty_slots() {
            self.write_refblock_slot(slot)?;
        }
        Ok(())
    }

    /// Refcount of host cluster `idx` (0 where no refcount block covers it).
    pub fn refcount(&mut self, idx: u64) -> Result<u64> {
        let ti = (idx / self.rb_entries) as usize;
        let Some(&e) = self.reftable.get(ti) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let slot = self.load_refblock(ti, off)?;
        Ok(get_entry(
            self.rc_cache.data(slot),
            idx % self.rb_entries,
            self.header.refcount_order,
        ))
    }

    /// Sets the refcount of host cluster `idx` (in the cache), allocating refcount blocks
    /// and growing the refcount table as needed.
    pub(crate) fn set_refcount(&mut self, idx: u64, value: u64) -> Result<()> {
        if value > self.rc_max {
            return Err(Error::InvalidArgument(format!(
                "refcount overflow for cluster {idx} (maximum {})",
                self.rc_max
            )));
        }
        let ti = (idx / self.rb_entries) as usize;
        let covered = self
            .reftable
            .get(ti)
            .is_some_and(|&e| e & REFT_OFFSET_MASK != 0);
        if !covered {
            if value == 0 {
                return Ok(());
            }
            self.alloc_refblock(ti)?;
        }
        let off = self.reftable[ti] & REFT_OFFSET_MASK;
        let slot = self.load_refblock(ti, off)?;
        let order = self.header.refcount_order;
        let (pos, len) = set_entry(
            self.rc_cache.data_mut(slot),
            idx % self.rb_entries,
            order,
            value,
        );
        self.rc_cache.mark_dirty(slot, pos, len);
        if let Some(fm) = &mut self.free_map {
            if value > 0 {
                fm.set_used(idx);
            } else {
                fm.set_free(idx);
            }
        }
        Ok(())
    }

    /// Builds the free-space index from the refcount blocks (first allocation or free).
    pub(crate) fn ensure_free_map(&mut self) -> Result<()> {
        if self.free_map.is_some() {
            return Ok(());
        }
        self.write_dirty_refblocks()?;
        let cs = self.cluster_size as usize;
        let mut fm = FreeMap::default();
        let mut block = vec![0u8; cs];
        let order = self.header.refcount_order;
        // Clusters past the end of the file hold nothing (no mapping may point there), so
        // refcounts describing them are ignored, as `qemu-img check` does; this also bounds
        // the index by the file's size whatever a hostile refcount table says.
        let limit = self.file_len.div_ceil(self.cluster_size);
        let mut reader = super::TableReader::default();
        let mut seen = std::collections::HashMap::new();
        for ti in 0..self.reftable.len() {
            let off = self.reftable[ti] & REFT_OFFSET_MASK;
            let base = ti as u64 * self.rb_entries;
            if off == 0 || base >= limit {
                continue;
            }
            self.check_refblock_offset(ti, off)?;
            if let Some(first) = seen.insert(off, ti) {
                return Err(self.corruption(format!(
                    "refcount block {ti} at {off:#x} is also refcount block {first}"
                )));
            }
            if !reader.read(&self.file, self.file_len, &mut block, off)? {
                continue;
            }
            let n = self.rb_entries.min(limit - base);
            used_words(&block, order, n, |w, bits| fm.or_word(base / 64 + w, bits));
        }
        // Metadata must never be handed out even if its refcount is (wrongly) zero.
        for &m in &self.meta {
            if m < limit {
                fm.set_used(m);
            }
        }
        self.free_map = Some(fm);
        Ok(())
    }

    fn fm(&mut self) -> Result<&mut FreeMap> {
        self.ensure_free_map()?;
        self.free_map
            .as_mut()
            .ok_or_else(|| Error::InvalidImage("free-space index unavailable".into()))
    }

    /// Allocates up to `max` contiguous clusters at the lowest free position; returns the
    /// first cluster index and how many were allocated (at least one). Refcounts are set to 1
    /// in the cache.
    pub(crate) fn alloc_clusters(&mut self, max: u64) -> Result<(u64, u64)> {
        loop {
            let fm = self.fm()?;
            let start = fm.first_free();
            let n = fm.free_run(start, max.max(1)).max(1);
            if self.cover_range(start, n)? {
                // New refcount blocks took clusters: look again.
                continue;
            }
            return self.reserve(start, n).map(|()| (start, n));
        }
    }

    /// Allocates exactly `n` contiguous clusters (lowest fitting run).
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        loop {
            let start = self.fm()?.find_run(n);
            if self.cover_range(start, n)? {
                continue;
            }
            return self.reserve(start, n).map(|()| start);
        }
    }

    /// Makes sure refcount blocks cover clusters `start..start + n`; returns whether any had
    /// to be created (which may have used clusters of the range).
    fn cover_range(&mut self, start: u64, n: u64) -> Result<bool> {
        self.check_host_limit(start + n)?;
        let first = (start / self.rb_entries) as usize;
        let last = ((start + n - 1) / self.rb_entries) as usize;
        let mut created = false;
        for ti in first..=last {
            let covered = self
                .reftable
                .get(ti)
                .is_some_and(|&e| e & REFT_OFFSET_MASK != 0);
            if !covered {
                self.alloc_refblock(ti)?;
                created = true;
            }
        }
        Ok(created)
    }

    /// Marks clusters used and sets their refcounts to 1.
    fn reserve(&mut self, start: u64, n: u64) -> Result<()> {
        self.fm()?.set_used_range(start, start + n);
        for i in start..start + n {
            self.set_refcount(i, 1)?;
        }
        Ok(())
    }

    fn check_host_limit(&self, end_cluster: u64) -> Result<()> {
        if end_cluster.saturating_mul(self.cluster_size) > super::header::MAX_HOST_OFFSET {
            return Err(Error::InvalidArgument(
                "image file would exceed the qcow2 maximum of 2^56 bytes".into(),
            ));
        }
        Ok(())
    }

    /// Creates the refcount block for table index `ti`.
    fn alloc_refblock(&mut self, ti: usize) -> Result<()> {
        if ti >= self.reftable.len() {
            self.grow_reftable(ti + 1)?;
            if self.reftable[ti] & REFT_OFFSET_MASK != 0 {
                return Ok(());
            }
        }
        let rbe = self.rb_entries;
        let cs = self.cluster_size;
        let order = self.header.refcount_order;
        let candidate = self.fm()?.first_free();
        let cand_ti = (candidate / rbe) as usize;
        let cand_covered = cand_ti != ti
            && self
                .reftable
                .get(cand_ti)
                .is_some_and(|&e| e & REFT_OFFSET_MASK != 0);
        let mut block = vec![0u8; cs as usize];
        let location = if cand_covered {
            self.fm()?.set_used(candidate);
            self.set_refcount(candidate, 1)?;
            // The covering block must carry the new block's refcount before the table points
            // at it.
            self.write_dirty_refblocks()?;
            candidate
        } else {
            // Self-describing: the block lives inside the range it covers.
            let base = ti as u64 * rbe;
            let fm = self.fm()?;
            let loc = fm.next_free(base);
            if loc >= base + rbe {
                return Err(Error::InvalidImage(
                    "no free cluster for a new refcount block".into(),
                ));
            }
            fm.set_used(loc);
            set_entry(&mut block, loc - base, order, 1);
            loc
        };
        let off = location * cs;
        self.check_host_limit(location + 1)?;
        self.order_after_l2()?;
        self.pwrite(&block, off, "refcount block")?;
        self.rc_unsynced = true;
        self.order_after_refcounts()?;
        self.reftable[ti] = off;
        let rt_off = self.header.refcount_table_offset + ti as u64 * 8;
        self.pwrite(&off.to_be_bytes(), rt_off, "refcount table entry")?;
        self.l2_unsynced = true;
        self.meta.insert(location);
        let slot = self.rc_cache.victim();
        if self.rc_cache.is_dirty(slot) {
            self.write_refblock_slot(slot)?;
        }
        self.rc_cache.install(slot, off);
        self.rc_cache.data_mut(slot).copy_from_slice(&block);
        Ok(())
    }

    /// Replaces the refcount table by a larger one with at least `min_entries` entries.
    fn grow_reftable(&mut self, min_entries: usize) -> Result<()> {
        let cs = self.cluster_size;
        let rbe = self.rb_entries;
        let order = self.header.refcount_order;
        let old_len = self.reftable.len();
        let mut want = min_entries.max(old_len + old_len / 2 + 1);
        loop {
            let clusters = (want as u64 * 8).div_ceil(cs);
            if clusters * cs > super::header::MAX_REFTABLE_BYTES {
                return Err(Error::InvalidArgument(
                    "refcount table would exceed its 8 MiB limit".into(),
                ));
            }
            let new_len = (clusters * cs / 8) as usize;
            let fm = self.fm()?;
            let start = fm.find_run(clusters);
            // The new table must be able to describe itself.
            if ((start + clusters) / rbe) as usize >= new_len {
                want = new_len + new_len / 2 + 1;
                continue;
            }
            for c in start..start + clusters {
                fm.set_used(c);
            }
            let mut table = self.reftable.clone();
            table.resize(new_len, 0);
            // Refcounts for the table's own clusters.
            let mut new_blocks: Vec<(usize, u64, Vec<u8>)> = Vec::new();
            for c in start..start + clusters {
                let ti = (c / rbe) as usize;
                if ti < old_len && self.reftable[ti] & REFT_OFFSET_MASK != 0 {
                    self.set_refcount(c, 1)?;
                    continue;
                }
                if let Some(b) = new_blocks.iter_mut().find(|b| b.0 == ti) {
                    set_entry(&mut b.2, c - ti as u64 * rbe, order, 1);
                    continue;
                }
                let base = ti as u64 * rbe;
                let fm = self.fm()?;
                let loc = fm.next_free(base);
                if loc >= base + rbe {
                    return Err(Error::InvalidImage(
                        "no free cluster for a new refcount block".into(),
                    ));
                }
                fm.set_used(loc);
                let mut block = vec![0u8; cs as usize];
                set_entry(&mut block, loc - base, order, 1);
                set_entry(&mut block, c - base, order, 1);
                table[ti] = loc * cs;
                new_blocks.push((ti, loc, block));
            }
            self.write_dirty_refblocks()?;
            self.order_after_l2()?;
            for (_, loc, block) in &new_blocks {
                self.pwrite(block, loc * cs, "refcount block")?;
                self.meta.insert(*loc);
            }
            let mut raw = Vec::with_capacity((clusters * cs) as usize);
            for e in &table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            self.pwrite(&raw, start * cs, "refcount table")?;
            self.sync()?;
            let old_off = self.header.refcount_table_offset;
            let old_clusters = u64::from(self.header.refcount_table_clusters);
            let mut hdr = [0u8; 12];
            hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
            hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
            self.pwrite(&hdr, 48, "header (refcount table pointer)")?;
            self.sync()?;
            self.rc_unsynced = false;
            self.l2_unsynced = false;
            self.header.refcount_table_offset = start * cs;
            self.header.refcount_table_clusters = clusters as u32;
            self.reftable = table;
            for c in start..start + clusters {
                self.meta.insert(c);
            }
            for i in 0..old_clusters {
                let c = old_off / cs + i;
                self.meta.remove(&c);
                self.set_refcount(c, 0)?;
            }
            return Ok(());
        }
    }

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
            while i + (n as usize) < punch.len() && punch[i + n as usize] == start + n {
                n += 1;
            }
            self.punch_clusters(start, n)?;
            i += n as usize;
        }
        Ok(())
    }

    /// Applies one queued refcount decrement: statistics, and the hole punch when the
    /// cluster becomes free.
    fn apply_free(&mut self, pf: PendingFree, punch: &mut Vec<u64>) -> Result<()> {
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
            self.zero_clusters
                .retain(|z| z.host != pf.cluster * self.cluster_size);
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
    fn move_last_reference(&mut self, cluster: u64, punch: &mut Vec<u64>) -> Result<()> {
        let cs = self.cluster_size;
        let host = cluster * cs;
        self.zero_clusters.retain(|z| z.host != host);
        let Some((gc, entry)) = self.find_active_reference(host)? else {
            // The survivor is not in an active, exclusively owned L2 table (e.g. an internal
            // snapshot's, where COPIED does not apply): plain decrement.
            self.set_refcount(cluster, 1)?;
            return self.fix_copied_flag(cluster);
        };
        let mut data = vec![0u8; cs as usize];
        super::read_exact_or_eof(&self.file, &mut data, host)?;
        let fresh = if is_zero(&data) {
            let fresh = self.new_zero_cluster(1)?;
            self.zero_clusters.push(super::cluster::ZeroCluster {
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
        self.set_l2_entry(gc, fresh | OFLAG_COPIED | (entry & super::OFLAG_ZERO))?;
        self.write_dirty_l2()?;
        // Ordered after the L2 write by `write_refblock_slot`.
        self.set_refcount(cluster, 0)?;
        punch.push(cluster);
        Ok(())
    }

    /// The guest cluster (and its L2 entry) of an active, exclusively owned L2 table that
    /// maps host offset `host` as uncompressed data.
    fn find_active_reference(&mut self, host: u64) -> Result<Option<(u64, u64)>> {
        let mut seen = std::collections::HashSet::new();
        for l1_idx in 0..self.l1.len() {
            let l2_off = self.l1[l1_idx] & L1E_OFFSET_MASK;
            // Only tables exclusively owned by the active L1 may be modified in place (and
            // each is read once, however many L1 entries name it).
            if l2_off == 0 || self.l1[l1_idx] & OFLAG_COPIED == 0 || !seen.insert(l2_off) {
                continue;
            }
            let slot = self.load_l2(l2_off)?;
            for i in 0..self.l2_entries as usize {
                let e = super::cluster::read_l2(self.l2_cache.data(slot), i);
                if e & super::OFLAG_COMPRESSED == 0 && e & super::L2E_OFFSET_MASK == host {
                    return Ok(Some((l1_idx as u64 * self.l2_entries + i as u64, e)));
                }
            }
        }
        Ok(None)
    }

    /// A shared cluster became exclusively owned: set COPIED on its remaining active L2
    /// reference (as `qemu-img check` requires), and stop using it as a shared zero cluster.
    fn fix_copied_flag(&mut self, cluster: u64) -> Result<()> {
        let host = cluster * self.cluster_size;
        self.zero_clusters.retain(|z| z.host != host);
        if let Some((gc, e)) = self.find_active_reference(host)? {
            if e & OFLAG_COPIED == 0 {
                self.set_l2_entry(gc, e | OFLAG_COPIED)?;
            }
        }
        Ok(())
    }

    /// Releases the host space of `n` clusters starting at `start` (or zeroes it where the
    /// file system cannot punch holes, so stale data never lingers).
    fn punch_clusters(&mut self, start: u64, n: u64) -> Result<()> {
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
    fn relocate_tail_metadata(&mut self) -> Result<()> {
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
                if self.zero_clusters.iter().any(|z| z.host == top_off)
                    && self.move_zero_cluster(top)?
                {
                    continue;
                }
                return Ok(());
            }
            if let Some(l1_idx) = self
                .l1
                .iter()
                .position(|&e| e & L1E_OFFSET_MASK == top_off && e & OFLAG_COPIED != 0)
            {
                self.move_l2_table(l1_idx, top)?;
            } else if let Some(ti) = self
                .reftable
                .iter()
                .position(|&e| e & REFT_OFFSET_MASK == top_off)
            {
                self.move_refblock(ti, top)?;
            } else {
                // L1 table, refcount table, snapshot metadata: left where they are.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Active L2 entries that reference host cluster `host` as plain data:
    /// (L2 table offset, index).
    fn find_references(&mut self, host: u64) -> Result<Vec<(u64, usize)>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for l1_idx in 0..self.l1.len() {
            let l2_off = self.l1[l1_idx] & L1E_OFFSET_MASK;
            if l2_off == 0 || self.l1[l1_idx] & OFLAG_COPIED == 0 || !seen.insert(l2_off) {
                continue;
            }
            let slot = self.load_l2(l2_off)?;
            for i in 0..self.l2_entries as usize {
                let e = super::cluster::read_l2(self.l2_cache.data(slot), i);
                if e & super::OFLAG_COMPRESSED == 0 && e & super::L2E_OFFSET_MASK == host {
                    out.push((l2_off, i));
                }
            }
        }
        Ok(out)
    }

    /// Moves a shared zero cluster (v2 overlays) to the lowest free cluster, rewriting every
    /// reference. Returns false when not all references are in the active tables.
    fn move_zero_cluster(&mut self, old: u64) -> Result<bool> {
        let cs = self.cluster_size;
        let old_host = old * cs;
        let rc = self.refcount(old)?;
        let refs = self.find_references(old_host)?;
        if refs.len() as u64 != rc || rc == 0 {
            return Ok(false);
        }
        let (new, _) = self.alloc_clusters(1)?;
        let new_host = new * cs;
        if rc > 1 {
            self.set_refcount(new, rc)?;
        }
        self.pwrite(&vec![0u8; cs as usize], new_host, "zero cluster")?;
        for (l2_off, i) in refs {
            let slot = self.load_l2(l2_off)?;
            let e = super::cluster::read_l2(self.l2_cache.data(slot), i);
            let ne = (e & !super::L2E_OFFSET_MASK) | new_host;
            super::cluster::write_l2(self.l2_cache.data_mut(slot), i, ne);
            self.l2_cache.mark_dirty(slot, i * 8, 8);
        }
        for z in &mut self.zero_clusters {
            if z.host == old_host {
                z.host = new_host;
            }
        }
        for _ in 0..rc {
            self.queue_free(old, true, FreeReason::Internal);
        }
        self.commit_frees()?;
        Ok(true)
    }

    /// Before a metadata cluster moves (its old place is freed and punched): it must be what
    /// the move takes it for and nothing else, named by exactly `l1_refs` L1 entries and
    /// `rt_refs` refcount table entries, outside the tables the header points at, with
    /// refcount 1. Anything else is a corruption, not a move.
    fn check_movable(
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            for i in 0..n {
                set_entry(&mut block, i, order, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, i, order),
                    (i * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
            set_entry(&mut block, 5, order, max);
            assert_eq!(get_entry(&block, 5, order), max);
            assert_eq!(get_entry(&block, 4, order), (4 * 7 + 3) & max);
            assert_eq!(get_entry(&block, 6, order), (6 * 7 + 3) & max);
        }
    }
}
