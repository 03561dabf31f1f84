//! What the device tests share: a VM's worth of guest memory with a virtio-blk device behind
//! the MMIO transport, and a minimal split-ring "driver" that writes descriptors (direct or
//! in indirect tables), publishes heads, notifies and waits, the way a guest would, with
//! nothing checked on its side so tests can build hostile rings.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::raw::RawImage;
use block::DiskImage;
use devices::bus::BusDevice;
use devices::virtio::block::{serial_bytes, Block, BlockConfig, BlockStats, Limits, SEG_MAX};
use devices::virtio::mmio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the test VMs.
pub const MEM_SIZE: usize = 16 << 20;
/// Where test requests put their headers, data and status bytes.
pub const HDR: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x80_0000;
/// Indirect descriptor tables (room for a 65535-entry one).
pub const TABLES: u64 = 0x90_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Feature bits a test driver accepts: VERSION_1 (32), INDIRECT_DESC (28), SEG_MAX (2),
/// BLK_SIZE (6), FLUSH (9), DISCARD (13), WRITE_ZEROES (14). No EVENT_IDX.
pub const FEATURES: u64 =
    (1 << 32) | (1 << 28) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 13) | (1 << 14);

pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A temporary directory, removed on drop.
/// A temporary directory (`tempfile`'s, named `thinvm-dev-TAG-*`), removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("thinvm-dev-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn join(&self, n: &str) -> PathBuf {
        self.0.path().join(n)
    }
}

/// The device configuration the tests use.
pub fn block_config() -> BlockConfig {
    BlockConfig {
        read_only: false,
        discard_unmap: true,
        serial: serial_bytes("test-serial"),
        ..Default::default()
    }
}

/// A test VM: guest memory and one virtio-blk device on its MMIO transport.
pub struct Vm {
    pub mem: GuestMemoryMmap,
    pub t: MmioTransport,
    pub irq: EventFd,
    pub stats: Arc<BlockStats>,
    pub dir: TempDir,
}

/// A VM whose disk is a raw image of `size` bytes of 0x22.
pub fn raw_vm(size: usize) -> Vm {
    let dir = TempDir::new("raw");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x22u8; size]).unwrap();
    let image = RawImage::open(&p, false).unwrap();
    vm_with(Box::new(image), block_config(), dir)
}

pub fn vm_with(image: Box<dyn DiskImage>, cfg: BlockConfig, dir: TempDir) -> Vm {
    let block = Block::new(image, cfg, None).unwrap();
    let stats = block.stats();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
    Vm {
        mem,
        t,
        irq,
        stats,
        dir,
    }
}

/// A split ring in guest memory, as the test driver lays it out.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// A ring of `size` entries at `base` (descriptor table, then available ring, then the
    /// used ring 4-aligned).
    pub fn at(base: u64, size: u16) -> Ring {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Ring {
            size,
            desc: base,
            avail,
            used,
        }
    }

    /// Zeroes the ring (what a driver does before handing it to the device).
    pub fn clear(&self, mem: &GuestMemoryMmap) {
        let end = self.used + 6 + 8 * u64::from(self.size);
        fill(mem, self.desc, (end - self.desc) as usize, 0);
    }

    /// Writes descriptor `i` of the ring's table.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        write_desc(mem, self.desc + 16 * u64::from(i), addr, len, flags, next);
    }

    /// The driver's available index.
    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Puts `head` in the next available slot and publishes it.
    pub fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring element `i` (mod the size): (head, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Waits until the used index reaches `n`; false on timeout.
    pub fn wait_used(&self, mem: &GuestMemoryMmap, n: u16, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.used_idx(mem) != n {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// Writes one descriptor at guest address `at`.
pub fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at)).unwrap();
}

