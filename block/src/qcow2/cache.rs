//! A bounded cache of cluster-sized metadata tables (L2 tables, refcount blocks).
//!
//! The cache does no I/O itself: the qcow2 driver decides when a dirty table may be written
//! (write ordering between refcount blocks and L2 tables is the driver's business, as in
//! QEMU's `qcow2-cache.c` with its dependencies). Dirtiness is tracked per 512-byte sector so
//! a write-back only rewrites the sectors that changed.

use std::collections::HashMap;

const SECTOR: usize = 512;

/// One cached table.
struct Slot {
    /// Host offset of the table, or `None` when the slot is empty.
    offset: Option<u64>,
    data: Vec<u8>,
    /// One bit per 512-byte sector.
    dirty: Vec<u64>,
    any_dirty: bool,
    last_use: u64,
}

/// A fixed-capacity table cache with LRU replacement.
pub struct TableCache {
    table_size: usize,
    slots: Vec<Slot>,
    capacity: usize,
    index: HashMap<u64, usize>,
    tick: u64,
}

impl TableCache {
    /// A cache of at most `capacity` tables of `table_size` bytes (memory is bounded by
    /// `capacity * table_size`; slots are allocated on first use).
    pub fn new(table_size: usize, capacity: usize) -> Self {
        TableCache {
            table_size,
            slots: Vec::new(),
            capacity: capacity.max(2),
            index: HashMap::new(),
            tick: 0,
        }
    }

    /// Slot holding the table at `offset`, marking it recently used.
    pub fn lookup(&mut self, offset: u64) -> Option<usize> {
        let slot = *self.index.get(&offset)?;
        self.tick += 1;
        self.slots[slot].last_use = self.tick;
        Some(slot)
    }

    /// A slot to load a new table into: an empty one if the cache is not full, otherwise the
    /// least recently used one (which the caller must write back first if it is dirty).
    pub fn victim(&mut self) -> usize {
        if self.slots.len() < self.capacity {
            let words = (self.table_size / SECTOR).div_ceil(64);
            self.slots.push(Slot {
                offset: None,
                data: vec![0u8; self.table_size],
                dirty: vec![0u64; words],
                any_dirty: false,
                last_use: 0,
            });
            return self.slots.len() - 1;
        }
        if let Some(i) = self.slots.iter().position(|s| s.offset.is_none()) {
            return i;
        }
        let mut best = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.last_use < self.slots[best].last_use {
                best = i;
            }
        }
        best
    }

    /// Host offset of the table in `slot`.
    pub fn offset_of(&self, slot: usize) -> Option<u64> {
        self.slots[slot].offset
    }

    /// Binds `slot` to the table at `offset`; the caller fills the data through
    /// [`TableCache::data_mut`] (the slot starts clean). Any previous table must have been
    /// written back by the caller.
    pub fn install(&mut self, slot: usize, offset: u64) {
        if let Some(old) = self.slots[slot].offset.take() {
            self.index.remove(&old);
        }
        self.tick += 1;
        let s = &mut self.slots[slot];
        s.offset = Some(offset);
        s.dirty.iter_mut().for_each(|w| *w = 0);
        s.any_dirty = false;
        s.last_use = self.tick;
        self.index.insert(offset, slot);
    }

    /// Moves the table in `slot` to a new host offset (after the caller relocated it).
    pub fn rebind(&mut self, slot: usize, new_offset: u64) {
        if let Some(old) = self.slots[slot].offset.take() {
            self.index.remove(&old);
        }
        self.slots[slot].offset = Some(new_offset);
        self.index.insert(new_offset, slot);
    }

    /// Drops the table at `offset` from the cache without writing it (it was freed).
    pub fn invalidate(&mut self, offset: u64) {
        if let Some(slot) = self.index.remove(&offset) {
            let s = &mut self.slots[slot];
            s.offset = None;
            s.dirty.iter_mut().for_each(|w| *w = 0);
            s.any_dirty = false;
        }
    }

    pub fn data(&self, slot: usize) -> &[u8] {
        &self.slots[slot].data
    }

    /// Mutable access to the table; the caller marks what it changed with
    /// [`TableCache::mark_dirty`].
    pub fn data_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.slots[slot].data
    }

    /// Marks `len` bytes at `pos` of the table in `slot` as modified.
    pub fn mark_dirty(&mut self, slot: usize, pos: usize, len: usize) {
        if len == 0 {
            return;
        }
        let s = &mut self.slots[slot];
        let first = pos / SECTOR;
        let last = (pos + len - 1) / SECTOR;
        for sec in first..=last {
            s.dirty[sec / 64] |= 1u64 << (sec % 64);
        }
        s.any_dirty = true;
    }

    pub fn is_dirty(&self, slot: usize) -> bool {
        self.slots[slot].any_dirty
    }

    /// Whether any table in the cache is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.any_dirty)
    }

    /// Slots holding dirty tables, in ascending host offset order.
    pub fn dirty_slots(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].any_dirty && self.slots[i].offset.is_some())
            .collect();
        v.sort_by_key(|&i| self.slots[i].offset);
        v
    }

    /// Byte ranges `(start, len)` of the table in `slot` that are dirty, merged.
    pub fn dirty_ranges(&self, slot: usize) -> Vec<(usize, usize)> {
        let s = &self.slots[slot];
        let sectors = self.table_size / SECTOR;
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut sec = 0;
        while sec < sectors {
            if s.dirty[sec / 64] & (1u64 << (sec % 64)) != 0 {
                let start = sec;
                while sec < sectors && s.dirty[sec / 64] & (1u64 << (sec % 64)) != 0 {
                    sec += 1;
                }
                out.push((start * SECTOR, (sec - start) * SECTOR));
            } else {
                sec += 1;
            }
        }
        out
    }

    /// Marks the table in `slot` clean (after the caller wrote it back).
    pub fn mark_clean(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.dirty.iter_mut().for_each(|w| *w = 0);
        s.any_dirty = false;
    }

    /// Offsets of every cached table.
    pub fn cached_offsets(&self) -> Vec<u64> {
        self.slots.iter().filter_map(|s| s.offset).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_and_dirty_ranges() {
        let mut c = TableCache::new(4096, 2);
        let a = c.victim();
        c.install(a, 0x10000);
        let b = c.victim();
        c.install(b, 0x20000);
        assert_eq!(c.lookup(0x10000), Some(a));
        // b is now least recently used
        assert_eq!(c.victim(), b);
        c.mark_dirty(a, 100, 8);
        c.mark_dirty(a, 1024, 1100);
        assert_eq!(c.dirty_ranges(a), vec![(0, 512), (1024, 1536)]);
        assert!(c.has_dirty());
        c.mark_clean(a);
        assert!(!c.has_dirty());
        c.invalidate(0x10000);
        assert_eq!(c.lookup(0x10000), None);
    }
}
