//! Guest-to-host mapping through the L1 and L2 tables (QEMU's `qcow2-cluster.c`): L2 tables
//! loaded, allocated and written back, entries decoded and validated, cluster contents read
//! (backing file, compressed), whether a cluster can be written in place, and block status.
//! Zeroing is in `zeroing`, reads and writes as data operations in the planner.

use super::compressed::{decompress, CompressedExtent};
use super::entry::{l1_reserved_bits, read_l2, write_l2, L2Entry, ReservedBits};
use super::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::image::Qcow2Image;
use super::pending::FreeReason;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::status::MapExtent;

/// How one guest cluster is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: reads through to the backing file (zeros without one).
    Unallocated,
    /// Reads as zeros (v3 zero flag), possibly with a preallocated host cluster.
    Zero { host: Option<u64>, copied: bool },
    /// Plain data at a host offset; `copied` means refcount is exactly 1.
    Data { host: u64, copied: bool },
    /// Compressed data.
    Compressed(CompressedExtent),
}

/// Largest number of clusters handled by one allocation / one host I/O.
pub(super) const MAX_RUN: u64 = 2048;

impl Qcow2Image {
    // ----- L2 table access -------------------------------------------------------------

    /// Loads the L2 table at host offset `off` into the cache.
    pub(crate) fn load_l2(&mut self, off: u64) -> Result<usize> {
        if let Some(slot) = self.l2_cache.lookup(off) {
            return Ok(slot);
        }
        let slot = self.l2_cache.victim();
        if self.l2_cache.is_dirty(slot) {
            self.write_l2_slot(slot)?;
        }
        self.l2_cache.install(slot, off);
        super::table_read::read_exact_or_eof(&self.file, self.l2_cache.data_mut(slot), off)?;
        Ok(slot)
    }

    /// Writes back the dirty parts of one cached L2 table, after the refcounts it depends on.
    pub(crate) fn write_l2_slot(&mut self, slot: usize) -> Result<()> {
        let Some(base) = self.l2_cache.offset_of(slot) else {
            return Ok(());
        };
        self.write_dirty_refblocks()?;
        self.order_after_refcounts()?;
        for (pos, len) in self.l2_cache.dirty_ranges(slot) {
            let data = self.l2_cache.data(slot)[pos..pos + len].to_vec();
            self.pwrite(&data, base + pos as u64, "L2 table")?;
        }
        self.l2_cache.mark_clean(slot);
        self.l2_unsynced = true;
        Ok(())
    }

    /// Writes back every dirty L2 table (refcount blocks first).
    pub(crate) fn write_dirty_l2(&mut self) -> Result<()> {
        let slots = self.l2_cache.dirty_slots();
        if slots.is_empty() {
            return Ok(());
        }
        self.write_dirty_refblocks()?;
        for slot in slots {
            self.write_l2_slot(slot)?;
        }
        Ok(())
    }

    /// Writes L1 entry `idx` to the file (after the refcounts it depends on).
    pub(crate) fn write_l1_entry(&mut self, idx: usize) -> Result<()> {
        self.write_dirty_refblocks()?;
        self.order_after_refcounts()?;
        let off = self.header.l1_table_offset + idx as u64 * 8;
        let v = self.l1[idx];
        self.pwrite(&v.to_be_bytes(), off, "L1 entry")?;
        self.l2_unsynced = true;
        Ok(())
    }

    /// Validates an L2 table pointer from L1 entry `l1_idx`.
    pub(crate) fn check_l2_offset(&mut self, l1_idx: usize, entry: u64) -> Result<u64> {
        let off = entry & L1E_OFFSET_MASK;
        let cs = self.cluster_size;
        if l1_reserved_bits(entry) {
            return Err(self.corruption(format!(
                "L1 entry {l1_idx} has reserved bits set ({entry:#x})"
            )));
        }
        if off % cs != 0 {
            return Err(self.corruption(format!("L2 table {l1_idx} at unaligned offset {off:#x}")));
        }
        let c = off / cs;
        let l1_first = self.header.l1_table_offset / cs;
        let l1_end = l1_first + (u64::from(self.header.l1_size) * 8).div_ceil(cs);
        let rt_first = self.header.refcount_table_offset / cs;
        let rt_end = rt_first + u64::from(self.header.refcount_table_clusters);
        if c == 0 || (l1_first..l1_end).contains(&c) || (rt_first..rt_end).contains(&c) {
            return Err(self.corruption(format!(
                "L2 table {l1_idx} at {off:#x} overlaps the header, L1 or refcount table"
            )));
        }
        if off >= self.file_len {
            return Err(self.corruption(format!(
                "L2 table {l1_idx} at {off:#x} lies beyond the end of the file"
            )));
        }
        Ok(off)
    }