/// Writes a chain of `(addr, len, writable)` buffers as an indirect table at `table`
/// (entries linked 0 -> 1 -> ...); returns the table's length in bytes.
pub fn write_indirect(mem: &GuestMemoryMmap, table: u64, bufs: &[(u64, u32, bool)]) -> u32 {
    for (i, &(addr, len, wr)) in bufs.iter().enumerate() {
        let last = i + 1 == bufs.len();
        let flags = if wr { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
        write_desc(mem, table + 16 * i as u64, addr, len, flags, (i + 1) as u16);
    }
    (bufs.len() * 16) as u32
}

/// Writes a chain of buffers into the ring's table from descriptor `first` on; returns the
/// head.
pub fn write_chain(
    mem: &GuestMemoryMmap,
    ring: &Ring,
    first: u16,
    bufs: &[(u64, u32, bool)],
) -> u16 {
    for (i, &(addr, len, wr)) in bufs.iter().enumerate() {
        let last = i + 1 == bufs.len();
        let flags = if wr { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
        let idx = (first as usize + i) as u16 % ring.size;
        ring.set_desc(mem, idx, addr, len, flags, idx.wrapping_add(1) % ring.size);
    }
    first
}

/// A request header at `at`.
pub fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// A discard / write-zeroes segment at `at`.
pub fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

/// Negotiates `features` (device features it does not offer are dropped) and sets queue 0
/// up on `ring`; returns the status register after DRIVER_OK.
pub fn driver_init(vm: &mut Vm, ring: &Ring, features: u64) -> u32 {
    let t = &mut vm.t;
    w(t, 0x70, 0);
    w(t, 0x70, 1);
    w(t, 0x70, 1 | 2);
    w(t, 0x14, 0);
    let f0 = u64::from(r(t, 0x10));
    w(t, 0x14, 1);
    let f1 = u64::from(r(t, 0x10));
    let accept = features & (f0 | (f1 << 32));
    w(t, 0x24, 0);
    w(t, 0x20, accept as u32);
    w(t, 0x24, 1);
    w(t, 0x20, (accept >> 32) as u32);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70) & 8, 8, "FEATURES_OK accepted");
    ring.clear(&vm.mem);
    setup_queue(t, ring);
    w(t, 0x70, 1 | 2 | 8 | 4);
    r(t, 0x70)
}

/// Writes queue 0's registers for `ring` and makes it ready (the ring is not cleared).
pub fn setup_queue(t: &mut MmioTransport, ring: &Ring) {
    setup_queue_at(t, 0, ring);
}

/// Writes queue `index`'s registers for `ring` and makes it ready (the ring is not cleared).
pub fn setup_queue_at(t: &mut MmioTransport, index: u32, ring: &Ring) {
    w(t, 0x30, index);
    w(t, 0x38, u32::from(ring.size));
    for (off, a) in [(0x80, ring.desc), (0x90, ring.avail), (0xa0, ring.used)] {
        w(t, off, a as u32);
        w(t, off + 4, (a >> 32) as u32);
    }
    w(t, 0x44, 1);
}

/// Notifies queue 0 (what the ioeventfd would catch).
pub fn kick(vm: &mut Vm) {
    w(&mut vm.t, 0x50, 0);
}

/// Queues the chain of a one-buffer request for `slot` and publishes it: the header at
/// `HDR + 16 * slot`, `len` bytes of data at `DATA + 64 KiB * slot` (device-writable for a
/// read), the status byte at `STATUS + slot` (set to 0xff first); descriptors from
/// `3 * desc`. The caller fills a write's data. Returns the head.
pub fn queue_request(
    mem: &GuestMemoryMmap,
    ring: &Ring,
    desc: u16,
    slot: u16,
    kind: u32,
    sector: u64,
    len: u32,
) -> u16 {
    let hdr = HDR + 16 * u64::from(slot);
    let data = DATA + 0x1_0000 * u64::from(slot);
    let status = STATUS + u64::from(slot);
    header(mem, hdr, kind, sector);
    fill(mem, status, 1, 0xff);
    let head = write_chain(
        mem,
        ring,
        3 * desc,
        &[
            (hdr, 16, false),
            (data, len, kind == T_IN),
            (status, 1, true),
        ],
    );
    ring.publish(mem, head);
    head
}

/// The status byte at `at`.
pub fn status_at(mem: &GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

/// Reads `len` bytes of the disk image file at `offset` (raw images).
pub fn disk_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

pub fn fill(mem: &GuestMemoryMmap, at: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(at)).unwrap();
}

pub fn read_mem(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    b
}

/// Faults a [`FaultyImage`] injects, switched by the test while the device runs.
#[derive(Default)]
pub struct Faults {
    /// Data reads and writes block while this is set.
    blocked: std::sync::Mutex<bool>,
    unblocked: std::sync::Condvar,
    /// Write-type calls fail with ENOSPC while this is set.
    pub no_space: std::sync::atomic::AtomicBool,
    /// Write-type calls that failed with ENOSPC.
    pub no_space_failures: std::sync::atomic::AtomicU64,
    /// Calls that entered a blocked state.
    pub blocked_calls: std::sync::atomic::AtomicU64,
    /// Data reads planned (one per image read the device asked for).
    pub plan_reads: std::sync::atomic::AtomicU64,
    /// Data reads fail with EIO while this is set.
    pub read_eio: std::sync::atomic::AtomicBool,
    /// Data writes planned (one per image write the device asked for).
    pub plan_writes: std::sync::atomic::AtomicU64,
}

