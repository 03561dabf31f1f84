//! Vectored reads (`DiskImage::read_vectored_at`, what the virtio-blk device uses to read
//! straight into guest pages): over every kind of cluster (data, zero, unallocated with the
//! backing file's data, unallocated past the backing file's end, compressed in the backing
//! file) and raw images, in pieces of random sizes (aligned and not), buffered and O_DIRECT.
//! The oracle is QEMU: `qemu-img convert -O raw` of the same image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use block::host_file::AlignedBuf;
use block::qcow2::Qcow2Version;
use block::{DiskImage, OpenOptions};
use common::*;

const CS: u64 = 65536;
/// The base is smaller than the overlay: the overlay's last part reads past its end.
const BASE_SIZE: u64 = 3 * (1 << 20) + 4608;
const SIZE: u64 = 4 * (1 << 20) + 512;

fn open(path: &std::path::Path, direct: bool) -> Box<dyn DiskImage> {
    block::open(
        path,
        &OpenOptions {
            read_only: true,
            // The test's own images: their format is given, as a trusting user gives it.
            format: Some(block::probe_format(path).unwrap()),
            direct,
            ..Default::default()
        },
    )
    .unwrap()
}

/// What QEMU reads from `image`.
fn qemu_reads(image: &std::path::Path, dir: &TempDir) -> Vec<u8> {
    let out = dir.path().join("qemu.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(image), s(&out)]);
    std::fs::read(out).unwrap()
}

/// Random reads of `img`, each split into random pieces, checked against `want`.
fn check_random_reads(img: &mut dyn DiskImage, want: &[u8], rng: &mut Rng, what: &str) {
    let size = want.len() as u64;
    let mut scratch = Vec::new();
    for round in 0..300 {
        let aligned = round % 2 == 0;
        let (offset, len) = if aligned {
            let blocks = size / 4096;
            let o = rng.below(blocks) * 4096;
            (o, (1 + rng.below(64.min(blocks - o / 4096))) * 4096)
        } else {
            let o = rng.below(size);
            (o, 1 + rng.below((size - o).min(600_000)))
        };
        // One aligned buffer carved into pieces: 4 KiB multiples (what O_DIRECT can read
        // into directly) or arbitrary sizes, some empty.
        let mut store = AlignedBuf::new(len as usize);
        store.as_mut_slice().fill(0xee);
        let mut pieces: Vec<&mut [u8]> = Vec::new();
        let mut rest = store.as_mut_slice();
        while !rest.is_empty() {
            let n = if aligned {
                ((1 + rng.below(8)) * 4096) as usize
            } else {
                if rng.below(8) == 0 {
                    pieces.push(&mut []);
                }
                1 + rng.below(20_000) as usize
            };
            let n = n.min(rest.len());
            let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
            pieces.push(a);
            rest = b;
        }
        img.read_vectored_at(offset, &mut pieces, &mut scratch)
            .unwrap();
        drop(pieces);
        assert_bytes_eq(
            store.as_slice(),
            &want[offset as usize..(offset + len) as usize],
            &format!("{what}: read {len} bytes at {offset}"),
        );
    }
    // Beyond the end: refused, as read_at refuses it.
    let mut b = vec![0u8; 1024];
    let mut pieces: Vec<&mut [u8]> = vec![&mut b[..]];
    assert!(
        img.read_vectored_at(size - 512, &mut pieces, &mut scratch)
            .is_err(),
        "{what}: a read past the end fails"
    );
}

#[test]
fn vectored_reads_match_qemu_on_every_kind_of_cluster() {
    let mut rng = Rng::seeded(0x7ec7_0ed5);
    for version in [Qcow2Version::V3, Qcow2Version::V2] {
        for compressed_base in [false, true] {
            let dir = temp_dir("vectored-reads");
            let raw = dir.path().join("base.raw");
            patterned_raw(&raw, BASE_SIZE);
            let (base, fmt) = base_image(&dir, &raw, compressed_base);
            let overlay = dir.path().join("overlay.qcow2");
            create_qcow2(&overlay, Some(SIZE), version, CS, 16, Some((s(&base), fmt)));
            // Data clusters (two host-contiguous, one apart), zero clusters (v3), and a
            // discarded cluster; everything else comes from the backing file or past its end.
            for cmd in [
                "write -P 0x11 64k 128k",
                "write -P 0x22 1000k 10k",
                "write -z 512k 128k",
                "write -P 0x33 2m 64k",
                "discard 2m 64k",
                "write -P 0x44 3200k 100k",
                "write -P 0x55 4m 512",
            ] {
                ok("qemu-io", &["-c", cmd, s(&overlay)]);
            }
            let want = qemu_reads(&overlay, &dir);
            assert_eq!(want.len() as u64, SIZE);
            for direct in [false, true] {
                let what =
                    format!("{version:?}, compressed base {compressed_base}, direct {direct}");
                let mut img = open(&overlay, direct);
                check_random_reads(img.as_mut(), &want, &mut rng, &what);
            }
            // The raw base on its own, too.
            let want = std::fs::read(&raw).unwrap();
            for direct in [false, true] {
                let mut img = open(&raw, direct);
                check_random_reads(
                    img.as_mut(),
                    &want,
                    &mut rng,
                    &format!("raw, direct {direct}"),
                );
            }
        }
    }
}
