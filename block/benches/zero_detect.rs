//! Zero detection throughput: a cache-resident 64 KiB buffer (one qcow2 cluster) and a large
//! 64 MiB buffer (memory bandwidth bound). Target: >= 30 GB/s cache-resident on the
//! development machines. Run: cargo bench -p block --bench zero_detect
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    for (name, len) in [("64KiB", 64usize << 10), ("64MiB", 64usize << 20)] {
        // Touch every page (a fresh zeroed allocation would map the shared zero page and stay
        // cache-resident whatever its size).
        let mut buf = vec![1u8; len];
        buf.fill(0);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            b.iter(|| block::zero::is_zero(std::hint::black_box(&buf)))
        });
        // The common non-zero case exits at the first word.
        let mut data = vec![0u8; len];
        data[0] = 1;
        g.bench_function(format!("{name}-nonzero"), |b| {
            b.iter(|| block::zero::is_zero(std::hint::black_box(&data)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
