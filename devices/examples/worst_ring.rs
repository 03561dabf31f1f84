//! The worst ring a guest can build for virtio-blk, measured: what it costs the VMM in
//! memory (peak RSS) and time (per ring of 256 chains), and how long a reset and a shutdown
//! take while the guest keeps the ring full.
//!
//! `cargo run --release -p devices --example worst_ring -- [zero|legal|big] [SECONDS]`
//!
//! * `zero`: every one of the 256 available entries is the same head, an indirect table of
//!   65535 descriptors: a header, 65533 zero-length buffers, a status byte.
//! * `legal`: the same with 256 descriptors (254 zero-length buffers), the longest chain
//!   the device accepts.
//! * `big`: every entry is the same head, an indirect table of a header, 254 (`seg_max`)
//!   overlapping 1 MiB read buffers and a status byte: 254 MiB read per chain.
//!
//! A thread plays the guest's other vCPU, making chains available again as soon as the device
//! returns them (and notifying), for SECONDS (default 5), then the device is reset and shut
//! down while it still does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::raw::RawImage;
use devices::bus::BusDevice;
use devices::virtio::block::{serial_bytes, Block, BlockConfig};
use devices::virtio::mmio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 20;
const RING: u64 = 0x1000;
const SIZE: u16 = 256;
const TABLE: u64 = 0x10_0000;
const HDR: u64 = 0x30_0000;
const STATUS: u64 = 0x30_1000;
const BUF: u64 = 0x40_0000;

fn block_config() -> BlockConfig {
    BlockConfig {
        read_only: false,
        discard_unmap: true,
        serial: serial_bytes("worst-ring"),
        ..Default::default()
    }
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at)).unwrap();
}

/// Peak and current resident set (KiB) of this process.
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("zero");
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::Builder::new()
        .prefix("thinvm-worst-ring-")
        .tempdir()
        .unwrap();
    let p = dir.path().join("disk.raw");
    // Sparse: reads come from the page cache's zero pages, so the device's own cost shows.
    std::fs::File::create(&p).unwrap().set_len(1 << 30).unwrap();
    let block = Block::new(
        Box::new(RawImage::open(&p, false).unwrap()),
        block_config(),
        None,
    )
    .unwrap();
    let stats = block.stats();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap();

    // The table every available entry points at.
    let mut h = [0u8; 16]; // VIRTIO_BLK_T_IN, sector 0
    h[8..16].copy_from_slice(&0u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let entries: u32 = match variant {
        "big" | "legal" => 256,
        _ => 65535,
    };
    desc(&mem, TABLE, HDR, 16, 1, 1);
    for i in 1..entries - 1 {
        let (addr, len) = match variant {
            "big" => (BUF, 1 << 20),
            _ => (BUF, 0),
        };
        desc(
            &mem,
            TABLE + 16 * u64::from(i),
            addr,
            len,
            1 | 2,
            (i + 1) as u16,
        );
    }
    desc(&mem, TABLE + 16 * u64::from(entries - 1), STATUS, 1, 2, 0);
    // Ring: descriptor 0 is the indirect one; all 256 available entries are head 0.
    let n = u64::from(SIZE);
    let (avail, used) = (RING + 16 * n, (RING + 16 * n + 6 + 2 * n + 3) & !3);
    desc(&mem, RING, TABLE, entries * 16, 4, 0);

    // Driver initialisation: VERSION_1 and INDIRECT_DESC.
    w(&mut t, 0x70, 1);
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 0);
    w(&mut t, 0x20, 1 << 28);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 11);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, u32::from(SIZE));
    for (off, a) in [(0x80, RING), (0x90, avail), (0xa0, used)] {
        w(&mut t, off, a as u32);
        w(&mut t, off + 4, (a >> 32) as u32);
    }
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, 15);
    assert_eq!(r(&mut t, 0x70), 15);
    let (hwm0, _) = rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let notify = t.notify_eventfds()[0].1.try_clone().unwrap();
    let filler = {
        let (mem, stop, answered) = (mem.clone(), stop.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut last_used = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let u: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                let a: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                answered.fetch_add(u64::from(u.wrapping_sub(last_used)), Ordering::Relaxed);
                last_used = u;
                if a.wrapping_sub(u) < SIZE {
                    let mut idx = a;
                    while idx.wrapping_sub(u) < SIZE {
                        let slot = avail + 4 + 2 * u64::from(idx % SIZE);
                        mem.write_obj(0u16, GuestAddress(slot)).unwrap();
                        idx = idx.wrapping_add(1);
                    }
                    std::sync::atomic::fence(Ordering::SeqCst);
                    mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
                    let _ = notify.write(1);
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        })
    };
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let elapsed = t0.elapsed().as_secs_f64();
    let chains = answered.load(Ordering::Relaxed);
    let (hwm, rss) = rss_kib();
    let per_ring_ms = if chains > 0 {
        elapsed * 1000.0 * f64::from(SIZE) / chains as f64
    } else {
        f64::INFINITY
    };
    println!(
        "variant={variant} seconds={elapsed:.1} chains={chains} chains_per_s={:.0} ms_per_256_chains={per_ring_ms:.1} peak_rss_mib={:.1} rss_growth_mib={:.1} rss_now_mib={:.1}",
        chains as f64 / elapsed,
        hwm as f64 / 1024.0,
        hwm.saturating_sub(hwm0) as f64 / 1024.0,
        rss as f64 / 1024.0,
    );
    let t1 = Instant::now();
    w(&mut t, 0x70, 0);
    let reset = t1.elapsed();
    // Chains the device still answers on the old ring once the reset has returned.
    let used_idx = |m: &GuestMemoryMmap| m.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
    let u1 = used_idx(&mem);
    std::thread::sleep(Duration::from_millis(300));
    let stale = used_idx(&mem).wrapping_sub(u1);
    println!(
        "variant={variant} reset_ms={:.1} answered_after_reset={stale}",
        reset.as_secs_f64() * 1000.0
    );
    let t2 = Instant::now();
    t.shutdown();
    let shutdown = t2.elapsed();
    stop.store(true, Ordering::Relaxed);
    filler.join().unwrap();
    let s = stats.snapshot();
    println!(
        "variant={variant} shutdown_ms={:.1} reads={} dropped={}",
        shutdown.as_secs_f64() * 1000.0,
        s.reads,
        s.dropped,
    );
}
