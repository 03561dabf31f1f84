//! The allocator's index of used and free host clusters: one bit per cluster, clusters past
//! the end are free. Allocation is first-fit from the lowest free cluster, so freed space is
//! reused first and the file's tail empties out where it can be truncated.
//!
//! Only words (64 clusters) holding a used cluster are stored, in an ordered map: a hostile
//! image whose refcount blocks mark clusters used far past its data (a sparse file claiming
//! 2^55 bytes) costs what its refcount blocks hold, not one bit per cluster up to the
//! highest one (64 GiB of bitmap for such a file).

use std::collections::BTreeMap;

/// Used/free state of host clusters.
#[derive(Clone, Debug, Default)]
pub struct FreeMap {
    /// Word index -> bits (cluster `64 * index + bit`); never holds a zero word.
    words: BTreeMap<u64, u64>,
    /// No free cluster lies below this index.
    hint: u64,
}

/// Bits of `word` at positions `from..64`.
fn mask_from(from: u64) -> u64 {
    u64::MAX << from
}

impl FreeMap {
    fn word(&self, w: u64) -> u64 {
        self.words.get(&w).copied().unwrap_or(0)
    }

    pub fn is_used(&self, i: u64) -> bool {
        self.word(i / 64) & (1u64 << (i % 64)) != 0
    }

    pub fn set_used(&mut self, i: u64) {
        *self.words.entry(i / 64).or_insert(0) |= 1u64 << (i % 64);
    }

    /// Marks clusters `start..end` used.
    pub fn set_used_range(&mut self, start: u64, end: u64) {
        let mut i = start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = (end - w * 64).min(64);
            let bits = mask_from(lo) & if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
            *self.words.entry(w).or_insert(0) |= bits;
            i = (w + 1) * 64;
        }
    }

    /// ORs a word of 64 clusters' bits (cluster `64 * w` first) into the map.
    pub fn or_word(&mut self, w: u64, bits: u64) {
        if bits != 0 {
            *self.words.entry(w).or_insert(0) |= bits;
        }
    }

    pub fn set_free(&mut self, i: u64) {
        let w = i / 64;
        if let Some(word) = self.words.get_mut(&w) {
            *word &= !(1u64 << (i % 64));
            if *word == 0 {
                self.words.remove(&w);
            }
        }
        if i < self.hint {
            self.hint = i;
        }
    }

    /// Lowest free cluster at or after `from`.
    pub fn next_free(&self, from: u64) -> u64 {
        let mut w = from / 64;
        let mut word = self.word(w) | !mask_from(from % 64);
        // Stored words follow each other while they are full.
        loop {
            if word != u64::MAX {
                return w * 64 + u64::from((!word).trailing_zeros());
            }
            w += 1;
            word = self.word(w);
        }
    }

    /// Lowest free cluster.
    pub fn first_free(&mut self) -> u64 {
        let f = self.next_free(self.hint);
        self.hint = f;
        f
    }

    /// Number of free clusters starting at `start`, at most `max`.
    pub fn free_run(&self, start: u64, max: u64) -> u64 {
        // The first used cluster at or after `start` ends the run.
        let w0 = start / 64;
        for (&w, &bits) in self.words.range(w0..) {
            let bits = if w == w0 {
                bits & mask_from(start % 64)
            } else {
                bits
            };
            if w * 64 >= start.saturating_add(max) {
                break;
            }
            if bits != 0 {
                let used = w * 64 + u64::from(bits.trailing_zeros());
                return (used - start).min(max);
            }
        }
        max
    }

    /// Lowest start of a run of `n` free clusters.
    pub fn find_run(&mut self, n: u64) -> u64 {
        let mut start = self.first_free();
        loop {
            let got = self.free_run(start, n);
            if got >= n {
                return start;
            }
            start = self.next_free(start + got + 1);
        }
    }

    /// Index just past the highest used cluster.
    pub fn end(&mut self) -> u64 {
        match self.words.last_key_value() {
            None => 0,
            Some((&w, &bits)) => w * 64 + 64 - u64::from(bits.leading_zeros()),
        }
    }

    /// Highest used cluster below `before`.
    pub fn prev_used(&self, before: u64) -> Option<u64> {
        if before == 0 {
            return None;
        }
        let last = before - 1;
        let wl = last / 64;
        for (&w, &bits) in self.words.range(..=wl).rev() {
            let bits = if w == wl {
                let bit = last % 64;
                bits & if bit == 63 {
                    u64::MAX
                } else {
                    (1u64 << (bit + 1)) - 1
                }
            } else {
                bits
            };
            if bits != 0 {
                return Some(w * 64 + 63 - u64::from(bits.leading_zeros()));
            }
        }
        None
    }

    /// Number of used clusters.
    pub fn used_count(&self) -> u64 {
        self.words.values().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Words stored (what the index costs: 64 clusters each).
    pub fn stored_words(&self) -> usize {
        self.words.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_runs_and_end() {
        let mut fm = FreeMap::default();
        for i in 0..10 {
            fm.set_used(i);
        }
        fm.set_used(70);
        assert_eq!(fm.first_free(), 10);
        assert_eq!(fm.end(), 71);
        fm.set_free(3);
        assert_eq!(fm.first_free(), 3);
        assert_eq!(fm.free_run(3, 5), 1);
        assert_eq!(fm.find_run(5), 10);
        assert_eq!(fm.find_run(61), 71);
        fm.set_free(70);
        assert_eq!(fm.end(), 10);
        assert_eq!(fm.used_count(), 9);
        assert_eq!(fm.prev_used(10), Some(9));
        assert_eq!(fm.prev_used(3), Some(2));
        fm.set_used(200);
        assert_eq!(fm.prev_used(200), Some(9));
        assert_eq!(fm.prev_used(1000), Some(200));
        assert_eq!(fm.prev_used(0), None);
    }

    #[test]
    fn ranges_words_and_full_words() {
        let mut fm = FreeMap::default();
        fm.set_used_range(5, 200);
        assert_eq!(fm.used_count(), 195);
        assert_eq!(fm.first_free(), 0);
        assert_eq!(fm.next_free(5), 200);
        assert_eq!(fm.next_free(64), 200);
        assert_eq!(fm.free_run(0, 100), 5);
        assert_eq!(fm.free_run(200, 7), 7);
        assert_eq!(fm.free_run(190, 7), 0);
        assert_eq!(fm.end(), 200);
        assert_eq!(fm.prev_used(5), None);
        assert_eq!(fm.prev_used(6), Some(5));
        fm.or_word(10, 1 << 63);
        assert_eq!(fm.end(), 704);
        assert_eq!(fm.prev_used(703), Some(199));
        assert_eq!(fm.prev_used(704), Some(703));
        assert_eq!(fm.find_run(503), 200);
        assert_eq!(fm.find_run(504), 704);
        for i in 5..200 {
            fm.set_free(i);
        }
        assert_eq!(fm.stored_words(), 1);
        assert_eq!(fm.first_free(), 0);
    }

    #[test]
    fn far_clusters_cost_one_word() {
        let mut fm = FreeMap::default();
        fm.set_used((1 << 39) - 1);
        fm.set_used(3);
        assert_eq!(fm.stored_words(), 2);
        assert_eq!(fm.end(), 1 << 39);
        assert_eq!(fm.prev_used(1 << 39), Some((1 << 39) - 1));
        assert_eq!(fm.prev_used((1 << 39) - 1), Some(3));
        assert_eq!(fm.first_free(), 0);
        assert_eq!(fm.free_run(4, u64::MAX), (1 << 39) - 5);
    }
}
