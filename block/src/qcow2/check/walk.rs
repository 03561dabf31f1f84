//! The whole-image walk: every reference the image makes (header, L1 tables of the active
//! image and of snapshots, L2 tables, data and compressed clusters, refcount table and
//! blocks, snapshot table), counted per host cluster.
//!
//! Its work is bounded by the distinct metadata the image holds, not by what the tables
//! claim: each L2 table is read once however many L1 entries name it (its references count
//! once per naming entry, as QEMU's walk would count them by reading it again); snapshot L1
//! tables that overlap anything are reported, not walked; tables in holes of a sparse file
//! are not read; a refcount block named twice is reported, not read twice.

use std::collections::{BTreeMap, HashMap};

use super::refs::{Messages, Range, Refs, SortedRefs};
use crate::cast::usize_from;
use crate::error::Result;
use crate::qcow2::compressed::CompressedExtent;
use crate::qcow2::entry::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK,
    RESERVED_HIGH,
};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::table_read::TableReader;
use crate::status::HostUsage;

/// What the walk found.
pub struct Walk {
    /// Clusters as the file's length gives them.
    pub nb_clusters: u64,
    pub refs: Refs,
    /// Metadata tables counted as ranges (sorted, disjoint, inside the file).
    pub ranges: Vec<Range>,
    pub corruptions: u64,
    pub check_errors: u64,
    pub messages: Messages,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
    /// Active L1 entries naming an L2 table inside the file: (its cluster, L1 index), for
    /// the COPIED check.
    pub l1_copied: Vec<(u64, usize)>,
    /// Data entries of the active L2 tables (each table once), for the COPIED check.
    pub data_copied: Vec<u64>,
    /// The refcount block of each refcount table index, 0 where there is none or it is
    /// invalid.
    pub blocks: Vec<u64>,
    pub reader: TableReader,
    /// `refs` in cluster order, once compared.
    pub refs_sorted: Option<SortedRefs>,
}

/// How often an L2 table is named, and by whom.
#[derive(Clone, Copy, Default)]
struct L2Use {
    refs: u64,
    active: bool,
}

/// What an active L2 table contributes to the allocation statistics.
#[derive(Clone, Copy, Default)]
struct Summary {
    allocated: u64,
    compressed: u64,
    /// Data clusters not following the previous one of the same table on the host.
    breaks: u64,
    first: Option<u64>,
    last: Option<u64>,
}

