//! Refcounts: reading and setting a host cluster's refcount through the refcount block
//! cache, validating refcount blocks, writing dirty blocks back (after the L2 writes they
//! must follow), creating refcount blocks and growing the refcount table (QEMU's
//! `qcow2-refcount.c`). Entry encoding is in [`super::refblock`], allocation in
//! `alloc`, deferred frees in `free`.

use super::entry::REFT_OFFSET_MASK;
use super::image::Qcow2Image;
use super::refblock::{get_entry, set_entry};
use crate::cast::usize_from;
use crate::error::{Error, Result};

impl Qcow2Image {
    /// Validates a refcount block offset from the refcount table.
    pub(crate) fn check_refblock_offset(&mut self, ti: usize, off: u64) -> Result<()> {
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
        super::table_read::read_exact_or_eof(file, self.rc_cache.data_mut(slot), off)?;
        Ok(slot)
    }

    /// Writes back the dirty parts of one cached refcount block.
    pub(crate) fn write_refblock_slot(&mut self, slot: usize) -> Result<()> {
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
        let ti = usize_from(idx / self.rb_entries);
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
        let ti = usize_from(idx / self.rb_entries);
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

    /// Creates the refcount block for table index `ti`.
    pub(crate) fn alloc_refblock(&mut self, ti: usize) -> Result<()> {
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
        let cand_ti = usize_from(candidate / rbe);
        let cand_covered = cand_ti != ti
            && self
                .reftable
                .get(cand_ti)
                .is_some_and(|&e| e & REFT_OFFSET_MASK != 0);
        let mut block = vec![0u8; usize_from(cs)];
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
    pub(crate) fn grow_reftable(&mut self, min_entries: usize) -> Result<()> {
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
            let new_len = usize_from(clusters * cs / 8);
            // Fits: at most MAX_REFTABLE_BYTES / 512 clusters (checked above).
            let clusters32 = u32::try_from(clusters).map_err(|_| {
                Error::InvalidArgument("refcount table would exceed its 8 MiB limit".into())
            })?;
            let fm = self.fm()?;
            let start = fm.find_run(clusters);
            // The new table must be able to describe itself.
            if usize_from((start + clusters) / rbe) >= new_len {
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
                let ti = usize_from(c / rbe);
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
                let mut block = vec![0u8; usize_from(cs)];
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
            let mut raw = Vec::with_capacity(usize_from(clusters * cs));
            for e in &table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            self.pwrite(&raw, start * cs, "refcount table")?;
            self.sync()?;
            let old_off = self.header.refcount_table_offset;
            let old_clusters = u64::from(self.header.refcount_table_clusters);
            let mut hdr = [0u8; 12];
            hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
            hdr[8..].copy_from_slice(&clusters32.to_be_bytes());
            self.pwrite(&hdr, 48, "header (refcount table pointer)")?;
            self.sync()?;
            self.rc_unsynced = false;
            self.l2_unsynced = false;
            self.header.refcount_table_offset = start * cs;
            self.header.refcount_table_clusters = clusters32;
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
}
