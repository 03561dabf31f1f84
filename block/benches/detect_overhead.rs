//! Overhead of detect-zeroes=unmap on non-zero 4 KiB random writes vs detect-zeroes=off, on
//! a fully allocated qcow2 image (in-place writes: the path where a zero check is pure
//! overhead). Target: <= 3%. Run: cargo bench -p block --bench detect_overhead
#![allow(clippy::unwrap_used)]

use block::qcow2::CreateOptions;
use block::{DetectZeroes, OpenOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("b.qcow2");
    let size: u64 = 256 << 20;
    block::qcow2::create(
        &path,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = block::open(
        &path,
        &OpenOptions {
            read_only: false,
            format: None,
            direct: false,
            ..Default::default()
        },
    )
    .unwrap();
    let fill = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        img.write_at(off, &fill).unwrap();
    }
    img.flush().unwrap();
    let buf = vec![0xa5u8; 4096];
    let mut g = c.benchmark_group("4k-random-write");
    g.throughput(Throughput::Bytes(4096));
    // Interleaved and repeated: page-cache writeback noise shifts over time.
    for (i, mode) in [
        DetectZeroes::Unmap,
        DetectZeroes::Off,
        DetectZeroes::Unmap,
        DetectZeroes::Off,
    ]
    .into_iter()
    .enumerate()
    {
        img.set_detect_zeroes(mode);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        g.bench_function(format!("{mode:?}-run{}", i / 2 + 1), |b| {
            b.iter(|| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (size / 4096)) * 4096;
                img.write_at(off, &buf).unwrap();
            })
        });
    }
    g.finish();
    drop(img);
}

criterion_group!(benches, bench);
criterion_main!(benches);
