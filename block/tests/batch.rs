//! Batched writes (`DiskImage::write_many`) into a fresh overlay: copy on write of partially
//! written clusters from a raw and from a compressed qcow2 backing file, the last cluster past
//! an unaligned virtual size, requests sharing a cluster, and requests mixing allocated and
//! new clusters. QEMU's tools check the result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use block::qcow2::Qcow2Version;
use block::{DiskImage, ImageFormat, OpenOptions};
use common::*;

const CS: u64 = 65536;
/// Not a multiple of the cluster size: the last cluster is partly past the end.
const SIZE: u64 = 3 * (1 << 20) + 4608;

fn open(path: &std::path::Path, direct: bool) -> Box<dyn DiskImage> {
    block::open(
        path,
        &OpenOptions {
            direct,
            format: Some(ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The batch: (offset, length, byte) of each write, and how it is split into pieces.
fn batch() -> Vec<(u64, u64, u8)> {
    vec![
        (4096, 4096, 0x11),             // head and tail copied from the backing file
        (CS + 100, 3 * CS, 0x22),       // spans four clusters, unaligned at both ends
        (5 * CS + 512, 512, 0x33),      // one sector
        (5 * CS + 8192, 4096, 0x44),    // same cluster as the one before: a new segment
        (7 * CS, CS, 0x55),             // a whole cluster: nothing to copy
        (SIZE - 1000, 1000, 0x66),      // the last cluster, partly past the end
        (20 * CS - 4096, 8192, 0x77),   // two clusters, the tail of one and head of the next
        (2 * CS + 4096, 4096, 0x88),    // inside a cluster written earlier in the batch
        (30 * CS + 333, 2 * CS, 0x99),  // unaligned in the file, too
        (40 * CS, 4 * CS + 4096, 0xaa), // four whole clusters and a head
    ]
}

fn run_batch(img: &mut dyn DiskImage, model: &mut [u8], reqs: &[(u64, u64, u8)]) {
    let datas: Vec<Vec<u8>> = reqs.iter().map(|&(_, l, b)| vec![b; l as usize]).collect();
    // Uneven pieces, as guest pages would be.
    let pieces: Vec<Vec<&[u8]>> = datas
        .iter()
        .map(|d| {
            let mut v = Vec::new();
            let mut rest = &d[..];
            let mut n = 700;
            while !rest.is_empty() {
                let (a, b) = rest.split_at(n.min(rest.len()));
                v.push(a);
                rest = b;
                n = n * 3 % 9001 + 1;
            }
            v
        })
        .collect();
    let batch: Vec<(u64, &[&[u8]])> = reqs
        .iter()
        .zip(&pieces)
        .map(|(&(o, _, _), p)| (o, &p[..]))
        .collect();
    let mut scratch = Vec::new();
    img.write_many(&batch, 8, &mut scratch).unwrap();
    for &(o, l, b) in reqs {
        model[o as usize..(o + l) as usize].fill(b);
    }
}

fn check(overlay: &std::path::Path, model: &[u8], dir: &TempDir, what: &str) {
    let mut img = open_ro(overlay);
    assert_bytes_eq(&read_all(img.as_mut()), model, what);
    drop(img);
    assert_qemu_clean(overlay);
    let want = dir.path().join("want.raw");
    std::fs::write(&want, model).unwrap();
    assert_same(overlay, &want);
}

#[test]
fn batched_allocating_writes_copy_on_write_like_qemu() {
    for version in [Qcow2Version::V3, Qcow2Version::V2] {
        for compressed_base in [false, true] {
            for direct in [false, true] {
                let what = format!("{version:?} compressed base {compressed_base} direct {direct}");
                let dir = temp_dir("batch");
                let raw = dir.path().join("base.raw");
                let mut model = patterned_raw(&raw, SIZE);
                let (base, fmt) = base_image(&dir, &raw, compressed_base);
                let overlay = dir.path().join("overlay.qcow2");
                create_qcow2(&overlay, None, version, CS, 16, Some((s(&base), fmt)));
                {
                    let mut img = open(&overlay, direct);
                    // Something allocated first, so one request of the batch mixes clusters
                    // written in place with new ones.
                    img.write_at(41 * CS, &vec![0xeeu8; CS as usize]).unwrap();
                    model[41 * CS as usize..42 * CS as usize].fill(0xee);
                    run_batch(img.as_mut(), &mut model, &batch());
                    // The same batch again: now every cluster is allocated (in place).
                    let again: Vec<_> = batch().iter().map(|&(o, l, b)| (o, l, !b)).collect();
                    run_batch(img.as_mut(), &mut model, &again[..5]);
                    img.flush().unwrap();
                }
                check(&overlay, &model, &dir, &what);
                {
                    let mut img = open(&overlay, direct);
                    run_batch(img.as_mut(), &mut model, &batch()[5..]);
                }
                check(&overlay, &model, &dir, &what);
            }
        }
    }
}

/// Batches of whole-cluster sequential writes into a fresh overlay (their new clusters are
/// allocated with `fallocate` before the data goes in): the data reads back, QEMU finds the
/// image clean, and the file holds no space beyond its last cluster in use.
#[test]
fn sequential_batches_allocate_only_the_clusters_they_fill() {
    for direct in [false, true] {
        let dir = temp_dir("batch-seq");
        let raw = dir.path().join("base.raw");
        let mut model = patterned_raw(&raw, 8 << 20);
        let overlay = dir.path().join("overlay.qcow2");
        create_qcow2(
            &overlay,
            None,
            Qcow2Version::V3,
            CS,
            16,
            Some((s(&raw), ImageFormat::Raw)),
        );
        {
            let mut img = open(&overlay, direct);
            // Three batches of 16 requests of one cluster each, then one past a gap.
            for b in 0..3u64 {
                let reqs: Vec<_> = (0..16u64)
                    .map(|i| ((b * 16 + i) * CS, CS, (b * 16 + i) as u8 | 0x80))
                    .collect();
                run_batch(img.as_mut(), &mut model, &reqs);
            }
            let gap: Vec<_> = [2u64, 1, 0]
                .iter()
                .map(|&i| ((48 + 2 * i) * CS, CS, 0x40 + i as u8))
                .collect();
            run_batch(img.as_mut(), &mut model, &gap);
            img.flush().unwrap();
        }
        let what = format!("direct {direct}");
        check(&overlay, &model, &dir, &what);
        let (code, out, _) = run(
            "qemu-img",
            &["check", "-f", "qcow2", "--output=json", s(&overlay)],
        );
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let end = v["image-end-offset"].as_u64().unwrap();
        let (allocated, apparent) = usage(&overlay);
        assert_eq!(apparent, end, "{what}: the file ends at its last cluster");
        // ext4 counts its extent-tree blocks in a file's allocation: allow two of them.
        assert!(
            allocated <= end + 8192,
            "{what}: {allocated} bytes allocated for {end} bytes of clusters"
        );
        assert_eq!(v["allocated-clusters"].as_u64(), Some(51), "{what}");
    }
}
