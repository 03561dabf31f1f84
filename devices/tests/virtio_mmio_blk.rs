//! virtio-mmio transport + virtio-blk device driven the way a guest driver does it, against
//! mock guest memory and a mock split queue (virtio-queue's test utilities): feature
//! negotiation, queue setup, activation, notification, interrupt status, reset and
//! re-activation, and refusal of bad feature sets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use block::raw::RawImage;
use block::{DetectZeroes, DiskImage};
use devices::bus::BusDevice;
use devices::virtio::block::{serial_bytes, Block, BlockConfig};
use devices::virtio::mmio::MmioTransport;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x10_1000;
const STATUS: u64 = 0x12_0000;

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}
fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

struct Fixture {
    mem: GuestMemoryMmap,
    stats: std::sync::Arc<devices::virtio::block::BlockStats>,
    t: MmioTransport,
    irq: EventFd,
    _dir: tempfile::TempDir,
}

/// A fresh directory per fixture (tests run in parallel threads of one process), removed on
/// drop.
fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("thinvm-mmio-")
        .tempdir()
        .unwrap()
}

fn fixture() -> Fixture {
    let dir = test_dir();
    let p = dir.path().join("disk.raw");
    std::fs::write(&p, vec![0x22u8; 1 << 20]).unwrap();
    let image = RawImage::open(&p, false).unwrap();
    fixture_with(Box::new(image), dir)
}

fn fixture_with(image: Box<dyn DiskImage>, dir: tempfile::TempDir) -> Fixture {
    let block = Block::new(
        image,
        BlockConfig {
            read_only: false,
            discard_unmap: true,
            serial: serial_bytes("mock"),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let stats = block.stats();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
    Fixture {
        mem,
        stats,
        t,
        irq,
        _dir: dir,
    }
}

/// Negotiates features and sets up queue 0 (16 entries) at the mock queue's addresses.
fn driver_init(f: &mut Fixture, q: &MockSplitQueue<GuestMemoryMmap>) {
    driver_init_sized(f, q, 16);
}

fn driver_init_sized(f: &mut Fixture, q: &MockSplitQueue<GuestMemoryMmap>, size: u32) {
    driver_init_at(
        f,
        size,
        [q.desc_table_addr(), q.avail_addr(), q.used_addr()],
    );
}

/// Negotiates features and sets up queue 0 with `size` entries at the given descriptor
/// table, available ring and used ring addresses.
fn driver_init_at(f: &mut Fixture, size: u32, rings: [GuestAddress; 3]) {
    let t = &mut f.t;
    assert_eq!(r(t, 0x0), 0x7472_6976);
    assert_eq!(r(t, 0x4), 2);
    assert_eq!(r(t, 0x8), 2);
    w(t, 0x70, 0);
    w(t, 0x70, 1 | 2);
    w(t, 0x14, 1);
    assert_eq!(r(t, 0x10) & 1, 1, "VERSION_1 offered");
    w(t, 0x14, 0);
    let f0 = r(t, 0x10);
    assert!(f0 & (1 << 13) != 0 && f0 & (1 << 14) != 0 && f0 & (1 << 9) != 0);
    w(t, 0x24, 0);
    w(t, 0x20, f0 & ((1 << 9) | (1 << 13) | (1 << 14)));
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70) & 8, 8, "FEATURES_OK accepted");
    w(t, 0x30, 0);
    assert_eq!(r(t, 0x34), 256);
    w(t, 0x38, size);
    let a = |g: GuestAddress| (g.0 as u32, (g.0 >> 32) as u32);
    let (dl, dh) = a(rings[0]);
    let (al, ah) = a(rings[1]);
    let (ul, uh) = a(rings[2]);
    w(t, 0x80, dl);
    w(t, 0x84, dh);
    w(t, 0x90, al);
    w(t, 0x94, ah);
    w(t, 0xa0, ul);
    w(t, 0xa4, uh);
    w(t, 0x44, 1);
    w(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(r(t, 0x70), 1 | 2 | 8 | 4);
}

/// Submits a read of `sectors` at `sector`; waits for the used ring to reach `expect_used`.
fn read_request(
    f: &mut Fixture,
    q: &MockSplitQueue<GuestMemoryMmap>,
    slot: u16,
    sector: u64,
    expect_used: u16,
) -> u8 {
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    f.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, 1, slot + 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, 1 | 2, slot + 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, 2, 0)),
    ];
    q.add_desc_chains(&descs, slot).unwrap();
    w(&mut f.t, 0x50, 0);
    let t0 = Instant::now();
    while q.used().idx().load() != expect_used {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "request not completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(r(&mut f.t, 0x60) & 1 == 1, "used-buffer interrupt status");
    assert!(f.irq.read().unwrap() >= 1, "irqfd signalled");
    w(&mut f.t, 0x64, 1);
    assert_eq!(r(&mut f.t, 0x60) & 1, 0, "interrupt acknowledged");
    f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
}

