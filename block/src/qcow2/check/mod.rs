//! Consistency check, leak repair and refcount rebuild (QEMU's `qcow2_check_refcounts`).
//!
//! References are counted by walking every structure ([`walk`]) and compared with the
//! stored refcounts ([`stored`]): a stored refcount below the number of references is a
//! corruption, above it a leak. COPIED flags are checked against the refcounts as QEMU does.
//!
//! A hostile image bounds none of this by itself, so the work is bounded here by what the
//! image holds: each table is read once, holes are skipped, references are counted sparsely
//! in sparse files and metadata tables as ranges, stored refcounts are streamed, and the
//! messages are capped (every problem is still counted; [`CheckReport::messages_dropped`]
//! says how many lines were left out).

mod refs;
mod stored;
mod walk;

use stored::{compare, Item, StoredReader};
use walk::{walk, Walk};

use super::free_map::FreeMap;
use super::{Qcow2Image, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::inspect::{CheckReport, RepairMode};
use crate::{Error, Result};

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

/// Walks the image and compares the references with the stored refcounts, calling `f` for
/// each cluster (or run of metadata clusters) that has either.
fn walk_and_compare(
    img: &mut Qcow2Image,
    f: &mut dyn FnMut(&mut Walk, Item) -> Result<()>,
) -> Result<Walk> {
    let mut w = walk(img)?;
    let refs = std::mem::replace(&mut w.refs, refs::Refs::Sparse(Default::default())).into_sorted();
    let blocks = std::mem::take(&mut w.blocks);
    let ranges = std::mem::take(&mut w.ranges);
    let mut reader = std::mem::take(&mut w.reader);
    let r = compare(
        img,
        &blocks,
        &mut reader,
        w.nb_clusters,
        &refs,
        &ranges,
        &mut |item| f(&mut w, item),
    );
    img.walk_table_reads += reader.reads;
    reader.reads = 0;
    w.blocks = blocks;
    w.ranges = ranges;
    w.reader = reader;
    w.refs_sorted = Some(refs);
    r.map(|()| w)
}

fn check_once(img: &mut Qcow2Image) -> Result<CheckReport> {
    let cs = img.cluster_size;
    let mut leaks = 0u64;
    let mut highest = 0u64;
    let mut w = walk_and_compare(img, &mut |w, item| {
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
        Ok(())
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

/// Refcount changes a repair or rebuild makes: `(cluster, new refcount, was a leak)`, and
/// runs of metadata clusters that need a refcount of 1.
#[derive(Default)]
struct Changes {
    ones: Vec<(u64, u64, bool)>,
    runs: Vec<(u64, u64)>,
    run_clusters: u64,
}

/// Repairs leaks (and with `All`, too-low refcounts and COPIED flags). Returns
/// (leaks fixed, corruptions fixed).
fn repair_image(img: &mut Qcow2Image, mode: RepairMode) -> Result<(u64, u64)> {
    let mut ch = Changes::default();
    let w = walk_and_compare(img, &mut |_, item| {
        match item {
            Item::One {
                cluster,
                stored,
                refs,
            } => {
                if stored > refs || (stored < refs && mode == RepairMode::All) {
                    ch.ones.push((cluster, refs, stored > refs));
                }
            }
            Item::Bulk { start, end } => {
                if mode == RepairMode::All {
                    ch.runs.push((start, end));
                    ch.run_clusters += end - start;
                }
            }
        }
        Ok(())
    })?;
    if ch.run_clusters > MAX_RANGE_REPAIR {
        return Err(Error::InvalidImage(format!(
            "{} clusters of metadata tables have no refcount: more than {MAX_RANGE_REPAIR} to repair",
            ch.run_clusters
        )));
    }
    // Clusters about to gain references must not be handed out to new refcount blocks
    // meanwhile.
    img.free_map = None;
    img.ensure_free_map()?;
    if let Some(fm) = img.free_map.as_mut() {
        for &(c, r, _) in &ch.ones {
            if r > 0 {
                fm.set_used(c);
            }
        }
        for &(a, b) in &ch.runs {
            fm.set_used_range(a, b);
        }
    }
    drop(w);
    let mut leaks_fixed = 0;
    let mut corr_fixed = 0;
    for (c, r, leak) in ch.ones {
        img.set_refcount(c, r)?;
        if leak {
            leaks_fixed += 1;
        } else {
            corr_fixed += 1;
        }
    }
    for (a, b) in ch.runs {
        for c in a..b {
            img.set_refcount(c, 1)?;
        }
        corr_fixed += b - a;
    }
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
        .map(|e| (e & super::REFT_OFFSET_MASK) / cs)
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
    let mut buf = vec![0u8; cs as usize];
    for &off in &tables {
        if conflicts(off) || !reader.read(&img.file, img.file_len, &mut buf, off)? {
            continue;
        }
        for j in 0..(cs / 8) as usize {
            let e = super::cluster::read_l2(&buf, j);
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
        let e = super::cluster::read_l2(img.l2_cache.data(slot), j);
        let want = if copied {
            e | OFLAG_COPIED
        } else {
            e & !OFLAG_COPIED
        };
        if want != e {
            super::cluster::write_l2(img.l2_cache.data_mut(slot), j, want);
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
    let mut ch = Changes::default();
    let w = walk_and_compare(img, &mut |_, item| {
        match item {
        Item::One {
            cluster,
            stored,
            refs,
        } => {
            if refs > rc_max {
                return Err(Error::Corrupt(format!(
                    "cannot rebuild refcounts: cluster {cluster} has {refs} references, more than the refcount width holds ({rc_max})"
                )));
            }
            if stored != refs {
                ch.ones.push((cluster, refs, stored > refs));
            }
            Ok(())
        }
        Item::Bulk { start, end } => Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: clusters {start}..{end} of metadata tables have none (run `thinvm image check -r all`)"
        ))),
    }
    })?;
    if w.corruptions > 0 {
        return Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: {}",
            w.messages.list.first().cloned().unwrap_or_default()
        )));
    }
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
    drop(w);
    img.free_map = Some(fm);
    let before = img.meta.clone();
    for (c, r, _) in ch.ones {
        if r == 0 && img.meta.contains(&c) && !before.contains(&c) {
            // A refcount block created during this rebuild.
            continue;
        }
        img.set_refcount(c, r)?;
    }
    img.write_dirty_refblocks()?;
    img.file
        .sync_data()
        .map_err(|e| Error::io("sync qcow2 image", e))?;
    img.rc_unsynced = false;
    img.free_map = None;
    Ok(())
}