impl Faults {
    pub fn block(&self) {
        *self.blocked.lock().unwrap() = true;
    }
    pub fn unblock(&self) {
        *self.blocked.lock().unwrap() = false;
        self.unblocked.notify_all();
    }
    fn wait(&self) {
        let mut g = self.blocked.lock().unwrap();
        if *g {
            self.blocked_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        while *g {
            g = self.unblocked.wait(g).unwrap();
        }
    }
    fn full(&self) -> block::Result<()> {
        use std::sync::atomic::Ordering;
        if self.no_space.load(Ordering::SeqCst) {
            self.no_space_failures.fetch_add(1, Ordering::SeqCst);
            return Err(block::Error::io(
                "write test image",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }
}

/// An image that blocks or runs out of space on command.
pub struct FaultyImage {
    pub inner: Box<dyn DiskImage>,
    pub faults: Arc<Faults>,
}

impl DiskImage for FaultyImage {
    fn format(&self) -> block::ImageFormat {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn plan_read(&mut self, offset: u64, bufs: &[block::IoBuf]) -> block::Result<block::Plan> {
        use std::sync::atomic::Ordering;
        self.faults.wait();
        self.faults.plan_reads.fetch_add(1, Ordering::SeqCst);
        if self.faults.read_eio.load(Ordering::SeqCst) {
            return Err(block::Error::io(
                "read test image",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.inner.plan_read(offset, bufs)
    }
    fn plan_write(&mut self, offset: u64, bufs: &[block::IoBuf]) -> block::Result<block::Plan> {
        self.faults.wait();
        self.faults
            .plan_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.faults.full()?;
        self.inner.plan_write(offset, bufs)
    }
    fn finish(&mut self, plan: block::Plan, data: block::Result<()>) -> block::Result<()> {
        self.inner.finish(plan, data)
    }
    fn lock_unit(&self) -> u64 {
        self.inner.lock_unit()
    }
    fn flush(&mut self) -> block::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> block::Result<()> {
        self.faults.full()?;
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&mut self, offset: u64, len: u64) -> block::Result<()> {
        self.inner.discard(offset, len)
    }
    fn block_status(&mut self, offset: u64, max_len: u64) -> block::Result<block::MapExtent> {
        self.inner.block_status(offset, max_len)
    }
    fn set_detect_zeroes(&mut self, mode: block::DetectZeroes) {
        self.inner.set_detect_zeroes(mode)
    }
    fn detect_zeroes(&self) -> block::DetectZeroes {
        self.inner.detect_zeroes()
    }
    fn reclaim_stats(&self) -> block::ReclaimStats {
        self.inner.reclaim_stats()
    }
    fn host_usage(&self) -> block::Result<block::HostUsage> {
        self.inner.host_usage()
    }
    fn discard_granularity(&self) -> u64 {
        self.inner.discard_granularity()
    }
    fn idle(&mut self) -> block::Result<()> {
        self.inner.idle()
    }
}

/// A VM whose raw disk (1 MiB of 0x22) fails on command; `cfg` adjusts the device.
pub fn faulty_vm(cfg: BlockConfig) -> (Vm, Arc<Faults>) {
    let dir = TempDir::new("faulty");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x22u8; 1 << 20]).unwrap();
    let faults = Arc::new(Faults::default());
    let image = FaultyImage {
        inner: Box::new(RawImage::open(&p, false).unwrap()),
        faults: faults.clone(),
    };
    (vm_with(Box::new(image), cfg, dir), faults)
}

/// The request limits the engine tests give a writable disk of `sectors` sectors (discard
/// and write-zeroes allowed, up to 1024 sectors in 4 segments each).
pub fn engine_limits(sectors: u64) -> Limits {
    Limits {
        capacity_sectors: sectors,
        seg_max: SEG_MAX,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
        read_only: false,
        discard_unmap: true,
    }
}

/// A virtio-queue `Queue` of `size` on `ring`'s addresses, ready (what the engine tests
/// drive directly, without the MMIO transport).
pub fn ready_queue(ring: &Ring, size: u16) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(256.max(size)).unwrap();
    q.try_set_size(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(ring.desc))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(ring.used))
        .unwrap();
    q.set_ready(true);
    q
}