fn be64_at(buf: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

impl Walk {
    /// An error counted `n` times (a table visited once for `n` references).
    fn error_n(&mut self, n: u64, msg: impl FnOnce() -> String) {
        self.corruptions = self.corruptions.saturating_add(n);
        self.messages.push(msg);
    }

    /// `n` references to `cluster`.
    fn inc(&mut self, cluster: u64, n: u64, what: &str) {
        if cluster >= self.nb_clusters {
            let nb = self.nb_clusters;
            self.error_n(n, || {
                format!(
                    "ERROR {what} cluster {cluster} is outside the image (file has {nb} clusters)"
                )
            });
            return;
        }
        self.refs.add(cluster, n);
    }

    fn inc_bytes(&mut self, offset: u64, len: u64, cluster_bits: u32, n: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> cluster_bits;
        let last = offset.saturating_add(len - 1) >> cluster_bits;
        for c in first..=last {
            self.inc(c, n, what);
        }
    }

    /// A metadata table of `len` bytes at `offset` (cluster aligned), counted as a range;
    /// the part past the end of the file is an error.
    fn add_range(&mut self, offset: u64, len: u64, cluster_bits: u32, what: String) {
        if len == 0 {
            return;
        }
        let start = offset >> cluster_bits;
        let end = (offset + len).div_ceil(1 << cluster_bits);
        let nb = self.nb_clusters;
        if end > nb {
            self.error_n(end - start.max(nb), || {
                format!("ERROR {what} at {offset:#x} extends beyond the end of the file ({nb} clusters)")
            });
        }
        if start < end.min(nb) {
            self.ranges.push(Range {
                start,
                end: end.min(nb),
                what,
            });
        }
    }
}

/// Validates an L1 entry (active or snapshot): its L2 table offset, or an error.
fn l1_entry_offset(w: &mut Walk, e: u64, cs: u64, whose: impl FnOnce() -> String) -> Option<u64> {
    let off = e & L1E_OFFSET_MASK;
    if off == 0 {
        return None;
    }
    if off % cs != 0 || e & RESERVED_HIGH != 0 {
        w.error_n(1, || {
            format!(
                "ERROR l2_offset={off:#x}: L2 table is not cluster aligned or has reserved bits; {}",
                whose()
            )
        });
        return None;
    }
    Some(off)
}

pub fn walk(img: &Qcow2Image) -> Result<Walk> {
    let cs = img.cluster_size;
    let cb = img.cluster_bits;
    let nb_clusters = img.file_len.div_ceil(cs);
    let usage = HostUsage::of_file(&img.file)?;
    let h = &img.header;
    let mut w = Walk {
        nb_clusters,
        refs: Refs::for_file(nb_clusters, img.file_len, usage.allocated_bytes),
        ranges: Vec::new(),
        corruptions: 0,
        check_errors: 0,
        messages: Messages::default(),
        allocated: 0,
        fragmented: 0,
        compressed: 0,
        l1_copied: Vec::new(),
        data_copied: Vec::new(),
        blocks: vec![0; img.reftable.len()],
        reader: TableReader::default(),
        refs_sorted: None,
    };
    w.inc(0, 1, "header");
    // The tables the header points at (validated at open not to overlap each other).
    w.add_range(
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        cb,
        "L1 table".into(),
    );
    w.add_range(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) << cb,
        cb,
        "refcount table".into(),
    );
    w.add_range(
        h.snapshots_offset,
        img.snapshots.bytes,
        cb,
        "snapshot table".into(),
    );

    let mut l2: HashMap<u64, L2Use> = HashMap::new();
    for (i, &e) in img.l1.iter().enumerate() {
        let Some(off) = l1_entry_offset(&mut w, e, cs, || format!("L1 index {i}")) else {
            continue;
        };
        let u = l2.entry(off).or_default();
        u.refs += 1;
        u.active = true;
        if off < img.file_len {
            w.l1_copied.push((off >> cb, i));
        }
    }
    walk_snapshot_l1_tables(img, &mut w, &mut l2)?;
    walk_refcount_table(img, &mut w);

    // Each L2 table once, in file order.
    let mut tables: Vec<(u64, L2Use)> = l2.into_iter().collect();
    tables.sort_unstable_by_key(|t| t.0);
    let mut summaries: HashMap<u64, Summary> = HashMap::new();
    let mut buf = vec![0u8; usize_from(cs)];
    for (off, u) in tables {
        w.inc(off >> cb, u.refs, "L2 table");
        if off >= img.file_len {
            continue;
        }
        let sum = if w.reader.read(&img.file, img.file_len, &mut buf, off)? {
            walk_l2(img, &mut w, &buf, off, u)
        } else {
            Summary::default()
        };
        if u.active {
            summaries.insert(off, sum);
        }
    }

    // Allocation statistics over the active L1 table, in guest order.
    let mut last_host: Option<u64> = None;
    for &e in &img.l1 {
        let Some(s) = summaries.get(&(e & L1E_OFFSET_MASK)) else {
            continue;
        };
        w.allocated += s.allocated;
        w.compressed += s.compressed;
        if let (Some(prev), Some(first)) = (last_host, s.first) {
            if first != prev + cs {
                w.fragmented += 1;
            }
        }
        w.fragmented += s.breaks;
        if s.last.is_some() {
            last_host = s.last;
        }
    }
    w.ranges.sort_unstable_by_key(|r| r.start);
    Ok(w)
}

