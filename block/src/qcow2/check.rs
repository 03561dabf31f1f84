//! Consistency check, leak repair and refcount rebuild (QEMU's `qcow2_check_refcounts`).
//!
//! References are counted by walking every structure (header, L1 tables of the active image
//! and of snapshots, L2 tables, data and compressed clusters, refcount table and blocks,
//! snapshot table) and compared with the stored refcounts: a stored refcount below the
//! number of references is a corruption, above it a leak. COPIED flags are checked against
//! the refcounts as QEMU does.

use super::compressed::CompressedExtent;
use super::refcount::{get_entry, FreeMap};
use super::{
    read_exact_or_eof, Qcow2Image, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK, RESERVED_HIGH,
};
use crate::inspect::{CheckReport, RepairMode};
use crate::{Error, Result};

/// Reference counts gathered by walking the image.
struct Walk {
    refs: Vec<u32>,
    /// Clusters as the file's length gives them.
    nb_clusters: u64,
    corruptions: u64,
    check_errors: u64,
    messages: Vec<String>,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    /// Active L1 index -> (l2 offset), and data entries to check COPIED against.
    active_l2: Vec<(usize, u64)>,
    /// Tables read from the file.
    table_reads: u64,
}

impl Walk {
    fn inc(&mut self, cluster: u64, what: &str) {
        if cluster >= self.nb_clusters {
            self.corruptions += 1;
            self.messages.push(format!(
                "ERROR {what} cluster {cluster} is outside the image (file has {} clusters)",
                self.nb_clusters
            ));
            return;
        }
        let r = &mut self.refs[cluster as usize];
        *r = r.saturating_add(1);
    }

    fn inc_range(&mut self, offset: u64, len: u64, cluster_bits: u32, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> cluster_bits;
        let last = (offset + len - 1) >> cluster_bits;
        for c in first..=last {
            self.inc(c, what);
        }
    }

    fn error(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(msg);
    }
}

fn be64_at(buf: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

/// Walks one L1 table (active or snapshot) and every L2 table it references.
fn walk_l1(img: &Qcow2Image, w: &mut Walk, l1: &[u64], active: bool) -> Result<()> {
    let cs = img.cluster_size;
    let cb = img.cluster_bits;
    let mut l2 = vec![0u8; cs as usize];
    let mut last_host: Option<u64> = None;
    for (i, &e) in l1.iter().enumerate() {
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || e & RESERVED_HIGH != 0 {
            w.error(format!("ERROR l2_offset={off:#x}: L2 table is not cluster aligned or has reserved bits; L1 index {i}"));
            continue;
        }
        w.inc(off >> cb, "L2 table");
        if off >= img.file_len {
            continue;
        }
        if active {
            w.active_l2.push((i, off));
        }
        read_exact_or_eof(&img.file, &mut l2, off)?;
        w.table_reads += 1;
        for j in 0..(cs / 8) as usize {
            let e = be64_at(&l2, j);
            if e == 0 {
                continue;
            }
            if e & OFLAG_COMPRESSED != 0 {
                let ext = CompressedExtent::decode(e & !(OFLAG_COMPRESSED | OFLAG_COPIED), cb);
                if e & OFLAG_COPIED != 0 {
                    w.error(format!(
                        "ERROR: compressed cluster {} has the COPIED flag set",
                        (i as u64) * (cs / 8) + j as u64
                    ));
                }
                w.inc_range(
                    ext.offset,
                    ext.len.min(img.file_len.saturating_sub(ext.offset)).max(1),
                    cb,
                    "compressed",
                );
                if active {
                    w.allocated += 1;
                    w.compressed += 1;
                }
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if host % cs != 0 || e & RESERVED_HIGH != 0 {
                w.error(format!(
                    "ERROR offset={host:#x}: data cluster is not properly aligned or has reserved bits; L2 entry {e:#x}"
                ));
                continue;
            }
            w.inc(host >> cb, "data");
            if active && e & OFLAG_ZERO == 0 {
                w.allocated += 1;
                if let Some(prev) = last_host {
                    if host != prev + cs {
                        w.fragmented += 1;
                    }
                }
                last_host = Some(host);
            }
        }
    }
    Ok(())
}

/// Reads the snapshot table: for each snapshot its L1 table (offset, size); also counts the
/// table's own clusters.
fn walk_snapshots(img: &Qcow2Image, w: &mut Walk) -> Result<Vec<(u64, u32)>> {
    let n = img.header.nb_snapshots;
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    if n > 65536 {
        w.error(format!(
            "ERROR snapshot table has {n} entries (limit 65536)"
        ));
        return Ok(out);
    }
    let mut off = img.header.snapshots_offset;
    let start = off;
    for _ in 0..n {
        let mut fixed = [0u8; 40];
        if img.file.read_exact_at(&mut fixed, off).is_err() {
            w.check_errors += 1;
            w.messages.push("ERROR cannot read snapshot table".into());
            return Ok(out);
        }
        let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
        let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4]));
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
        let extra = u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4])) as u64;
        let entry_len = (40 + extra + id_len + name_len).div_ceil(8) * 8;
        out.push((l1_off, l1_size));
        off += entry_len;
    }
    w.inc_range(start, off - start, img.cluster_bits, "snapshot table");
    Ok(out)
}

