//! The cluster allocator: the free-space index ([`FreeMap`]) built from the refcount blocks
//! on first use, and allocation of single clusters, runs and exact contiguous ranges (with
//! the refcount blocks that must cover them).

use super::entry::REFT_OFFSET_MASK;
use super::free_map::FreeMap;
use super::image::Qcow2Image;
use super::refblock::used_words;
use crate::cast::usize_from;
use crate::error::{Error, Result};

impl Qcow2Image {
    /// Builds the free-space index from the refcount blocks (first allocation or free).
    pub(crate) fn ensure_free_map(&mut self) -> Result<()> {
        if self.free_map.is_some() {
            return Ok(());
        }
        self.write_dirty_refblocks()?;
        let cs = usize_from(self.cluster_size);
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
        let first = usize_from(start / self.rb_entries);
        let last = usize_from((start + n - 1) / self.rb_entries);
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

#[cfg(test)]
mod tests {
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::image::Qcow2Image;

    fn fresh(dir: &std::path::Path, cluster_size: u64, refcount_bits: u32) -> Qcow2Image {
        let path = dir.join("a.qcow2");
        let opts = CreateOptions {
            size: Some(64 << 20),
            cluster_size,
            refcount_bits,
            ..CreateOptions::default()
        };
        create(&path, &opts).unwrap();
        Qcow2Image::open(&path, false).unwrap()
    }

    #[test]
    fn allocation_is_lowest_fit_and_sets_refcounts() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = fresh(dir.path(), 65536, 16);
        // A fresh image is metadata from cluster 0 to its end.
        let end = img.file_len / img.cluster_size;
        assert!(end >= 3);
        for c in 0..end {
            assert_eq!(img.refcount(c).unwrap(), 1, "metadata cluster {c}");
        }
        let (first, n) = img.alloc_clusters(3).unwrap();
        assert_eq!((first, n), (end, 3));
        for c in first..first + 3 {
            assert_eq!(img.refcount(c).unwrap(), 1);
        }
        assert_eq!(img.refcount(first + 3).unwrap(), 0);
        // A freed cluster in the middle is the next single allocation.
        img.set_refcount(first + 1, 0).unwrap();
        assert_eq!(img.alloc_clusters(1).unwrap(), (first + 1, 1));
        // A one-cluster hole is too small for an exact run of two: the run goes above.
        img.set_refcount(first, 0).unwrap();
        assert_eq!(img.alloc_contiguous(2).unwrap(), first + 3);
        assert_eq!(
            img.alloc_clusters(4).unwrap(),
            (first, 1),
            "run cut by used clusters"
        );
    }

    /// 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the
    /// first refcount table 4096, so allocating past them creates refcount blocks and grows
    /// the table. Nothing allocated may overlap metadata, and every cluster handed out (and
    /// every new refcount block) has refcount 1.
    #[test]
    fn allocation_creates_refcount_blocks_and_grows_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = fresh(dir.path(), 512, 64);
        assert_eq!(img.rb_entries, 64);
        let table_before = img.reftable.len();
        let mut given = std::collections::BTreeSet::new();
        while given.len() < 5000 {
            let (start, n) = img.alloc_clusters(7).unwrap();
            for c in start..start + n {
                assert!(given.insert(c), "cluster {c} handed out twice");
                assert!(!img.meta.contains(&c), "cluster {c} is metadata");
            }
        }
        assert!(img.reftable.len() > table_before, "refcount table grew");
        let blocks = img.reftable.iter().filter(|&&e| e != 0).count() as u64;
        assert!(blocks * img.rb_entries > *given.last().unwrap());
        for &c in given.iter().chain(img.meta.clone().iter()) {
            assert_eq!(img.refcount(c).unwrap(), 1, "cluster {c}");
        }
    }
}
