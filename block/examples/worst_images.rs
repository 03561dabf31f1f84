//! Writes the worst crafted qcow2 images we know for time and memory, to measure what
//! `thinvm image check` / `info` and a writable open cost on them (docs/benchmarks.md,
//! "hostile images: cost bounds"). Every image is small on disk: the claims are made by
//! tables and sparse file lengths.
//!
//! `cargo run --release -p block --example worst_images -- DIR [SHM_DIR]`
//!
//! SHM_DIR (default /dev/shm) is for the images whose sparse length (2^55 bytes) only tmpfs
//! or XFS accept; ext4 stops at 16 TiB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use block::qcow2::{create, CreateOptions, Qcow2Image, Qcow2Version};

struct Made {
    l1: u64,
    l1_size: u64,
    rt: u64,
    rb: u64,
    len: u64,
    cs: u64,
}

fn make(p: &Path, size: u64, cs: u64, refcount_bits: u32) -> Made {
    create(
        p,
        &CreateOptions {
            size: Some(size),
            cluster_size: cs,
            version: Qcow2Version::V3,
            refcount_bits,
            backing_file: None,
            backing_format: None,
        },
    )
    .unwrap();
    let img = Qcow2Image::open(p, true).unwrap();
    let h = img.header().clone();
    drop(img);
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, h.refcount_table_offset)
        .unwrap();
    Made {
        l1: h.l1_table_offset,
        l1_size: u64::from(h.l1_size),
        rt: h.refcount_table_offset,
        rb: u64::from_be_bytes(b),
        len: std::fs::metadata(p).unwrap().len(),
        cs,
    }
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

fn set_len(p: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn repeat64(v: u64, n: u64) -> Vec<u8> {
    (0..n).flat_map(|_| v.to_be_bytes()).collect()
}

fn snapshot_entry(l1_off: u64, l1_size: u32, i: u32) -> Vec<u8> {
    let id = format!("{i}");
    let mut v = Vec::new();
    v.extend_from_slice(&l1_off.to_be_bytes());
    v.extend_from_slice(&l1_size.to_be_bytes());
    v.extend_from_slice(&(id.len() as u16).to_be_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&[0u8; 20]);
    v.extend_from_slice(&16u32.to_be_bytes());
    v.extend_from_slice(&[0u8; 16]);
    v.extend_from_slice(id.as_bytes());
    v.push(b's');
    while v.len() % 8 != 0 {
        v.push(0);
    }
    v
}

/// A dirty image whose `entries` L1 entries all name one L2 table of 8192 data entries
/// (64 KiB clusters, 64-bit refcounts so the rebuild can hold the counts).
fn l1_one_l2(dir: &Path, name: &str, entries: u64) -> PathBuf {
    let p = dir.join(name);
    let m = make(&p, entries << 29, 65536, 64);
    assert_eq!(m.l1_size, entries);
    let l2 = m.len;
    let data = l2 + m.cs;
    let table: Vec<u8> = (0..8192u64)
        .flat_map(|j| ((data + j * m.cs) | (1 << 63)).to_be_bytes())
        .collect();
    poke(&p, l2, &table);
    poke(&p, m.l1, &repeat64(l2, entries));
    set_len(&p, data + 8192 * m.cs);
    poke(&p, 72, &1u64.to_be_bytes());
    p
}

/// 65536 snapshots, each with its own 32 MiB L1 table: 2 TiB of L1 tables in a sparse file.
fn snapshots_max(dir: &Path) -> PathBuf {
    let p = dir.join("snapshots-max.qcow2");
    let m = make(&p, 16 << 20, 65536, 16);
    let l1_bytes = 32u64 << 20;
    let first = m.len.div_ceil(l1_bytes) * l1_bytes;
    let n = 65536u32;
    let table: Vec<u8> = (0..n)
        .flat_map(|i| snapshot_entry(first + u64::from(i) * l1_bytes, (l1_bytes / 8) as u32, i))
        .collect();
    let off = first + u64::from(n) * l1_bytes;
    poke(&p, off, &table);
    poke(&p, 60, &n.to_be_bytes());
    poke(&p, 64, &off.to_be_bytes());
    p
}

/// 65536 snapshots naming one real 32 MiB L1 table.
fn snapshots_shared(dir: &Path) -> PathBuf {
    let p = dir.join("snapshots-shared.qcow2");
    let m = make(&p, 16 << 20, 65536, 16);
    let l1_bytes = 32u64 << 20;
    let shared = m.len;
    poke(&p, shared, &vec![0u8; l1_bytes as usize]);
    let n = 65536u32;
    let table: Vec<u8> = (0..n)
        .flat_map(|i| snapshot_entry(shared, (l1_bytes / 8) as u32, i))
        .collect();
    let off = shared + l1_bytes;
    poke(&p, off, &table);
    poke(&p, 60, &n.to_be_bytes());
    poke(&p, 64, &off.to_be_bytes());
    p
}

/// An 8 MiB refcount table (QEMU's cap, 1-bit refcounts, 64 KiB clusters) in a 2^55-byte
/// sparse file: its last entry names a block of ones (refcounts for clusters up to 2^39),
/// or, with `dup`, every entry names that block.
fn reftable_far(dir: &Path, name: &str, dup: bool) -> PathBuf {
    let p = dir.join(name);
    let m = make(&p, 16 << 20, 65536, 1);
    let rt = m.len;
    let rt_clusters = (8u64 << 20) / m.cs;
    let block = rt + rt_clusters * m.cs;
    let mut table = if dup {
        repeat64(block, 1 << 20)
    } else {
        vec![0u8; 8 << 20]
    };
    table[..8].copy_from_slice(&m.rb.to_be_bytes());
    let last = table.len() - 8;
    table[last..].copy_from_slice(&block.to_be_bytes());
    poke(&p, rt, &table);
    poke(&p, block, &vec![0xffu8; m.cs as usize]);
    poke(&p, 48, &rt.to_be_bytes());
    poke(&p, 56, &(rt_clusters as u32).to_be_bytes());
    set_len(&p, 1 << 55);
    p
}

/// Refcount blocks full of ones (1-bit refcounts, 64 KiB clusters): `blocks` distinct real
/// blocks, each 2^19 leaked clusters.
fn leaks(dir: &Path, blocks: u64) -> PathBuf {
    let p = dir.join(format!("leaks-{blocks}.qcow2"));
    let m = make(&p, 16 << 20, 65536, 1);
    let first = m.len / m.cs;
    for i in 0..blocks {
        poke(&p, (first + i) * m.cs, &vec![0xffu8; m.cs as usize]);
        poke(&p, m.rt + (1 + i) * 8, &((first + i) * m.cs).to_be_bytes());
    }
    set_len(&p, (1 + blocks) * 65536 * 8 * m.cs);
    p
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: worst_images DIR [SHM_DIR]"));
    let shm = PathBuf::from(args.next().unwrap_or_else(|| "/dev/shm".into()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&shm).unwrap();
    let made = [
        l1_one_l2(&dir, "l1-one-l2-64k.qcow2", 1 << 16),
        l1_one_l2(&dir, "l1-one-l2-4m.qcow2", 1 << 22),
        snapshots_max(&dir),
        snapshots_shared(&dir),
        leaks(&dir, 15),
        leaks(&dir, 255),
        reftable_far(&shm, "reftable-far.qcow2", false),
        reftable_far(&shm, "reftable-dup.qcow2", true),
    ];
    for p in made {
        println!("{}", p.display());
    }
}