fn walk(img: &mut Qcow2Image) -> Result<Walk> {
    let cs = img.cluster_size;
    let cb = img.cluster_bits;
    let nb_clusters = img.file_len.div_ceil(cs);
    if nb_clusters > (u32::MAX as u64) * 4 {
        return Err(Error::InvalidImage("image too large to check".into()));
    }
    let mut w = Walk {
        refs: vec![0u32; nb_clusters as usize],
        nb_clusters,
        corruptions: 0,
        check_errors: 0,
        messages: Vec::new(),
        allocated: 0,
        fragmented: 0,
        compressed: 0,
        active_l2: Vec::new(),
        table_reads: 0,
    };
    w.inc(0, "header");
    let l1_bytes = u64::from(img.header.l1_size) * 8;
    w.inc_range(img.header.l1_table_offset, l1_bytes, cb, "L1 table");
    let l1 = img.l1.clone();
    walk_l1(img, &mut w, &l1, true)?;
    for (l1_off, l1_size) in walk_snapshots(img, &mut w)? {
        if l1_off % cs != 0 || u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES {
            w.error(format!(
                "ERROR snapshot L1 table at {l1_off:#x} ({l1_size} entries) is invalid"
            ));
            continue;
        }
        w.inc_range(l1_off, u64::from(l1_size) * 8, cb, "snapshot L1 table");
        let mut raw = vec![0u8; l1_size as usize * 8];
        read_exact_or_eof(&img.file, &mut raw, l1_off)?;
        w.table_reads += 1;
        let table: Vec<u64> = (0..l1_size as usize).map(|i| be64_at(&raw, i)).collect();
        walk_l1(img, &mut w, &table, false)?;
    }
    img.walk_table_reads += w.table_reads;
    w.table_reads = 0;
    w.inc_range(
        img.header.refcount_table_offset,
        u64::from(img.header.refcount_table_clusters) * cs,
        cb,
        "refcount table",
    );
    for (i, &e) in img.reftable.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            w.error(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        if off >= img.file_len {
            w.error(format!("ERROR refcount block {i} is outside image"));
            continue;
        }
        w.inc(off >> cb, "refcount block");
    }
    Ok(w)
}

/// Reads every stored refcount for clusters `0..n` (directly from the file, after the
/// caches were written back).
fn stored_refcounts(img: &mut Qcow2Image, n: u64) -> Result<Vec<u64>> {
    let cs = img.cluster_size as usize;
    let order = img.header.refcount_order;
    let mut out = vec![0u64; n as usize];
    let mut block = vec![0u8; cs];
    for (ti, &e) in img.reftable.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        let base = ti as u64 * img.rb_entries;
        if off == 0 || base >= n || off % cs as u64 != 0 || off >= img.file_len {
            continue;
        }
        read_exact_or_eof(&img.file, &mut block, off)?;
        img.walk_table_reads += 1;
        for i in 0..img.rb_entries.min(n - base) {
            out[(base + i) as usize] = get_entry(&block, i, order);
        }
    }
    Ok(out)
}

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
        report = after;
    }
    Ok(report)
}

