//! What a whole-image walk collects, sized by what the image holds: references per host
//! cluster (dense for files that really hold their length, a map for sparse ones), metadata
//! tables as ranges of clusters, and a capped list of messages.

use crate::cast::usize_from;
use std::collections::HashMap;

/// Messages kept per check (every problem is counted; the list stops growing here).
pub const MAX_MESSAGES: usize = 1000;
/// Files of at most this many clusters count references densely whatever they hold
/// (64 MiB of counters).
const DENSE_CLUSTERS: u64 = 1 << 24;
/// Beyond that, dense counters (4 bytes per cluster) are used only for files whose
/// allocated bytes are at least this fraction of their length (at most 1/16 of what the
/// file holds, at 512-byte clusters), and no more than this many clusters.
const DENSE_MIN_ALLOCATED_FRACTION: u64 = 8;
const DENSE_MAX_CLUSTERS: u64 = 1 << 32;

/// A capped list of messages.
#[derive(Debug, Default)]
pub struct Messages {
    pub list: Vec<String>,
    pub dropped: u64,
}

impl Messages {
    /// Adds the message `f` makes, unless the list is full (then it is only counted).
    pub fn push(&mut self, f: impl FnOnce() -> String) {
        if self.list.len() < MAX_MESSAGES {
            self.list.push(f());
        } else {
            self.dropped += 1;
        }
    }
}

/// References per host cluster.
pub enum Refs {
    /// One counter per cluster of the file.
    Dense(Vec<u32>),
    /// Counters of the referenced clusters only.
    Sparse(HashMap<u64, u32>),
}

impl Refs {
    /// Counters for a file of `nb_clusters` clusters of which `allocated_bytes` of
    /// `file_len` are allocated on the host.
    pub fn for_file(nb_clusters: u64, file_len: u64, allocated_bytes: u64) -> Self {
        let holds_its_length = allocated_bytes >= file_len / DENSE_MIN_ALLOCATED_FRACTION
            && nb_clusters <= DENSE_MAX_CLUSTERS;
        if nb_clusters <= DENSE_CLUSTERS || holds_its_length {
            Refs::Dense(vec![0; usize_from(nb_clusters)])
        } else {
            Refs::Sparse(HashMap::new())
        }
    }

    /// Adds `n` references to cluster `c` (below the file's cluster count).
    pub fn add(&mut self, c: u64, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let r = match self {
            Refs::Dense(v) => match v.get_mut(usize_from(c)) {
                Some(r) => r,
                None => return,
            },
            Refs::Sparse(m) => m.entry(c).or_insert(0),
        };
        *r = r.saturating_add(n);
    }

    /// The counters in cluster order.
    pub fn into_sorted(self) -> SortedRefs {
        match self {
            Refs::Dense(v) => SortedRefs::Dense(v),
            Refs::Sparse(m) => {
                let mut v: Vec<(u64, u32)> = m.into_iter().collect();
                v.sort_unstable();
                SortedRefs::Sparse(v)
            }
        }
    }
}

/// References in cluster order.
pub enum SortedRefs {
    Dense(Vec<u32>),
    Sparse(Vec<(u64, u32)>),
}

impl SortedRefs {
    /// `(cluster, references)` for every referenced cluster, ascending.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (u64, u32)> + '_> {
        self.iter_from(0)
    }

    /// The same from cluster `from` on.
    pub fn iter_from(&self, from: u64) -> Box<dyn Iterator<Item = (u64, u32)> + '_> {
        match self {
            SortedRefs::Dense(v) => {
                let from = usize::try_from(from).unwrap_or(usize::MAX).min(v.len());
                Box::new(
                    v[from..]
                        .iter()
                        .enumerate()
                        .filter(|(_, &r)| r > 0)
                        .map(move |(c, &r)| ((from + c) as u64, r)),
                )
            }
            SortedRefs::Sparse(v) => {
                let i = v.partition_point(|&(c, _)| c < from);
                Box::new(v[i..].iter().copied())
            }
        }
    }
}

/// A metadata table counted as a range of clusters `[start, end)` (one reference each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub what: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_capped_and_counted() {
        let mut m = Messages::default();
        for i in 0..MAX_MESSAGES + 5 {
            m.push(|| format!("{i}"));
        }
        assert_eq!(m.list.len(), MAX_MESSAGES);
        assert_eq!(m.dropped, 5);
    }

    #[test]
    fn sparse_files_count_sparsely() {
        assert!(matches!(
            Refs::for_file(1 << 20, 1 << 36, 0),
            Refs::Dense(_)
        ));
        assert!(matches!(
            Refs::for_file(1 << 30, 1 << 46, 1 << 20),
            Refs::Sparse(_)
        ));
        assert!(matches!(
            Refs::for_file(1 << 25, 1 << 41, 1 << 40),
            Refs::Dense(_)
        ));
        let mut r = Refs::for_file(1 << 30, 1 << 46, 0);
        r.add(7, 2);
        r.add(3, u64::MAX);
        r.add(7, 1);
        let s = r.into_sorted();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(3, u32::MAX), (7, 3)]);
        assert_eq!(s.iter_from(4).collect::<Vec<_>>(), vec![(7, 3)]);
        let mut r = Refs::for_file(16, 16 * 512, 0);
        r.add(4, 1);
        r.add(99, 1); // past the end: ignored
        r.add(9, 2);
        let s = r.into_sorted();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(4, 1), (9, 2)]);
        assert_eq!(s.iter_from(5).collect::<Vec<_>>(), vec![(9, 2)]);
        assert_eq!(s.iter_from(50).count(), 0);
    }
}
