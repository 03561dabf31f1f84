//! Consistency check, leak repair and refcount rebuild (QEMU's `qcow2_check_refcounts`).
//!
//! References are counted by walking every structure (`walk`) and compared with the
//! stored refcounts (`stored`): a stored refcount below the number of references is a
//! corruption, above it a leak. COPIED flags are checked against the refcounts as QEMU does.
//!
//! A hostile image bounds none of this by itself, so the work is bounded here by what the
//! image holds: each table is read once, holes are skipped, references are counted sparsely
//! in sparse files and metadata tables as ranges, stored refcounts are streamed, and the
//! messages are capped (every problem is still counted; [`CheckReport::messages_dropped`]
//! says how many lines were left out).

mod refs;
pub mod report;
mod stored;
mod walk;

use stored::{compare, Item, StoredReader};
use walk::{walk, Walk};

use super::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::free_map::FreeMap;
use super::image::Qcow2Image;
use crate::cast::usize_from;
use crate::error::{Error, Result};
use report::{CheckReport, RepairMode};

/// Repairs give at most this many clusters of metadata tables a refcount they lack (each is
/// one refcount update; a hostile snapshot table can claim 2^32 such clusters).
const MAX_RANGE_REPAIR: u64 = 1 << 24;

/// Checks `img`; with `repair`, fixes what the mode allows and checks again.
pub fn check(img: &mut Qcow2Image, repair: Option<RepairMode>) -> Result<CheckReport> {
    if !img.read_only {
        img.flush_all()?;
    }
    let mut report = check_once(img)?;
    if let Some(mode) = repair {
        if img.read_only {
            return Err(Error::ReadOnly);
        }
        let (leaks_fixed, corruptions_fixed) = repair_image(img, mode)?;
        let mut after = check_once(img)?;
        after.leaks_fixed = leaks_fixed;
        after.corruptions_fixed = corruptions_fixed;
        let mut msgs = report.messages;
        msgs.append(&mut after.messages);
        after.messages = msgs;
        after.messages_dropped += report.messages_dropped;
        report = after;
    }
    Ok(report)
}

/// Walks the image, its references put in cluster order for the comparisons.
fn walk_sorted(img: &Qcow2Image) -> Result<Walk> {
    let mut w = walk(img)?;
    let refs = std::mem::replace(&mut w.refs, refs::Refs::Sparse(Default::default()));
    w.refs_sorted = Some(refs.into_sorted());
    Ok(w)
}

/// Compares the references `w` counted with the stored refcounts from cluster `from` on,
/// calling `f` for each cluster (or run of metadata clusters) that has either, while `f`
/// says to go on; returns where it stopped (`None`: at the end).
fn compare_from(
    img: &mut Qcow2Image,
    w: &mut Walk,
    from: u64,
    f: &mut dyn FnMut(&mut Walk, Item) -> Result<bool>,
) -> Result<Option<u64>> {
    let refs = w
        .refs_sorted
        .take()
        .unwrap_or(refs::SortedRefs::Sparse(Vec::new()));
    let blocks = std::mem::take(&mut w.blocks);
    let ranges = std::mem::take(&mut w.ranges);
    let mut reader = std::mem::take(&mut w.reader);
    let nb = w.nb_clusters;
    let r = compare(
        img,
        &blocks,
        &mut reader,
        nb,
        &refs,
        &ranges,
        from,
        &mut |item| f(w, item),
    );
    img.walk_table_reads += reader.reads;
    reader.reads = 0;
    w.blocks = blocks;
    w.ranges = ranges;
    w.reader = reader;
    w.refs_sorted = Some(refs);
    r
}