fn check_once(img: &mut Qcow2Image) -> Result<CheckReport> {
    let cs = img.cluster_size;
    let mut w = walk(img)?;
    let stored = stored_refcounts(img, w.nb_clusters)?;
    let mut leaks = 0u64;
    let mut highest = 0u64;
    for (c, &s) in stored.iter().enumerate() {
        let r = u64::from(w.refs[c]);
        if r > 0 || s > 0 {
            highest = c as u64 + 1;
        }
        if s < r {
            w.error(format!("ERROR cluster {c} refcount={s} reference={r}"));
        } else if s > r {
            leaks += 1;
            w.messages
                .push(format!("Leaked cluster {c} refcount={s} reference={r}"));
        }
    }
    // COPIED flags of the active tables.
    let mut l2 = vec![0u8; cs as usize];
    for (i, off) in w.active_l2.clone() {
        let l1e = img.l1[i];
        let rc = stored[(off / cs) as usize];
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            w.error(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
            ));
        }
        read_exact_or_eof(&img.file, &mut l2, off)?;
        img.walk_table_reads += 1;
        for j in 0..(cs / 8) as usize {
            let e = be64_at(&l2, j);
            if e & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host == 0 || host % cs != 0 || host >= img.file_len {
                continue;
            }
            let rc = stored[(host / cs) as usize];
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                w.error(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                ));
            }
        }
    }
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
        messages: w.messages,
        messages_dropped: 0,
    })
}

/// Repairs leaks (and with `All`, too-low refcounts and COPIED flags). Returns
/// (leaks fixed, corruptions fixed).
fn repair_image(img: &mut Qcow2Image, mode: RepairMode) -> Result<(u64, u64)> {
    let cs = img.cluster_size;
    let w = walk(img)?;
    let stored = stored_refcounts(img, w.nb_clusters)?;
    img.free_map = None;
    let mut leaks_fixed = 0;
    let mut corr_fixed = 0;
    for c in 0..w.nb_clusters {
        let r = u64::from(w.refs[c as usize]);
        let s = stored[c as usize];
        if s > r {
            img.set_refcount(c, r)?;
            leaks_fixed += 1;
        } else if s < r && mode == RepairMode::All {
            img.set_refcount(c, r)?;
            corr_fixed += 1;
        }
    }
    if mode == RepairMode::All {
        corr_fixed += fix_copied_flags(img)?;
    }
    img.flush_all()?;
    let _ = cs;
    Ok((leaks_fixed, corr_fixed))
}

/// Sets COPIED exactly where the refcount is 1 in the active L1/L2 tables.
fn fix_copied_flags(img: &mut Qcow2Image) -> Result<u64> {
    let cs = img.cluster_size;
    let mut fixed = 0;
    for i in 0..img.l1.len() {
        let e = img.l1[i];
        let off = e & L1E_OFFSET_MASK;
        if off == 0 || off % cs != 0 || off >= img.file_len {
            continue;
        }
        let rc = img.refcount(off / cs)?;
        let want = if rc == 1 { off | OFLAG_COPIED } else { off };
        if want != e {
            img.l1[i] = want;
            img.write_l1_entry(i)?;
            fixed += 1;
        }
        let slot = img.load_l2(off)?;
        for j in 0..(cs / 8) as usize {
            let e = super::cluster::read_l2(img.l2_cache.data(slot), j);
            if e & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host == 0 || host % cs != 0 || host >= img.file_len {
                continue;
            }
            let rc = img.refcount(host / cs)?;
            let want = if rc == 1 {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            if want != e {
                let slot = img.load_l2(off)?;
                super::cluster::write_l2(img.l2_cache.data_mut(slot), j, want);
                img.l2_cache.mark_dirty(slot, j * 8, 8);
                fixed += 1;
            }
        }
    }
    Ok(fixed)
}

/// Rewrites every refcount from the references found by walking the image (used when the
/// dirty bit says the stored refcounts cannot be trusted).
pub fn rebuild_refcounts(img: &mut Qcow2Image) -> Result<()> {
    let w = walk(img)?;
    if w.corruptions > 0 {
        return Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: {}",
            w.messages.first().cloned().unwrap_or_default()
        )));
    }
    let stored = stored_refcounts(img, w.nb_clusters)?;
    let mut fm = FreeMap::default();
    for (c, &r) in w.refs.iter().enumerate() {
        if r > 0 {
            fm.set_used(c as u64);
        }
    }
    for &m in &img.meta {
        fm.set_used(m);
    }
    img.free_map = Some(fm);
    let before: std::collections::HashSet<u64> = img.meta.clone();
    for c in 0..w.nb_clusters {
        let r = u64::from(w.refs[c as usize]);
        if r == 0 && img.meta.contains(&c) && !before.contains(&c) {
            // A refcount block created during this rebuild.
            continue;
        }
        if stored[c as usize] != r {
            img.set_refcount(c, r)?;
        }
    }
    img.write_dirty_refblocks()?;
    img.file
        .sync_data()
        .map_err(|e| Error::io("sync qcow2 image", e))?;
    img.rc_unsynced = false;
    img.free_map = None;
    Ok(())
}