/// The entries of one L2 table, named `u.refs` times.
fn walk_l2(img: &Qcow2Image, w: &mut Walk, buf: &[u8], off: u64, u: L2Use) -> Summary {
    let cs = img.cluster_size;
    let cb = img.cluster_bits;
    let n = u.refs;
    let mut s = Summary::default();
    for j in 0..(cs / 8) as usize {
        let e = be64_at(buf, j);
        if e == 0 {
            continue;
        }
        if e & OFLAG_COMPRESSED != 0 {
            let ext = CompressedExtent::decode(e & !(OFLAG_COMPRESSED | OFLAG_COPIED), cb);
            if e & OFLAG_COPIED != 0 {
                w.error_n(n, || {
                    format!("ERROR: compressed cluster (L2 table {off:#x}, entry {j}) has the COPIED flag set")
                });
            }
            let len = ext.len.min(img.file_len.saturating_sub(ext.offset)).max(1);
            w.inc_bytes(ext.offset, len, cb, n, "compressed");
            if u.active {
                s.allocated += 1;
                s.compressed += 1;
            }
            continue;
        }
        let host = e & L2E_OFFSET_MASK;
        if host == 0 {
            continue;
        }
        if host % cs != 0 || e & RESERVED_HIGH != 0 {
            w.error_n(n, || {
                format!("ERROR offset={host:#x}: data cluster is not properly aligned or has reserved bits; L2 entry {e:#x}")
            });
            continue;
        }
        w.inc(host >> cb, n, "data");
        if !u.active {
            continue;
        }
        if host < img.file_len {
            w.data_copied.push(e);
        }
        if e & OFLAG_ZERO == 0 {
            s.allocated += 1;
            match s.last {
                Some(prev) if host != prev + cs => s.breaks += 1,
                _ => {}
            }
            s.first.get_or_insert(host);
            s.last = Some(host);
        }
    }
    s
}

/// Reads the snapshots' L1 tables (each once; any that overlaps another table is reported
/// and skipped) and counts the L2 tables they name.
fn walk_snapshot_l1_tables(
    img: &Qcow2Image,
    w: &mut Walk,
    l2: &mut HashMap<u64, L2Use>,
) -> Result<()> {
    let cs = img.cluster_size;
    let cb = img.cluster_bits;
    // Accepted tables by first cluster: (end cluster, what).
    let mut taken: BTreeMap<u64, (u64, String)> = w
        .ranges
        .iter()
        .map(|r| (r.start, (r.end, r.what.clone())))
        .collect();
    let mut order: Vec<usize> = (0..img.snapshots.l1_tables.len()).collect();
    order.sort_unstable_by_key(|&k| img.snapshots.l1_tables[k].offset);
    let mut buf = Vec::new();
    for k in order {
        let t = img.snapshots.l1_tables[k];
        if t.size == 0 {
            continue;
        }
        let start = t.offset >> cb;
        let end = (t.offset + t.bytes()).div_ceil(cs);
        let before = taken
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start);
        let after = taken.range(start..end).next();
        if let Some((&s, (_, what))) = before.or(after) {
            let what = what.clone();
            w.error_n(1, || {
                format!(
                    "ERROR snapshot {k}: L1 table at {:#x} overlaps the {what} at {:#x}",
                    t.offset,
                    s << cb
                )
            });
            continue;
        }
        let what = format!("L1 table of snapshot {k}");
        taken.insert(start, (end, what.clone()));
        w.add_range(t.offset, t.bytes(), cb, what);
        buf.resize(usize_from(t.bytes()), 0);
        if !w.reader.read(&img.file, img.file_len, &mut buf, t.offset)? {
            continue;
        }
        for i in 0..t.size as usize {
            let e = be64_at(&buf, i);
            if let Some(off) = l1_entry_offset(w, e, cs, || format!("snapshot {k} L1 index {i}")) {
                l2.entry(off).or_default().refs += 1;
            }
        }
    }
    Ok(())
}

/// Validates the refcount table's entries and counts the blocks (each once).
fn walk_refcount_table(img: &Qcow2Image, w: &mut Walk) {
    let cs = img.cluster_size;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (ti, &e) in img.reftable.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            w.error_n(1, || {
                format!("ERROR refcount block {ti} is not cluster aligned; refcount table entry corrupted")
            });
            continue;
        }
        if off >= img.file_len {
            w.error_n(1, || format!("ERROR refcount block {ti} is outside image"));
            continue;
        }
        if let Some(&first) = seen.get(&off) {
            w.error_n(1, || {
                format!("ERROR refcount block {ti} at {off:#x} is also refcount block {first}")
            });
            continue;
        }
        seen.insert(off, ti);
        w.inc(off / cs, 1, "refcount block");
        w.blocks[ti] = off;
    }
}