fn check_once(img: &mut Qcow2Image) -> Result<CheckReport> {
    let cs = img.cluster_size;
    let mut leaks = 0u64;
    let mut highest = 0u64;
    let mut w = walk_sorted(img)?;
    compare_from(img, &mut w, 0, &mut |w, item| {
        match item {
            Item::One {
                cluster: c,
                stored: s,
                refs: r,
            } => {
                highest = c + 1;
                if s < r {
                    w.corruptions += 1;
                    w.messages
                        .push(|| format!("ERROR cluster {c} refcount={s} reference={r}"));
                } else if s > r {
                    leaks += 1;
                    w.messages
                        .push(|| format!("Leaked cluster {c} refcount={s} reference={r}"));
                }
            }
            Item::Bulk { start, end } => {
                highest = end;
                w.corruptions += end - start;
                w.messages.push(|| {
                    format!(
                        "ERROR clusters {start}..{end} (metadata tables) refcount=0 reference=1"
                    )
                });
            }
        }
        Ok(true)
    })?;
    check_copied(img, &mut w)?;
    Ok(CheckReport {
        filename: img.path.display().to_string(),
        format: "qcow2".into(),
        corruptions: w.corruptions,
        leaks,
        check_errors: w.check_errors,
        corruptions_fixed: 0,
        leaks_fixed: 0,
        image_end_offset: Some(highest * cs),
        total_clusters: Some(img.header.size.div_ceil(cs)),
        allocated_clusters: Some(w.allocated),
        fragmented_clusters: Some(w.fragmented),
        compressed_clusters: Some(w.compressed),
        messages: std::mem::take(&mut w.messages.list),
        messages_dropped: w.messages.dropped,
    })
}

/// COPIED flags of the active tables against the stored refcounts (set exactly where the
/// refcount is 1), each table once, the refcounts read in cluster order.
fn check_copied(img: &mut Qcow2Image, w: &mut Walk) -> Result<()> {
    let cs = img.cluster_size;
    let mut l1 = std::mem::take(&mut w.l1_copied);
    let mut data = std::mem::take(&mut w.data_copied);
    l1.sort_unstable();
    data.sort_unstable_by_key(|e| e & L2E_OFFSET_MASK);
    let mut reader = std::mem::take(&mut w.reader);
    let mut corruptions = 0u64;
    let mut messages = std::mem::take(&mut w.messages);
    {
        let mut stored = StoredReader::new(img, &w.blocks, &mut reader);
        for (c, i) in l1 {
            let rc = stored.get(c)?;
            let l1e = img.l1[i];
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                corruptions += 1;
                messages.push(|| {
                    format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
                });
            }
        }
        for e in data {
            let rc = stored.get((e & L2E_OFFSET_MASK) / cs)?;
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                corruptions += 1;
                messages.push(|| {
                    format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                });
            }
        }
    }
    img.walk_table_reads += reader.reads;
    w.corruptions += corruptions;
    w.messages = messages;
    Ok(())
}

/// Refcount changes applied per batch by repair and rebuild (so their memory is bounded
/// whatever the number of problems: 24 bytes each).
const CHANGE_BATCH: usize = 1 << 20;

/// A refcount change of a repair or rebuild.
enum Change {
    /// `(cluster, new refcount, whether it was a leak)`.
    One(u64, u64, bool),
    /// Clusters of metadata tables that need a refcount of 1.
    Run(u64, u64),
}

/// Compares and applies the changes `decide` asks for, a batch at a time (the refcount
/// blocks are written back between batches, so the next comparison reads them as changed).
/// Returns (leaks fixed, corruptions fixed).
fn apply_changes(
    img: &mut Qcow2Image,
    w: &mut Walk,
    decide: &mut dyn FnMut(Item) -> Option<Change>,
) -> Result<(u64, u64)> {
    let before = img.meta.clone();
    let mut from = 0;
    let mut fixed = (0u64, 0u64);
    loop {
        let mut batch = Vec::new();
        let next = compare_from(img, w, from, &mut |_, item| {
            batch.extend(decide(item));
            Ok(batch.len() < CHANGE_BATCH)
        })?;
        for change in batch {
            match change {
                Change::One(c, r, leak) => {
                    if r == 0 && img.meta.contains(&c) && !before.contains(&c) {
                        // A refcount block created by an earlier change.
                        continue;
                    }
                    img.set_refcount(c, r)?;
                    if leak {
                        fixed.0 += 1;
                    } else {
                        fixed.1 += 1;
                    }
                }
                Change::Run(a, b) => {
                    for c in a..b {
                        img.set_refcount(c, 1)?;
                    }
                    fixed.1 += b - a;
                }
            }
        }
        img.write_dirty_refblocks()?;
        w.reader.forget_holes();
        match next {
            Some(n) => from = n,
            None => return Ok(fixed),
        }
    }
}

