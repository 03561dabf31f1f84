//! Merged requests against a model: runs of reads and writes that continue one another,
//! each request scattered over several guest buffers of odd lengths, on a fresh qcow2
//! overlay over a patterned backing file (so merged writes allocate clusters and copy their
//! heads and tails from the backing file), through every I/O engine. Every request must read
//! or write exactly its own bytes, as if it ran alone; qemu-img then reads the image the
//! same.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use block::engine::Aio;
use block::{ImageFormat, OpenOptions, ProbePolicy};
use common::*;
use devices::virtio::block::engine::Engine;
use devices::virtio::block::execute::{Disk, WriteErrorPolicy};
use devices::virtio::block::BlockStats;
use devices::virtio::Interrupt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const DISK: u64 = 4 << 20;
const QSIZE: u16 = 256;
/// Requests per pass (each a header, 1-6 data buffers and a status byte: at most 8
/// descriptors, 30 * 8 < QSIZE).
const PER_PASS: usize = 30;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A request of a pass: where, how long, its buffers (guest address, length).
struct Req {
    write: bool,
    sector: u64,
    bufs: Vec<(u64, u32)>,
}

fn engines() -> Vec<Aio> {
    let mut v = vec![Aio::Sync, Aio::Threads];
    if block::engine::io_uring_available().is_ok() {
        v.push(Aio::IoUring);
    }
    v
}

fn run(aio: Aio, seed: u64) {
    let dir = TempDir::new("merge");
    let base = dir.join("base.raw");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i / 512 * 7 + i % 251) as u8).collect();
    std::fs::write(&base, &pattern).unwrap();
    let ov = dir.join("ov.qcow2");
    block::qcow2::create(
        &ov,
        &block::qcow2::CreateOptions {
            backing_file: Some(base.display().to_string()),
            backing_format: Some(ImageFormat::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let image = block::open(
        &ov,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            probe: ProbePolicy::Guest,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let stats = Arc::new(BlockStats::default());
    let disk = Disk::new(
        image,
        [0; 20],
        stats.clone(),
        WriteErrorPolicy::Report,
        true,
    );
    let limits = engine_limits(DISK / 512);
    let mut engine = Engine::new(disk, limits, "merge".into())
        .with_io_engine(block::engine::new_engine(aio).unwrap());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let ring = Ring::at(0x1000, QSIZE);
    let mut q = ready_queue(&ring, QSIZE);
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());

    let mut model = pattern.clone();
    let mut rng = Rng(seed);
    let mut answered_total = 0u16;
    for pass in 0..40 {
        // Runs of requests that continue one another (a few jumps between them), all reads
        // or all writes per run; buffers packed in guest memory, each at an odd offset.
        let mut reqs = Vec::new();
        let mut sector = rng.below(DISK / 512 - 600);
        let mut write = rng.below(2) == 0;
        let mut at = DATA;
        // (Sector ranges of the pass: a write never overlaps another request of it, whose
        // order against it would be undefined, and a read never overlaps a write.)
        let mut taken: Vec<(u64, u64, bool)> = Vec::new();
        for _ in 0..PER_PASS {
            let mut sectors = 1 + rng.below(24);
            let mut tries = 0;
            loop {
                let clash = taken
                    .iter()
                    .any(|&(s, e, w)| (w || write) && sector < e && s < sector + sectors);
                if tries > 0 && !clash && sector + sectors <= DISK / 512 {
                    break;
                }
                if tries == 0 && rng.below(6) != 0 && !clash && sector + sectors <= DISK / 512 {
                    break;
                }
                tries += 1;
                sector = rng.below(DISK / 512 - 600);
                write = rng.below(2) == 0;
                sectors = 1 + rng.below(24);
            }
            taken.push((sector, sector + sectors, write));
            let mut left = (sectors * 512) as u32;
            let mut bufs = Vec::new();
            let nbufs = 1 + rng.below(6) as usize;
            for i in 0..nbufs {
                let len = if i + 1 == nbufs || left <= 1 {
                    left
                } else {
                    1 + rng.below(u64::from(left - 1)) as u32
                };
                if len == 0 {
                    break;
                }
                at += 1 + rng.below(64);
                bufs.push((at, len));
                at += u64::from(len);
                left -= len;
            }
            reqs.push(Req {
                write,
                sector,
                bufs,
            });
            sector += sectors;
        }
        assert!(at < STATUS, "guest memory for the pass");
        // Write data into the write requests' buffers; poison the read buffers.
        let mut desc = 0u16;
        for (i, r) in reqs.iter().enumerate() {
            let i = i as u64;
            header(
                &mem,
                HDR + 16 * i,
                if r.write { T_OUT } else { T_IN },
                r.sector,
            );
            for &(a, l) in &r.bufs {
                let fill: Vec<u8> = if r.write {
                    (0..l).map(|_| rng.next() as u8).collect()
                } else {
                    vec![0xee; l as usize]
                };
                mem.write_slice(&fill, GuestAddress(a)).unwrap();
            }
            mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            let mut chain = vec![(HDR + 16 * i, 16, false)];
            chain.extend(r.bufs.iter().map(|&(a, l)| (a, l, !r.write)));
            chain.push((STATUS + i, 1, true));
            let head = write_chain(&mem, &ring, desc, &chain);
            desc = (desc + chain.len() as u16) % QSIZE;
            ring.publish(&mem, head);
        }
        let mut answered = engine.pass(&mut q, &mem, &irq, &|| false).answered;
        let t0 = std::time::Instant::now();
        while answered < reqs.len() {
            assert!(
                t0.elapsed().as_secs() < 30,
                "pass {pass}: requests unanswered"
            );
            answered += engine.complete(std::slice::from_mut(&mut q), &mem, &irq, &|| false);
        }
        answered_total = answered_total.wrapping_add(reqs.len() as u16);
        assert_eq!(ring.used_idx(&mem), answered_total);
        // Reads see the model as it was before the pass (no write of the pass overlaps them).
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(
                status_at(&mem, STATUS + i as u64),
                0,
                "{aio:?} pass {pass}: request {i}"
            );
            if r.write {
                continue;
            }
            let mut off = (r.sector * 512) as usize;
            for &(a, l) in &r.bufs {
                let l = l as usize;
                let mut got = vec![0u8; l];
                mem.read_slice(&mut got, GuestAddress(a)).unwrap();
                assert!(
                    got == model[off..off + l],
                    "{aio:?} pass {pass}: read request {i} at byte {off}+{l} got other data"
                );
                off += l;
            }
        }
        for r in reqs.iter().filter(|r| r.write) {
            let mut off = (r.sector * 512) as usize;
            for &(a, l) in &r.bufs {
                let l = l as usize;
                mem.read_slice(&mut model[off..off + l], GuestAddress(a))
                    .unwrap();
                off += l;
            }
        }
    }
    let st = stats.snapshot();
    assert!(
        st.merged_writes > 100 && st.merged_reads > 100,
        "{aio:?}: too few merges to test them: {st:?}"
    );
    drop(engine);
    let out = dir.join("out.raw");
    let conv = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&ov)
        .arg(&out)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{conv:?}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == model,
        "{aio:?}: qemu-img reads other data than the model"
    );
}

#[test]
fn merged_reads_and_writes_of_scattered_buffers_match_a_model_on_every_engine() {
    for (i, aio) in engines().into_iter().enumerate() {
        run(aio, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
    }
}
