//! The shared all-zero clusters of a v2 overlay (the 2008 RFC's scheme: v2 has no ZERO flag,
//! so a zeroed guest cluster over a backing file maps to a refcounted cluster of zeros),
//! kept by host offset so the write path asks "is this one of them?" in O(log n).

use std::collections::BTreeMap;

/// One shared all-zero cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroCluster {
    /// Host offset of the cluster.
    pub host: u64,
    /// While the cluster has exactly one reference, that reference's guest cluster (its L2
    /// entry carries COPIED; a second reference moves both to a fresh shared cluster).
    pub single_ref: Option<u64>,
}

/// The image's shared zero clusters, by host offset.
#[derive(Clone, Debug, Default)]
pub struct ZeroClusters {
    /// Host offset -> the single reference's guest cluster, if it has only one.
    by_host: BTreeMap<u64, Option<u64>>,
}

impl ZeroClusters {
    /// Whether the cluster at host offset `host` is a shared zero cluster.
    pub fn contains(&self, host: u64) -> bool {
        self.by_host.contains_key(&host)
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// Records a zero cluster (replacing what was known of the same host offset).
    pub fn insert(&mut self, z: ZeroCluster) {
        self.by_host.insert(z.host, z.single_ref);
    }

    /// Stops treating the cluster at `host` as a zero cluster; whether it was one.
    pub fn remove(&mut self, host: u64) -> bool {
        self.by_host.remove(&host).is_some()
    }

    /// The cluster at `old` moved to `new` (relocation): it stays a zero cluster there.
    pub fn rehost(&mut self, old: u64, new: u64) {
        if let Some(single_ref) = self.by_host.remove(&old) {
            self.by_host.insert(new, single_ref);
        }
    }

    /// The zero clusters, lowest host offset first (a copy: the caller may change the set
    /// while it looks at them).
    pub fn to_vec(&self) -> Vec<ZeroCluster> {
        self.by_host
            .iter()
            .map(|(&host, &single_ref)| ZeroCluster { host, single_ref })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z(host: u64, single_ref: Option<u64>) -> ZeroCluster {
        ZeroCluster { host, single_ref }
    }

    #[test]
    fn membership_insert_remove() {
        let mut set = ZeroClusters::default();
        assert!(set.is_empty());
        set.insert(z(0x3_0000, None));
        set.insert(z(0x1_0000, Some(7)));
        assert!(set.contains(0x3_0000) && set.contains(0x1_0000));
        assert!(!set.contains(0x2_0000));
        assert_eq!(set.len(), 2);
        assert!(set.remove(0x3_0000));
        assert!(!set.remove(0x3_0000));
        assert!(!set.contains(0x3_0000));
        assert_eq!(set.to_vec(), vec![z(0x1_0000, Some(7))]);
    }

    #[test]
    fn insert_replaces_what_was_known_of_the_same_cluster() {
        let mut set = ZeroClusters::default();
        set.insert(z(0x1_0000, Some(7)));
        set.insert(z(0x1_0000, None));
        assert_eq!(set.to_vec(), vec![z(0x1_0000, None)]);
    }

    #[test]
    fn rehost_moves_a_cluster_and_keeps_its_reference() {
        let mut set = ZeroClusters::default();
        set.insert(z(0x9_0000, Some(3)));
        set.insert(z(0x2_0000, None));
        set.rehost(0x9_0000, 0x4_0000);
        assert!(!set.contains(0x9_0000));
        assert_eq!(
            set.to_vec(),
            vec![z(0x2_0000, None), z(0x4_0000, Some(3))],
            "lowest host offset first"
        );
        // Moving a cluster that is not a zero cluster changes nothing.
        set.rehost(0x7_0000, 0x8_0000);
        assert_eq!(set.len(), 2);
        assert!(!set.contains(0x8_0000));
    }
}