    /// The cache slot of the L2 table covering guest cluster `gc`; with `allocate`, a
    /// missing table is created and a shared one is copied, so the slot can be modified.
    pub(super) fn l2_slot(&mut self, gc: u64, allocate: bool) -> Result<Option<usize>> {
        let l1_idx = usize_from(gc / self.l2_entries);
        let Some(&entry) = self.l1.get(l1_idx) else {
            return Err(self.corruption(format!(
                "guest cluster {gc} beyond the L1 table ({} entries)",
                self.l1.len()
            )));
        };
        if entry & L1E_OFFSET_MASK == 0 {
            if !allocate {
                return Ok(None);
            }
            return self.alloc_l2_table(l1_idx, None).map(Some);
        }
        let off = self.check_l2_offset(l1_idx, entry)?;
        if allocate && entry & OFLAG_COPIED == 0 {
            let rc = self.refcount(off / self.cluster_size)?;
            if rc > 1 {
                // Shared with a snapshot: copy it before modifying.
                return self.alloc_l2_table(l1_idx, Some(off)).map(Some);
            }
            self.l1[l1_idx] = off | OFLAG_COPIED;
            self.write_l1_entry(l1_idx)?;
        }
        self.load_l2(off).map(Some)
    }

    /// Creates the L2 table for L1 entry `l1_idx`: empty, or a copy of the table at `from`.
    pub(crate) fn alloc_l2_table(&mut self, l1_idx: usize, from: Option<u64>) -> Result<usize> {
        let content = match from {
            Some(src) => {
                let slot = self.load_l2(src)?;
                self.l2_cache.data(slot).to_vec()
            }
            None => vec![0u8; usize_from(self.cluster_size)],
        };
        let (c, _) = self.alloc_clusters(1)?;
        let off = c * self.cluster_size;
        self.meta.insert(c);
        self.order_after_refcounts()?;
        self.pwrite(&content, off, "L2 table")?;
        let slot = self.l2_cache.victim();
        if self.l2_cache.is_dirty(slot) {
            self.write_l2_slot(slot)?;
        }
        self.l2_cache.install(slot, off);
        self.l2_cache.data_mut(slot).copy_from_slice(&content);
        self.l1[l1_idx] = off | OFLAG_COPIED;
        self.write_l1_entry(l1_idx)?;
        if let Some(src) = from {
            // The active L1 no longer references the shared table.
            self.queue_free(src / self.cluster_size, false, FreeReason::Internal);
        }
        Ok(slot)
    }

    /// Raw L2 entry of guest cluster `gc` (0 when no L2 table exists).
    pub(crate) fn l2_entry(&mut self, gc: u64) -> Result<u64> {
        match self.l2_slot(gc, false)? {
            None => Ok(0),
            Some(slot) => Ok(read_l2(
                self.l2_cache.data(slot),
                usize_from(gc % self.l2_entries),
            )),
        }
    }

    /// Sets the L2 entry of guest cluster `gc` (in the cache).
    pub(crate) fn set_l2_entry(&mut self, gc: u64, value: u64) -> Result<()> {
        let Some(slot) = self.l2_slot(gc, true)? else {
            return Err(Error::InvalidImage("L2 table allocation failed".into()));
        };
        let i = usize_from(gc % self.l2_entries);
        write_l2(self.l2_cache.data_mut(slot), i, value);
        self.l2_cache.mark_dirty(slot, i * 8, 8);
        Ok(())
    }