/// Repairs leaks (and with `All`, too-low refcounts and COPIED flags). Returns
/// (leaks fixed, corruptions fixed).
fn repair_image(img: &mut Qcow2Image, mode: RepairMode) -> Result<(u64, u64)> {
    let mut w = walk_sorted(img)?;
    if mode == RepairMode::All {
        let mut run_clusters = 0u64;
        compare_from(img, &mut w, 0, &mut |_, item| {
            if let Item::Bulk { start, end } = item {
                run_clusters += end - start;
            }
            Ok(run_clusters <= MAX_RANGE_REPAIR)
        })?;
        if run_clusters > MAX_RANGE_REPAIR {
            return Err(Error::InvalidImage(format!(
                "more than {MAX_RANGE_REPAIR} clusters of metadata tables have no refcount: too many to repair"
            )));
        }
    }
    // Clusters about to gain references must not be handed out to new refcount blocks
    // meanwhile.
    img.free_map = None;
    img.ensure_free_map()?;
    if let (Some(fm), Some(refs)) = (img.free_map.as_mut(), w.refs_sorted.as_ref()) {
        for (c, _) in refs.iter() {
            fm.set_used(c);
        }
        for r in &w.ranges {
            fm.set_used_range(r.start, r.end);
        }
    }
    let (leaks_fixed, mut corr_fixed) = apply_changes(img, &mut w, &mut |item| match item {
        Item::One {
            cluster,
            stored,
            refs,
        } if stored > refs || (stored < refs && mode == RepairMode::All) => {
            Some(Change::One(cluster, refs, stored > refs))
        }
        Item::Bulk { start, end } if mode == RepairMode::All => Some(Change::Run(start, end)),
        _ => None,
    })?;
    drop(w);
    if mode == RepairMode::All {
        corr_fixed += fix_copied_flags(img)?;
    }
    img.flush_all()?;
    Ok((leaks_fixed, corr_fixed))
}