#[test]
fn activation_requests_reset_and_reactivation() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let q = MockSplitQueue::new(&mem, 16);
    driver_init(&mut f, &q);
    assert_eq!(read_request(&mut f, &q, 0, 0, 1), 0);
    let mut b = [0u8; 512];
    f.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, [0x22; 512]);
    // Config space: capacity in sectors.
    let mut cap = [0u8; 8];
    f.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    // Reset, then a new driver initialisation on a fresh queue: the disk works again.
    w(&mut f.t, 0x70, 0);
    assert_eq!(r(&mut f.t, 0x70), 0);
    let mem2 = f.mem.clone();
    let q2 = MockSplitQueue::create(&mem2, GuestAddress(0x20_0000), 16);
    driver_init(&mut f, &q2);
    assert_eq!(read_request(&mut f, &q2, 0, 100, 1), 0);
    // Beyond the capacity: IOERR, and the device keeps going.
    assert_eq!(read_request(&mut f, &q2, 3, 5000, 2), 1);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut f = fixture();
    let t = &mut f.t;
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 0);
    w(t, 0x20, 1 << 9);
    w(t, 0x24, 1);
    w(t, 0x20, 0);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70) & 8, 0, "FEATURES_OK must not stick");
    // Feature bits the device did not offer are refused too.
    w(t, 0x70, 0);
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 0);
    w(t, 0x20, 1 << 7);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70) & 8, 0);
    // Unaligned register access is ignored, not a crash.
    let mut b = [0u8; 2];
    t.read(0x02, &mut b);
    t.write(0x71, &[1]);
}

