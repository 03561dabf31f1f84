//! Crafted qcow2 images aimed at the metadata parsers and the whole-image walks: offsets near
//! u64::MAX, lengths that wrap, snapshot tables at and past QEMU's caps, L1 tables whose
//! entries all name one L2 table, refcount tables far larger than the data, millions of
//! errors, and L2 entries that relocation and compaction must refuse to follow. Each case
//! gets a clear error or a bounded amount of work (asserted with the walk's table-read
//! counter, never with wall time), never a panic, an overflow or an unbounded allocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use block::qcow2::{Qcow2Image, Qcow2Version};
use block::{DiskImage, Error};
use common::*;

/// Where a fresh image keeps its tables.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cs: u64,
    l1: u64,
    l1_size: u64,
    rt: u64,
    /// The first refcount block.
    rb: u64,
    len: u64,
}

fn fresh(dir: &TempDir, name: &str, size: u64, cs: u64, refcount_bits: u32) -> (PathBuf, Layout) {
    let p = dir.path().join(name);
    create_qcow2(&p, Some(size), Qcow2Version::V3, cs, refcount_bits, None);
    let l = layout(&p);
    (p, l)
}

fn layout(p: &Path) -> Layout {
    let img = Qcow2Image::open(p, true).unwrap();
    let h = img.header().clone();
    drop(img);
    let rb = peek64(p, h.refcount_table_offset);
    Layout {
        cs: 1 << h.cluster_bits,
        l1: h.l1_table_offset,
        l1_size: u64::from(h.l1_size),
        rt: h.refcount_table_offset,
        rb,
        len: std::fs::metadata(p).unwrap().len(),
    }
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn peek64(p: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// `n` copies of the big-endian `v`.
fn repeat64(v: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 8);
    for _ in 0..n {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// Every way the crate can open or inspect an image fails with an error naming `needle`
/// (read-only, writable, `info`, `check`).
fn refused_everywhere(p: &Path, needle: &str) {
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    for ro in [true, false] {
        match Qcow2Image::open(p, ro) {
            Ok(_) => panic!("{name}: opened (read_only {ro}) although it is broken"),
            Err(e) => {
                assert!(matches!(e, Error::InvalidImage(_)), "{name}: {e}");
                assert!(
                    e.to_string().contains(needle),
                    "{name}: '{e}' lacks '{needle}'"
                );
            }
        }
    }
    let e = block::inspect::info(p).unwrap_err().to_string();
    assert!(e.contains(needle), "{name} (info): '{e}' lacks '{needle}'");
    let e = block::inspect::check(p, None).unwrap_err().to_string();
    assert!(e.contains(needle), "{name} (check): '{e}' lacks '{needle}'");
}

// ----- header fields ---------------------------------------------------------------------

/// The panic: `backing_file_offset` near u64::MAX wrapped the name's end offset and
/// a slice index panicked (`image info` printed a backtrace).
#[test]
fn header_offsets_near_u64_max_are_errors_not_panics() {
    let dir = temp_dir("crafted-wrap");
    let (p, _) = fresh(&dir, "backing_off.qcow2", 16 << 20, 65536, 16);
    poke(&p, 8, &0xffff_ffff_ffff_fff0u64.to_be_bytes());
    poke(&p, 16, &0x20u32.to_be_bytes());
    refused_everywhere(&p, "backing file name");

    // A name starting at the end of the first cluster.
    let (p, _) = fresh(&dir, "backing_off2.qcow2", 16 << 20, 65536, 16);
    poke(&p, 8, &65536u64.to_be_bytes());
    poke(&p, 16, &1u32.to_be_bytes());
    refused_everywhere(&p, "backing file name");

    // backing_file_size far beyond QEMU's 1023.
    let (p, _) = fresh(&dir, "backing_size.qcow2", 16 << 20, 65536, 16);
    poke(&p, 8, &0x200u64.to_be_bytes());
    poke(&p, 16, &u32::MAX.to_be_bytes());
    refused_everywhere(&p, "backing file name too long");

    // The L1 table's offset + size wraps (overflow in debug builds, a wrong end in release).
    let (p, _) = fresh(&dir, "l1_wrap.qcow2", 16 << 20, 65536, 16);
    poke(&p, 36, &8192u32.to_be_bytes());
    poke(&p, 40, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    refused_everywhere(&p, "L1 table");

    // The refcount table's offset + clusters wraps.
    let (p, _) = fresh(&dir, "rt_wrap.qcow2", 16 << 20, 65536, 16);
    poke(&p, 48, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    poke(&p, 56, &128u32.to_be_bytes());
    refused_everywhere(&p, "refcount table");

    // The snapshot table's offset + size wraps.
    let (p, _) = fresh(&dir, "snap_wrap.qcow2", 16 << 20, 65536, 16);
    poke(&p, 60, &1u32.to_be_bytes());
    poke(&p, 64, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    refused_everywhere(&p, "snapshot table");
}

fn extension(kind: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    while v.len() % 8 != 0 {
        v.push(0);
    }
    v
}

#[test]
fn header_extension_lengths_that_wrap_are_errors() {
    let dir = temp_dir("crafted-ext");
    // Fresh v3 images have their extensions at 112 (the header length).
    for (name, len) in [
        ("max", u32::MAX),
        ("pad_wraps", u32::MAX - 6),
        ("past_cluster", 65536),
    ] {
        let (p, _) = fresh(&dir, &format!("ext_{name}.qcow2"), 16 << 20, 65536, 16);
        poke(&p, 112, &extension(0x1234_5678, len, &[]));
        refused_everywhere(&p, "overruns the header cluster");
    }
}

/// Feature-table entries are untrusted text: the names of unknown features reach error
/// messages (and terminals) without control characters, whatever the table holds.
#[test]
fn feature_table_entries_are_bounded_and_sanitised() {
    let dir = temp_dir("crafted-feat");
    let (p, _) = fresh(&dir, "feat.qcow2", 16 << 20, 65536, 16);
    let mut table = Vec::new();
    let mut entry = vec![0u8; 48];
    entry[0] = 0; // incompatible
    entry[1] = 9;
    let evil = b"\x1b]0;owned\x07\x1b[2Jdanger\r\nzone";
    entry[2..2 + evil.len()].copy_from_slice(evil);
    table.extend_from_slice(&entry);
    // A bit number beyond 63, and a name without a NUL.
    let mut e2 = vec![b'A'; 48];
    e2[0] = 0;
    e2[1] = 200;
    table.extend_from_slice(&e2);
    // A trailing partial entry.
    table.extend_from_slice(&[0u8; 20]);
    poke(&p, 112, &extension(0x6803_f857, table.len() as u32, &table));
    poke(&p, 112 + 8 + table.len().div_ceil(8) as u64 * 8, &[0u8; 8]);
    poke(&p, 72, &(1u64 << 9).to_be_bytes());
    let e = match Qcow2Image::open(&p, true) {
        Ok(_) => panic!("opened with an unknown incompatible bit"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bit 9"), "{e}");
    assert!(e.contains("danger"), "{e}");
    assert!(
        !e.chars().any(|c| c.is_control()),
        "control characters reach the message: {e:?}"
    );
}

// ----- snapshot tables -------------------------------------------------------------------

/// One snapshot table entry (QEMU's layout) with 16 bytes of extra data.
fn snapshot_entry(l1_off: u64, l1_size: u32, id: &str, extra: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&l1_off.to_be_bytes());
    v.extend_from_slice(&l1_size.to_be_bytes());
    v.extend_from_slice(&(id.len() as u16).to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes()); // name_size
    v.extend_from_slice(&[0u8; 16]); // date, vm clock
    v.extend_from_slice(&0u32.to_be_bytes()); // vm_state_size
    v.extend_from_slice(&extra.to_be_bytes());
    v.extend(std::iter::repeat_n(0u8, extra.min(1024) as usize));
    v.extend_from_slice(id.as_bytes());
    v.push(b's');
    while v.len() % 8 != 0 {
        v.push(0);
    }
    v
}

/// Appends `table` (cluster aligned, at the end of the file) and points the header at it.
fn install_snapshots(p: &Path, l: &Layout, table: &[u8], n: u32) -> u64 {
    let off = std::fs::metadata(p).unwrap().len().div_ceil(l.cs) * l.cs;
    poke(p, off, table);
    let end = (off + table.len() as u64).div_ceil(l.cs) * l.cs;
    set_len(p, end.max(std::fs::metadata(p).unwrap().len()));
    poke(p, 60, &n.to_be_bytes());
    poke(p, 64, &off.to_be_bytes());
    off
}

#[test]
fn snapshot_tables_beyond_qemu_caps_are_refused_at_open() {
    let dir = temp_dir("crafted-snap");
    let cases: Vec<(&str, u32, Vec<u8>, &str)> = vec![
        // More snapshots than QEMU's 65536.
        ("count", 65537, Vec::new(), "snapshots"),
        ("count_max", u32::MAX, Vec::new(), "snapshots"),
        // An L1 table larger than QEMU's 32 MiB cap.
        (
            "l1_size",
            1,
            snapshot_entry(0x30000, (32 << 20) / 8 + 1, "1", 16),
            "L1",
        ),
        (
            "l1_size_max",
            1,
            snapshot_entry(0x30000, u32::MAX, "1", 16),
            "L1",
        ),
        // An L1 table offset that is not cluster aligned, or whose end wraps.
        ("l1_unaligned", 1, snapshot_entry(0x30200, 1, "1", 16), "L1"),
        (
            "l1_wrap",
            1,
            snapshot_entry(0xffff_ffff_ffff_0000, 4, "1", 16),
            "L1",
        ),
        // More extra data than QEMU's 1024 bytes.
        ("extra", 1, snapshot_entry(0, 0, "1", 1025), "extra data"),
    ];
    for (name, n, table, needle) in cases {
        let (p, l) = fresh(&dir, &format!("snap_{name}.qcow2"), 16 << 20, 65536, 16);
        let mut table = table;
        if table.is_empty() {
            table = vec![0u8; 4096];
        }
        install_snapshots(&p, &l, &table, n);
        refused_everywhere(&p, needle);
    }

    // A table whose entries add up to more than QEMU's 64 MiB (ids and names of 64 KiB
    // each; only their fixed parts are written, the rest of the file is a hole).
    let (p, l) = fresh(&dir, "snap_total.qcow2", 16 << 20, 65536, 16);
    let mut fixed = vec![0u8; 40];
    fixed[12..14].copy_from_slice(&0xffffu16.to_be_bytes());
    fixed[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let entry = (40 + 2 * 0xffff_u64).div_ceil(8) * 8;
    let n = 600u32;
    let off = install_snapshots(&p, &l, &fixed, n);
    for k in 1..u64::from(n) {
        poke(&p, off + k * entry, &fixed);
    }
    set_len(&p, off + u64::from(n) * entry);
    refused_everywhere(&p, "snapshot table");
}

/// Tables that must not share a cluster: an L1 entry naming a refcount block (writes through
/// that "L2 table" would rewrite refcounts), a refcount block inside the L1 table, one block
/// named twice. Reads are harmless (read-only opens work); writable opens refuse.
#[test]
fn tables_sharing_clusters_are_refused_for_writing() {
    let dir = temp_dir("crafted-share");
    for name in ["l2_is_refblock", "refblock_in_l1", "refblock_twice"] {
        let (p, l) = fresh(&dir, &format!("{name}.qcow2"), 16 << 20, 65536, 16);
        let (at, value) = match name {
            "l2_is_refblock" => (l.l1, l.rb | (1 << 63)),
            "refblock_in_l1" => (l.rt + 8, l.l1),
            _ => (l.rt + 8, l.rb),
        };
        poke(&p, at, &value.to_be_bytes());
        match Qcow2Image::open(&p, false) {
            Ok(_) => panic!("{name}: opened writable"),
            Err(e) => assert!(e.to_string().contains("overlaps"), "{name}: {e}"),
        }
        assert!(Qcow2Image::open(&p, true).is_ok(), "{name}");
    }
}

/// QEMU would read every snapshot's L1 table, once per snapshot: 65536 snapshots naming one
/// 32 MiB table would be 2 TiB of reading. Overlapping snapshot L1 tables are a corruption
/// the check reports (once), and the shared table is read once.
#[test]
fn snapshots_sharing_one_l1_table_are_read_once() {
    let dir = temp_dir("crafted-snapshare");
    let (p, l) = fresh(&dir, "share.qcow2", 16 << 20, 65536, 16);
    let l1_entries = (32u32 << 20) / 8;
    // The shared L1 table: 32 MiB of real (zero) bytes after the image.
    let shared = l.len;
    poke(&p, shared, &repeat64(0, l1_entries as usize));
    let mut table = Vec::new();
    let n = 65536u32;
    for i in 0..n {
        table.extend(snapshot_entry(shared, l1_entries, &format!("{i}"), 16));
    }
    install_snapshots(&p, &layout_len(&p, l), &table, n);
    let mut img = Qcow2Image::open_without_backing(&p, true).unwrap();
    let r = img.check(None).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    assert!(
        r.messages.iter().any(|m| m.contains("overlap")),
        "{:?}",
        &r.messages[..r.messages.len().min(5)]
    );
    assert!(
        img.walk_table_reads() < 64,
        "{} tables read for one shared L1 table",
        img.walk_table_reads()
    );
}

fn layout_len(p: &Path, l: Layout) -> Layout {
    Layout {
        len: std::fs::metadata(p).unwrap().len(),
        ..l
    }
}

/// 65536 snapshots, each with its own (distinct, non-overlapping) 32 MiB L1 table: 2 TiB of
/// L1 tables in a sparse file. The check skips what the file does not hold (holes read as
/// zeros) instead of reading 2 TiB, and still counts every cluster the tables claim.
#[test]
fn maximal_snapshot_table_in_a_sparse_file_is_checked_by_what_it_holds() {
    let dir = temp_dir("crafted-snapmax");
    let (p, l) = fresh(&dir, "max.qcow2", 16 << 20, 65536, 16);
    let l1_bytes = 32u64 << 20;
    let n = 65536u32;
    let first = l.len.div_ceil(l1_bytes) * l1_bytes;
    let mut table = Vec::new();
    for i in 0..u64::from(n) {
        table.extend(snapshot_entry(
            first + i * l1_bytes,
            (l1_bytes / 8) as u32,
            &format!("{i}"),
            16,
        ));
    }
    set_len(&p, first + u64::from(n) * l1_bytes);
    install_snapshots(&p, &layout_len(&p, l), &table, n);
    let mut img = Qcow2Image::open_without_backing(&p, true).unwrap();
    let r = img.check(None).unwrap();
    // Every cluster of every snapshot L1 table has refcount 0: one corruption each.
    let claimed = u64::from(n) * l1_bytes / l.cs;
    assert!(r.corruptions >= claimed, "{} < {claimed}", r.corruptions);
    assert!(
        img.walk_table_reads() < 64,
        "{} tables read from a file that holds almost nothing",
        img.walk_table_reads()
    );
}

// ----- L1 / L2 sharing -------------------------------------------------------------------

/// A dirty image (refcounts untrusted) whose L1 entries all name one L2 table: the refcount
/// rebuild at a writable open reads that table once, not once per L1 entry.
#[test]
fn dirty_image_with_every_l1_entry_naming_one_l2_table_reads_it_once() {
    let dir = temp_dir("crafted-dirty");
    // 512 MiB per L2 table at 64 KiB clusters: 32768 L1 entries for 16 TiB.
    let (p, l) = fresh(&dir, "dirty.qcow2", 16 << 40, 65536, 64);
    {
        let mut img = open_rw(&p);
        img.write_at(0, &[7u8; 65536]).unwrap();
    }
    let l2 = peek64(&p, l.l1) & 0x00ff_ffff_ffff_fe00;
    assert_eq!(l.l1_size, 32768);
    poke(&p, l.l1, &repeat64(l2, l.l1_size as usize));
    poke(&p, 72, &1u64.to_be_bytes()); // dirty
    let img = Qcow2Image::open(&p, false).unwrap();
    assert!(!img.is_read_only());
    assert!(
        img.walk_table_reads() <= 4,
        "the rebuild read {} tables for one L2 table",
        img.walk_table_reads()
    );
    drop(img);
    // The check reads it once too, and the rebuilt refcounts match the references.
    let mut img = Qcow2Image::open_without_backing(&p, true).unwrap();
    let r = img.check(None).unwrap();
    assert!(img.walk_table_reads() <= 4, "{}", img.walk_table_reads());
    assert_eq!(r.leaks, 0, "{r:?}");
}

/// An image with millions of problems: the check counts all of them but keeps a bounded
/// list of messages, and says how many it left out.
#[test]
fn check_messages_are_capped_and_counted() {
    let dir = temp_dir("crafted-msgs");
    // 1-bit refcounts, 64 KiB clusters: one refcount block covers 2^19 clusters.
    let (p, l) = fresh(&dir, "msgs.qcow2", 16 << 20, 65536, 1);
    let per_block = 65536 * 8;
    // Three more refcount blocks, every bit set, right after the image's clusters.
    let first = l.len / l.cs;
    for i in 0..3u64 {
        poke(&p, (first + i) * l.cs, &vec![0xffu8; l.cs as usize]);
        poke(&p, l.rt + (1 + i) * 8, &((first + i) * l.cs).to_be_bytes());
    }
    // Clusters up to 4 blocks' worth exist (a sparse file of 128 GiB).
    set_len(&p, 4 * per_block * l.cs);
    let mut img = Qcow2Image::open_without_backing(&p, true).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!(r.leaks, 3 * per_block, "{}", r.leaks);
    assert!(
        r.messages.len() <= 1100,
        "{} messages kept",
        r.messages.len()
    );
    assert!(
        r.messages_dropped >= 3 * per_block - 1100,
        "{} dropped",
        r.messages_dropped
    );
    drop(img);
    // The repair fixes them all, a bounded batch of changes at a time.
    let r = block::inspect::check(&p, Some(block::inspect::RepairMode::Leaks)).unwrap();
    assert_eq!(r.leaks_fixed, 3 * per_block);
    assert_eq!(r.leaks, 0, "{} leaks left", r.leaks);
}

// ----- relocation and compaction ---------------------------------------------------------

/// An image whose data sits above a free cluster (compaction moves it down), with one more
/// L2 entry (beyond the virtual size, where the guest never looks) set to `bad`.
fn image_with_bad_entry(dir: &TempDir, name: &str, bad: u64) -> (PathBuf, Vec<u8>) {
    let (p, l) = fresh(dir, name, 16 << 20, 65536, 16);
    let mut data = vec![0u8; 40 * 65536];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4093) as u8 | 1;
    }
    {
        let mut img = open_rw(&p);
        img.write_at(0, &data).unwrap();
    }
    let l2 = peek64(&p, l.l1) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 300 lies beyond the 256 clusters of the virtual size.
    poke(&p, l2 + 300 * 8, &bad.to_be_bytes());
    (p, data)
}

fn bad_entries(p_len: u64, top_data: u64, l1: u64) -> Vec<(&'static str, u64, &'static str)> {
    let copied = 1u64 << 63;
    vec![
        ("header", copied | 0x200, "unaligned"),
        ("unaligned", copied | (top_data + 0x200), "unaligned"),
        ("metadata", copied | l1, "metadata"),
        ("past_end", copied | (p_len + (1 << 30)), "beyond the end"),
        ("reserved", copied | (1 << 56) | top_data, "2^56"),
    ]
}

#[test]
fn compaction_refuses_bad_l2_entries_and_moves_nothing_wrong() {
    let dir = temp_dir("crafted-compact");
    let (pp, _) = image_with_bad_entry(&dir, "probe.qcow2", 0);
    let (len, top, l1) = {
        let l = layout(&pp);
        (l.len, l.len - l.cs, l.l1)
    };
    for (name, bad, needle) in bad_entries(len, top, l1) {
        let (p, data) = image_with_bad_entry(&dir, &format!("{name}.qcow2"), bad);
        {
            // Zero a low cluster so compaction has somewhere to move the top one.
            let mut img = open_rw(&p);
            img.write_at(65536, &[0u8; 65536]).unwrap();
        }
        let l2 = peek64(&p, l1) & 0x00ff_ffff_ffff_fe00;
        let err = block::inspect::compact(&p, &mut |_, _| {})
            .err()
            .unwrap_or_else(|| panic!("{name}: compaction followed a bad L2 entry"));
        assert!(matches!(err, Error::Corrupt(_)), "{name}: {err}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
        // The bad entry is as it was, and the guest's data is intact.
        assert_eq!(peek64(&p, l2 + 300 * 8), bad, "{name}: entry rewritten");
        let mut img = Qcow2Image::open(&p, true).unwrap();
        let mut got = vec![0u8; data.len()];
        img.read_at(0, &mut got).unwrap();
        let mut want = data.clone();
        want[65536..2 * 65536].fill(0);
        assert!(got == want, "{name}: guest data changed");
    }
}

#[test]
fn online_tail_relocation_refuses_bad_l2_entries() {
    let dir = temp_dir("crafted-online");
    let (pp, _) = image_with_bad_entry(&dir, "probe.qcow2", 0);
    let (len, top, l1) = {
        let l = layout(&pp);
        (l.len, l.len - l.cs, l.l1)
    };
    for (name, bad, needle) in bad_entries(len, top, l1) {
        let (p, data) = image_with_bad_entry(&dir, &format!("{name}.qcow2"), bad);
        let l2 = peek64(&p, l1) & 0x00ff_ffff_ffff_fe00;
        let mut img = open_rw(&p);
        // Free 30 clusters below the top: more than the 1 MiB of slack that starts the
        // online relocation of the tail at the next flush.
        img.discard(0, 30 * 65536).unwrap();
        let flushed = img.flush();
        if name == "metadata" {
            // Well-formed and naming no cluster it moves: online relocation does not look
            // it up (compaction does); nothing may move wrongly either way.
            flushed.unwrap();
        } else {
            let err = flushed
                .err()
                .unwrap_or_else(|| panic!("{name}: tail relocation followed a bad L2 entry"));
            assert!(matches!(err, Error::Corrupt(_)), "{name}: {err}");
            assert!(err.to_string().contains(needle), "{name}: {err}");
        }
        drop(img);
        assert_eq!(peek64(&p, l2 + 300 * 8), bad, "{name}: entry rewritten");
        let mut img = Qcow2Image::open(&p, true).unwrap();
        let mut got = vec![0u8; data.len()];
        img.read_at(0, &mut got).unwrap();
        let mut want = data.clone();
        want[..30 * 65536].fill(0);
        assert!(got == want, "{name}: guest data changed");
    }
}

// ----- refcount tables -------------------------------------------------------------------

/// A refcount table (QEMU's 8 MiB cap) whose last entry names a block with every bit set,
/// in a file sparse up to 2^55 bytes: refcounts for clusters up to 2^39. The allocator's
/// free-space index must not be sized by them (it was: 64 GiB), and a table naming one
/// block a million times must not be walked a million times.
#[test]
fn refcounts_far_beyond_the_data_do_not_size_the_allocator() {
    // tmpfs takes sparse files this large; ext4 stops at 16 TiB.
    let base = Path::new("/dev/shm");
    assert!(
        base.is_dir(),
        "/dev/shm is needed for a 2^55-byte sparse file"
    );
    let dir = temp_dir_in(base, "crafted-rt");
    let (p, l) = fresh(&dir, "far.qcow2", 16 << 20, 65536, 1);
    // A new 8 MiB refcount table after the image, its first entry copied, its last naming a
    // block of ones placed after the table.
    let rt = l.len;
    let rt_clusters = (8u64 << 20) / l.cs;
    let block = rt + rt_clusters * l.cs;
    let mut table = vec![0u8; 8 << 20];
    table[..8].copy_from_slice(&l.rb.to_be_bytes());
    let last = table.len() - 8;
    table[last..].copy_from_slice(&block.to_be_bytes());
    poke(&p, rt, &table);
    poke(&p, block, &vec![0xffu8; l.cs as usize]);
    poke(&p, 48, &rt.to_be_bytes());
    poke(&p, 56, &(rt_clusters as u32).to_be_bytes());
    set_len(&p, 1 << 55);
    {
        let mut img = open_rw(&p);
        img.write_at(0, &[5u8; 65536]).unwrap();
        img.flush().unwrap();
        let mut buf = vec![0u8; 65536];
        img.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 5));
    }
    // The block of ones (and the old refcount table, no longer named) leak.
    let r = block::inspect::check(&p, None).unwrap();
    assert_eq!(r.leaks, 65536 * 8 + 1, "{} leaks", r.leaks);

    // Every entry of that table naming the same block: a corruption, read once.
    let dup = vec![0u8; 8 << 20]
        .chunks(8)
        .enumerate()
        .flat_map(|(i, _)| if i == 0 { l.rb } else { block }.to_be_bytes())
        .collect::<Vec<u8>>();
    poke(&p, rt, &dup);
    let mut img = Qcow2Image::open_without_backing(&p, true).unwrap();
    let r = img.check(None).unwrap();
    assert!(r.corruptions > 0, "{} corruptions", r.corruptions);
    assert!(img.walk_table_reads() < 64, "{}", img.walk_table_reads());
    drop(img);
    match Qcow2Image::open(&p, false) {
        Ok(img) => assert!(img.is_read_only()),
        Err(e) => assert!(e.to_string().contains("refcount block"), "{e}"),
    }
}

/// Two L1 entries naming one L2 table (with COPIED: a corruption) whose table sits at the
/// file's tail: moving it repointed one entry and freed the cluster the other still named.
/// A metadata cluster moves only when exactly one table entry names it.
#[test]
fn a_shared_l2_table_is_not_moved_from_under_its_other_l1_entry() {
    let dir = temp_dir("crafted-sharedl2");
    let (p, l) = fresh(&dir, "shared.qcow2", 3 << 29, 65536, 16);
    {
        let mut img = open_rw(&p);
        img.write_at(0, &[1u8; 4 * 65536]).unwrap();
        img.write_at(1 << 29, &[2u8; 65536]).unwrap();
    }
    let t1 = peek64(&p, l.l1 + 8);
    poke(&p, l.l1 + 16, &t1.to_be_bytes());
    let mut img = open_rw(&p);
    // Free the data after the table and a cluster below it: the table becomes the tail
    // and has somewhere to go.
    img.discard(1 << 29, 65536).unwrap();
    img.discard(0, 65536).unwrap();
    let err = img
        .flush()
        .expect_err("the shared L2 table was moved away from one of its L1 entries");
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("cannot move"), "{err}");
    drop(img);
    assert_eq!(peek64(&p, l.l1 + 8), t1);
    assert_eq!(peek64(&p, l.l1 + 16), t1);
}