    /// Decodes and validates an L2 entry.
    pub(crate) fn classify(&mut self, gc: u64, e: u64) -> Result<Mapping> {
        let cs = self.cluster_size;
        let (host, copied, zero) = match L2Entry::decode(e) {
            Ok(L2Entry::Compressed { descriptor }) => {
                let ext = CompressedExtent::decode(descriptor, self.cluster_bits);
                if ext.offset < cs || ext.offset >= self.file_len {
                    return Err(self.corruption(format!(
                        "compressed cluster {gc} at invalid offset {:#x}",
                        ext.offset
                    )));
                }
                if self.meta.contains(&(ext.offset / cs)) {
                    return Err(self.corruption(format!(
                        "compressed cluster {gc} at {:#x} overlaps metadata",
                        ext.offset
                    )));
                }
                return Ok(Mapping::Compressed(ext));
            }
            Ok(L2Entry::Standard { host, copied, zero }) => (host, copied, zero),
            Err(ReservedBits) => {
                return Err(self.corruption(format!(
                    "L2 entry for guest cluster {gc} points beyond 2^56 ({e:#x})"
                )));
            }
        };
        if host != 0 {
            if host % cs != 0 {
                return Err(self.corruption(format!(
                    "L2 entry for guest cluster {gc} has unaligned offset {host:#x} (into the header or mid-cluster)"
                )));
            }
            if self.meta.contains(&(host / cs)) {
                return Err(self.corruption(format!(
                    "L2 entry for guest cluster {gc} points at metadata ({host:#x})"
                )));
            }
            if host >= self.file_len && !zero {
                return Err(self.corruption(format!(
                    "L2 entry for guest cluster {gc} points beyond the end of the file ({host:#x})"
                )));
            }
        }
        if zero {
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
                copied,
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied })
    }

    /// Active L2 entries that map host offset `host` as uncompressed data, as (guest
    /// cluster, entry): only from L2 tables exclusively owned by the active L1 table (the
    /// ones that may be modified in place), each read once however many L1 entries name it.
    /// With `first_only`, stops at the first.
    pub(crate) fn active_data_references(
        &mut self,
        host: u64,
        first_only: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for l1_idx in 0..self.l1.len() {
            let l2_off = self.l1[l1_idx] & L1E_OFFSET_MASK;
            if l2_off == 0 || self.l1[l1_idx] & OFLAG_COPIED == 0 || !seen.insert(l2_off) {
                continue;
            }
            let slot = self.load_l2(l2_off)?;
            for i in 0..usize_from(self.l2_entries) {
                let e = read_l2(self.l2_cache.data(slot), i);
                if e & OFLAG_COMPRESSED == 0 && e & L2E_OFFSET_MASK == host {
                    out.push((l1_idx as u64 * self.l2_entries + i as u64, e));
                    if first_only {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The mapping of guest cluster `gc`.
    pub(crate) fn mapping(&mut self, gc: u64) -> Result<Mapping> {
        let e = self.l2_entry(gc)?;
        self.classify(gc, e)
    }

    // ----- reads -----------------------------------------------------------------------

    /// Reads from the backing file; bytes beyond its end (or without one) read as zeros.
    pub(crate) fn read_backing(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.virtual_size();
        let avail = usize_from(bsize.saturating_sub(offset).min(buf.len() as u64));
        if avail > 0 {
            b.read_at(offset, &mut buf[..avail])?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    pub(crate) fn read_compressed(
        &mut self,
        gc: u64,
        ext: CompressedExtent,
        out: &mut [u8],
    ) -> Result<()> {
        let key = ext.offset ^ (ext.len << 56);
        if let Some((k, data)) = &self.compressed_cache {
            if *k == key {
                out.copy_from_slice(data);
                return Ok(());
            }
        }
        let len = usize_from(ext.len.min(self.file_len.saturating_sub(ext.offset)));
        let mut input = vec![0u8; len];
        super::table_read::read_exact_or_eof(&self.file, &mut input, ext.offset)?;
        if let Err(e) = decompress(self.header.compression_type, &input, out) {
            return Err(self.corruption(format!("guest cluster {gc}: {e}")));
        }
        self.compressed_cache = Some((key, out.to_vec()));
        Ok(())
    }

    /// The current contents of guest cluster `gc` as a whole cluster.
    pub(crate) fn read_cluster(&mut self, gc: u64, m: Mapping, out: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Data { host, .. } => {
                super::table_read::read_exact_or_eof(&self.file, out, host)
            }
            Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_backing(gc * self.cluster_size, out),
            Mapping::Compressed(ext) => self.read_compressed(gc, ext, out),
        }
    }

    // ----- writes ----------------------------------------------------------------------

    /// Whether writing to a cluster with mapping `m` can happen in place.
    pub(super) fn writable_in_place(&mut self, m: Mapping) -> Result<bool> {
        match m {
            Mapping::Data { copied: true, .. } => Ok(true),
            Mapping::Data {
                host,
                copied: false,
            } => {
                if self.zero_clusters.contains(host) {
                    return Ok(false);
                }
                Ok(self.refcount(host / self.cluster_size)? == 1)
            }
            _ => Ok(false),
        }
    }

    /// Queues the release of whatever host clusters mapping `m` referenced.
    pub(super) fn release_mapping(&mut self, m: Mapping, punch: bool, reason: FreeReason) {
        let cs = self.cluster_size;
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => self.queue_free(host / cs, punch, reason),
            Mapping::Compressed(ext) => {
                for c in ext.clusters(self.cluster_bits) {
                    self.queue_free(c, punch, reason);
                }
            }
            Mapping::Zero { host: None, .. } | Mapping::Unallocated => {}
        }
    }

    // ----- block status ----------------------------------------------------------------

    pub(crate) fn guest_block_status(&mut self, offset: u64, max_len: u64) -> Result<MapExtent> {
        let cs = self.cluster_size;
        let gc = offset / cs;
        let in_off = offset % cs;
        let m = self.mapping(gc)?;
        let end = offset + max_len;
        let mut run_end = ((gc + 1) * cs).min(end);
        let mut k = 1;
        while run_end < end {
            let nm = self.mapping(gc + k)?;
            let same = match (m, nm) {
                (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => b == a + k * cs,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Compressed(_), Mapping::Compressed(_)) => true,
                _ => false,
            };
            if !same {
                break;
            }
            run_end = ((gc + k + 1) * cs).min(end);
            k += 1;
        }
        let length = run_end - offset;
        let ext = |present, zero, data, off| MapExtent {
            start: offset,
            length,
            depth: 0,
            present,
            zero,
            data,
            offset: off,
        };
        Ok(match m {
            Mapping::Data { host, .. } => ext(true, false, true, Some(host + in_off)),
            Mapping::Zero { .. } => ext(true, true, false, None),
            Mapping::Compressed(_) => ext(true, false, true, None),
            Mapping::Unallocated => match self.backing.as_mut() {
                None => ext(false, true, false, None),
                Some(b) => {
                    let bsize = b.virtual_size();
                    if offset >= bsize {
                        MapExtent {
                            depth: 1,
                            ..ext(false, true, false, None)
                        }
                    } else {
                        let blen = length.min(bsize - offset);
                        let mut st = b.block_status(offset, blen)?;
                        st.depth += 1;
                        st
                    }
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::disk::DiskImage;
    use crate::qcow2::create::{create, CreateOptions};
    use crate::qcow2::entry::L1E_OFFSET_MASK;
    use crate::qcow2::header::incompat;

    /// A 1 MiB v3 image whose guest cluster 0 holds 0xab: (path, L1 table offset, L2 table
    /// offset, data cluster offset).
    fn image_with_one_cluster(dir: &Path) -> (PathBuf, u64, u64, u64) {
        let path = dir.join("t.qcow2");
        let opts = CreateOptions {
            size: Some(1 << 20),
            ..CreateOptions::default()
        };
        create(&path, &opts).unwrap();
        let mut img = Qcow2Image::open(&path, false).unwrap();
        img.write_at(0, &[0xab; 65536]).unwrap();
        img.flush().unwrap();
        let l1 = img.header.l1_table_offset;
        let l2 = img.l1[0] & L1E_OFFSET_MASK;
        let Mapping::Data { host, copied: true } = img.mapping(0).unwrap() else {
            panic!("guest cluster 0 is not plain data");
        };
        (path, l1, l2, host)
    }

    fn poke(path: &Path, offset: u64, value: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&value.to_be_bytes(), offset).unwrap();
    }

    fn incompatible_features(path: &Path) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, 72)
            .unwrap();
        u64::from_be_bytes(b)
    }

    /// L2 and L1 entries written by hand into an image: each is refused with its own error
    /// (no panic, no data from the wrong place), and the image is marked corrupt.
    #[test]
    fn hand_corrupted_entries_are_refused_and_mark_the_image_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (path, l1, l2, data) = image_with_one_cluster(dir.path());
        let mut buf = vec![0u8; 65536];
        Qcow2Image::open(&path, true)
            .unwrap()
            .read_at(0, &mut buf)
            .unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xab),
            "the untouched image reads back"
        );
        std::fs::copy(&path, dir.path().join("good.qcow2")).unwrap();

        let cases: [(&str, u64, u64, &str); 5] = [
            (
                "reserved bit 56",
                l2,
                data | OFLAG_COPIED | 1 << 56,
                "L2 entry for guest cluster 0 points beyond 2^56",
            ),
            (
                "mid-cluster offset",
                l2,
                (data + 512) | OFLAG_COPIED,
                "L2 entry for guest cluster 0 has unaligned offset",
            ),
            (
                "the L2 table itself",
                l2,
                l2 | OFLAG_COPIED,
                "L2 entry for guest cluster 0 points at metadata",
            ),
            (
                "past the end of the file",
                l2,
                (1 << 40) | OFLAG_COPIED,
                "L2 entry for guest cluster 0 points beyond the end of the file",
            ),
            (
                "L1 entry with a reserved low bit",
                l1,
                l2 | OFLAG_COPIED | 1,
                "L1 entry 0 has reserved bits set",
            ),
        ];
        for (what, at, value, want) in cases {
            std::fs::copy(dir.path().join("good.qcow2"), &path).unwrap();
            poke(&path, at, value);
            let mut img = Qcow2Image::open(&path, false).unwrap();
            buf.fill(0x11);
            match img.read_at(0, &mut buf) {
                Err(Error::Corrupt(msg)) => assert!(msg.contains(want), "{what}: {msg}"),
                other => panic!("{what}: {other:?}"),
            }
            assert!(
                img.is_read_only(),
                "{what}: a corrupt image stops taking writes"
            );
            drop(img);
            assert_ne!(
                incompatible_features(&path) & incompat::CORRUPT,
                0,
                "{what}: corrupt bit on disk"
            );
        }
    }
}