/// Many requests made available at once, as a guest with a deep queue does: the device runs
/// consecutive writes as one batch (data in parallel), and the result is as if they had run
/// one by one in queue order: an overlapping later write wins, a zero write in the batch is
/// detected, a bad write fails alone, the reads behind the writes see them.
#[test]
fn queued_writes_run_as_a_batch_in_order() {
    // Status bytes past the data buffers (64 KiB apart from DATA on).
    const BATCH_STATUS: u64 = 0x30_0000;
    let dir = test_dir();
    let p = dir.path().join("disk.qcow2");
    block::qcow2::create(
        &p,
        &block::qcow2::CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let mut image = block::open(&p, &Default::default()).unwrap();
    image.set_detect_zeroes(DetectZeroes::Unmap);
    let mut f = fixture_with(image, test_dir());
    let stats = f.stats.clone();
    let mem = f.mem.clone();
    let q = MockSplitQueue::new(&mem, 32);
    driver_init_sized(&mut f, &q, 32);
    // (type, sector, data byte, length): three writes, one beyond the capacity, two reads.
    let reqs: [(u32, u64, u8, u32); 6] = [
        (1, 0, 0xa1, 4096),
        (1, 256, 0x00, 65536),
        (1, 4, 0xb2, 4096),
        (1, 5000, 0xc3, 4096),
        (0, 0, 0xff, 8192),
        (0, 255, 0xff, 1024),
    ];
    let mut descs = Vec::new();
    for (i, &(kind, sector, byte, len)) in reqs.iter().enumerate() {
        let hdr = HDR + 16 * i as u64;
        let data = DATA + 0x1_0000 * i as u64;
        let status = BATCH_STATUS + i as u64;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        f.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(data))
            .unwrap();
        f.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let next = descs.len() as u16;
        let dflags = if kind == 0 { 1 | 2 } else { 1 };
        descs.push(RawDescriptor::from(Descriptor::new(hdr, 16, 1, next + 1)));
        descs.push(RawDescriptor::from(Descriptor::new(
            data,
            len,
            dflags,
            next + 2,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(status, 1, 2, 0)));
    }
    q.add_desc_chains(&descs, 0).unwrap();
    w(&mut f.t, 0x50, 0);
    let t0 = Instant::now();
    while q.used().idx().load() != reqs.len() as u16 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "requests not completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let statuses: Vec<u8> = (0..reqs.len())
        .map(|i| {
            f.mem
                .read_obj(GuestAddress(BATCH_STATUS + i as u64))
                .unwrap()
        })
        .collect();
    assert_eq!(statuses, [0, 0, 0, 1, 0, 0], "per-request status");
    let st = stats.snapshot();
    assert_eq!(
        (st.writes, st.batched_writes, st.reads, st.errors),
        (3, 3, 2, 1),
        "the three writes ran as one batch"
    );
    let read_back = |i: u64, len: usize| {
        let mut b = vec![0u8; len];
        f.mem
            .read_slice(&mut b, GuestAddress(DATA + 0x1_0000 * i))
            .unwrap();
        b
    };
    let mut want = vec![0u8; 8192];
    want[..2048].fill(0xa1);
    want[2048..6144].fill(0xb2);
    let got = read_back(4, 8192);
    assert!(
        got == want,
        "the read sees both writes, the later one on top (first difference at byte {:?})",
        got.iter().zip(&want).position(|(a, b)| a != b)
    );
    // Sector 255 is unwritten (zeros), sector 256 the start of the zero write.
    assert_eq!(
        read_back(5, 1024),
        vec![0u8; 1024],
        "second read of the batch"
    );
    drop(f);
    let mut img = block::open(&p, &Default::default()).unwrap();
    let st = img.block_status(256 * 512, 65536).unwrap();
    assert!(
        st.zero && !st.data,
        "the zero write became a zero cluster: {st:?}"
    );
    let mut disk = vec![0u8; 8192];
    img.read_at(0, &mut disk).unwrap();
    assert!(
        disk == want,
        "on disk after shutdown (first difference at byte {:?})",
        disk.iter().zip(&want).position(|(a, b)| a != b)
    );
}

/// A driver that keeps its queue full (adds each request back as soon as it is answered,
/// and notifies) still gets its interrupts while it does: the worker holds an interrupt back
/// for at most two more rounds (worker.rs tests the bound), never until the driver stops. A
/// round answers at most the 16 requests the driver has out, so there is at least one
/// interrupt per 48 answers.
#[test]
fn a_driver_keeping_its_queue_full_still_gets_interrupts() {
    const CHAINS: u16 = 16;
    const QSIZE: u16 = 64;
    const ANSWERS: u32 = 20_000;
    // The rings laid out by hand (virtio-queue's mock lets a 64-entry used ring overlap the
    // available ring).
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    let mut f = fixture();
    let mem = f.mem.clone();
    driver_init_at(
        &mut f,
        u32::from(QSIZE),
        [GuestAddress(DESC), GuestAddress(AVAIL), GuestAddress(USED)],
    );
    let avail_slot = |i: u16| GuestAddress(AVAIL + 4 + 2 * u64::from(i % QSIZE));
    for i in 0..CHAINS {
        let (hdr, data, status) = (
            HDR + 16 * u64::from(i),
            DATA + 32 * u64::from(i),
            STATUS + u64::from(i),
        );
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&8u32.to_le_bytes()); // VIRTIO_BLK_T_GET_ID
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let d = 3 * i;
        let chain = [
            Descriptor::new(hdr, 16, 1, d + 1),
            Descriptor::new(data, 20, 1 | 2, d + 2),
            Descriptor::new(status, 1, 2, 0),
        ];
        for (k, desc) in chain.into_iter().enumerate() {
            let at = DESC + 16 * (u64::from(d) + k as u64);
            mem.write_obj(RawDescriptor::from(desc), GuestAddress(at))
                .unwrap();
        }
        mem.write_obj(d, avail_slot(i)).unwrap();
    }
    mem.write_obj(CHAINS, GuestAddress(AVAIL + 2)).unwrap();
    w(&mut f.t, 0x50, 0);
    let mut avail = CHAINS;
    let mut seen: u16 = 0;
    let mut answered = 0u32;
    let mut interrupts = 0u64;
    let t0 = Instant::now();
    while answered < ANSWERS {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{answered} answers in 60 s"
        );
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut added = false;
        while seen != used {
            let at = GuestAddress(USED + 4 + 8 * u64::from(seen % QSIZE));
            let head: u32 = mem.read_obj(at).unwrap();
            assert!(head < u32::from(3 * CHAINS) && head % 3 == 0, "head {head}");
            mem.write_obj(u16::try_from(head).unwrap(), avail_slot(avail))
                .unwrap();
            avail = avail.wrapping_add(1);
            seen = seen.wrapping_add(1);
            answered += 1;
            added = true;
        }
        if added {
            mem.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap();
            w(&mut f.t, 0x50, 0);
        }
        interrupts += f.irq.read().unwrap_or(0);
    }
    assert!(
        interrupts * 48 + 48 >= u64::from(answered),
        "{interrupts} interrupts for {answered} answers"
    );
    assert_eq!(
        f.stats.snapshot().errors,
        0,
        "GET_ID answered without errors"
    );
}
