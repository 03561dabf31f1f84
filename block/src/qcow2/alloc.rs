//! The cluster allocator: the free-space index ([`FreeMap`]) built from the refcount blocks
//! on first use, and allocation of single clusters, runs and exact contiguous ranges (with
//! the refcount blocks that must cover them).

use super::entry::REFT_OFFSET_MASK;
use super::free_map::FreeMap;
use super::image::Qcow2Image;
use super::refblock::used_words;
use crate::error::{Error, Result};

impl Qcow2Image {
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
        let mut reader = super::table_read::TableReader::default();
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

    pub(crate) fn fm(&mut self) -> Result<&mut FreeMap> {
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
    pub(crate) fn cover_range(&mut self, start: u64, n: u64) -> Result<bool> {
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
    pub(crate) fn reserve(&mut self, start: u64, n: u64) -> Result<()> {
        self.fm()?.set_used_range(start, start + n);
        for i in start..start + n {
            self.set_refcount(i, 1)?;
        }
        Ok(())
    }

    pub(crate) fn check_host_limit(&self, end_cluster: u64) -> Result<()> {
        if end_cluster.saturating_mul(self.cluster_size) > super::header::MAX_HOST_OFFSET {
            return Err(Error::InvalidArgument(
                "image file would exceed the qcow2 maximum of 2^56 bytes".into(),
            ));
        }
        Ok(())
    }
}