/// Sets COPIED exactly where the refcount is 1 in the active L1/L2 tables (each L2 table
/// once; tables overlapping other metadata are left alone).
fn fix_copied_flags(img: &mut Qcow2Image) -> Result<u64> {
    let cs = img.cluster_size;
    img.write_dirty_refblocks()?;
    let Walk {
        l1_copied: mut l1,
        blocks,
        mut reader,
        ..
    } = walk(img)?;
    l1.sort_unstable();
    let refblocks: std::collections::HashSet<u64> = img
        .reftable
        .iter()
        .map(|e| (e & super::entry::REFT_OFFSET_MASK) / cs)
        .filter(|&c| c != 0)
        .collect();
    let fixed = img.fixed_metadata();
    let conflicts = |off: u64| {
        let c = off / cs;
        refblocks.contains(&c) || fixed.iter().any(|r| r.contains(&c))
    };
    // (host cluster, L2 table offset, index) of every data entry of a distinct active table.
    let mut data: Vec<(u64, u64, usize)> = Vec::new();
    let mut tables: Vec<u64> = l1.iter().map(|&(c, _)| c * cs).collect();
    tables.sort_unstable();
    tables.dedup();
    let mut buf = vec![0u8; usize_from(cs)];
    for &off in &tables {
        if conflicts(off) || !reader.read(&img.file, img.file_len, &mut buf, off)? {
            continue;
        }
        for j in 0..(cs / 8) as usize {
            let e = super::entry::read_l2(&buf, j);
            let host = e & L2E_OFFSET_MASK;
            if e & OFLAG_COMPRESSED != 0 || host == 0 || host % cs != 0 || host >= img.file_len {
                continue;
            }
            data.push((host / cs, off, j));
        }
    }
    data.sort_unstable();
    let mut l1_want = Vec::new();
    let mut l2_want = Vec::new();
    {
        let mut stored = StoredReader::new(img, &blocks, &mut reader);
        for &(c, i) in &l1 {
            l1_want.push((i, stored.get(c)? == 1));
        }
        for &(c, off, j) in &data {
            l2_want.push((off, j, stored.get(c)? == 1));
        }
    }
    img.walk_table_reads += reader.reads;
    let mut fixed = 0;
    for (i, copied) in l1_want {
        let e = img.l1[i];
        let off = e & L1E_OFFSET_MASK;
        let want = if copied { off | OFLAG_COPIED } else { off };
        if want != e && !conflicts(off) {
            img.l1[i] = want;
            img.write_l1_entry(i)?;
            fixed += 1;
        }
    }
    l2_want.sort_unstable();
    for (off, j, copied) in l2_want {
        let slot = img.load_l2(off)?;
        let e = super::entry::read_l2(img.l2_cache.data(slot), j);
        let want = if copied {
            e | OFLAG_COPIED
        } else {
            e & !OFLAG_COPIED
        };
        if want != e {
            super::entry::write_l2(img.l2_cache.data_mut(slot), j, want);
            img.l2_cache.mark_dirty(slot, j * 8, 8);
            fixed += 1;
        }
    }
    Ok(fixed)
}

/// Rewrites every refcount from the references found by walking the image (used when the
/// dirty bit says the stored refcounts cannot be trusted).
pub fn rebuild_refcounts(img: &mut Qcow2Image) -> Result<()> {
    let rc_max = img.rc_max;
    let mut w = walk_sorted(img)?;
    if w.corruptions > 0 {
        return Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: {}",
            w.messages.list.first().cloned().unwrap_or_default()
        )));
    }
    // Everything that would stop the rebuild, found before anything changes.
    compare_from(img, &mut w, 0, &mut |_, item| {
        match item {
        Item::One { cluster, refs, .. } if refs > rc_max => Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: cluster {cluster} has {refs} references, more than the refcount width holds ({rc_max})"
        ))),
        Item::One { .. } => Ok(true),
        Item::Bulk { start, end } => Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: clusters {start}..{end} of metadata tables have none (run `thinvm image check -r all`)"
        ))),
    }
    })?;
    let mut fm = FreeMap::default();
    if let Some(refs) = &w.refs_sorted {
        for (c, _) in refs.iter() {
            fm.set_used(c);
        }
    }
    for r in &w.ranges {
        fm.set_used_range(r.start, r.end);
    }
    for &m in &img.meta {
        fm.set_used(m);
    }
    img.free_map = Some(fm);
    apply_changes(img, &mut w, &mut |item| match item {
        Item::One {
            cluster,
            stored,
            refs,
        } if stored != refs => Some(Change::One(cluster, refs, stored > refs)),
        _ => None,
    })?;
    img.file
        .sync_data()
        .map_err(|e| Error::io("sync qcow2 image", e))?;
    img.rc_unsynced = false;
    img.free_map = None;
    Ok(())
}

impl Qcow2Image {
    /// Consistency check (and repair), as `qemu-img check [-r]`.
    pub fn check(
        &mut self,
        repair: Option<crate::inspect::RepairMode>,
    ) -> Result<crate::inspect::CheckReport> {
        check(self, repair)
    }
}
