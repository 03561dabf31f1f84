//! The virtio-blk request path as a hostile guest drives it: descriptor tables (direct and
//! indirect, up to 65535 entries), available-ring contents and indices, headers, segments
//! and data bytes all come from the input; a real virtio-queue `Queue` pops the chains and
//! the device's engine parses, executes (against a raw or qcow2 image, which may run out of
//! space on command) and answers them, pass after pass. Nothing may panic, hang, allocate
//! without bound, hold or pop more than the queue size, or answer more chains than it took.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::DiskImage;
use devices::virtio::block::engine::Engine;
use devices::virtio::block::execute::{Disk, WriteErrorPolicy};
use devices::virtio::block::{BlockStats, Limits, SEG_MAX};
use devices::virtio::Interrupt;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: rings at 0 (descriptor table), 0x1000 (available), 0x2000 (used); indirect
/// tables from 0x10000 (room for 65535 entries); headers, data and status bytes from BUFS.
const MEM: u64 = 4 << 20;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const TABLES: u64 = 0x1_0000;
const BUFS: u64 = 0x20_0000;
const BUFS_LEN: u64 = 0x10_0000;
/// The disk: 1 MiB.
const DISK: u64 = 1 << 20;

/// Write-type calls fail with ENOSPC while `full` is set.
struct FullableImage {
    inner: Box<dyn DiskImage>,
    full: Arc<AtomicBool>,
}

impl FullableImage {
    fn check(&self) -> block::Result<()> {
        if self.full.load(Ordering::Relaxed) {
            return Err(block::Error::io(
                "fuzz image",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }
}

impl DiskImage for FullableImage {
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
        self.inner.plan_read(offset, bufs)
    }
    fn plan_write(&mut self, offset: u64, bufs: &[block::IoBuf]) -> block::Result<block::Plan> {
        self.check()?;
        self.inner.plan_write(offset, bufs)
    }
    fn finish(&mut self, plan: block::Plan, data: block::Result<()>) -> block::Result<()> {
        self.inner.finish(plan, data)
    }
    fn lock_unit(&self) -> u64 {
        self.inner.lock_unit()
    }
    fn flush(&mut self) -> block::Result<()> {
        self.check()?;
        self.inner.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> block::Result<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&mut self, offset: u64, len: u64) -> block::Result<()> {
        self.check()?;
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

fn open_image(qcow2: bool) -> Option<Box<dyn DiskImage>> {
    let dir =
        std::path::Path::new("/dev/shm").join(format!("thinvm-fuzz-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    if qcow2 {
        let p = dir.join("disk.qcow2");
        let _ = std::fs::remove_file(&p);
        block::qcow2::create(
            &p,
            &block::qcow2::CreateOptions {
                size: Some(DISK),
                ..Default::default()
            },
        )
        .ok()?;
        let mut img = block::open(&p, &Default::default()).ok()?;
        img.set_detect_zeroes(block::DetectZeroes::Unmap);
        Some(img)
    } else {
        let p = dir.join("disk.raw");
        std::fs::File::create(&p).ok()?.set_len(DISK).ok()?;
        Some(Box::new(block::raw::RawImage::open(&p, false).ok()?))
    }
}

/// A guest address: mostly in the buffer area, sometimes anywhere.
fn addr(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary()?,
        1 => MEM - u64::from(u.int_in_range(0u16..=4096)?),
        2 => TABLES + 16 * u64::from(u.arbitrary::<u16>()?),
        _ => BUFS + u64::from(u.int_in_range(0u32..=(BUFS_LEN as u32 - 1))?) & !0xf,
    })
}

/// A descriptor length: the sizes requests use, sometimes anything.
fn len(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 17,
        4 => 20,
        5 => 512,
        6 => 4096,
        7 => 65536,
        8 => u.int_in_range(0..=1 << 20)?,
        _ => u.arbitrary()?,
    })
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&d, GuestAddress(at));
}

/// Writes descriptors at `table` (`n` entries): mostly linked in order, as drivers do.
fn descriptors(u: &mut Unstructured, mem: &GuestMemoryMmap, table: u64, n: u32) -> Result<()> {
    for i in 0..n {
        let flags = match u.int_in_range(0u8..=7)? {
            0 => u.arbitrary::<u16>()?,
            1 => 4, // indirect
            2 | 3 => 2 | 1,
            4 | 5 => 1,
            _ => 2,
        };
        let next = if u.ratio(1u8, 8)? {
            u.arbitrary()?
        } else {
            (i + 1) as u16
        };
        write_desc(
            mem,
            table + 16 * u64::from(i),
            addr(u)?,
            len(u)?,
            flags,
            next,
        );
    }
    Ok(())
}

/// A long indirect table cheaply: a header, `count` copies of one descriptor, a status.
fn long_table(u: &mut Unstructured, mem: &GuestMemoryMmap) -> Result<u32> {
    let count = u32::from(u.arbitrary::<u16>()?).min(65533);
    let (a, l, f) = (addr(u)?, len(u)?, u.arbitrary::<u16>()? & 2);
    write_desc(mem, TABLES, BUFS, 16, 1, 1);
    for i in 0..count {
        write_desc(
            mem,
            TABLES + 16 * u64::from(i + 1),
            a,
            l,
            f | 1,
            (i + 2) as u16,
        );
    }
    write_desc(
        mem,
        TABLES + 16 * u64::from(count + 1),
        BUFS + 0x1000,
        1,
        2,
        0,
    );
    Ok((count + 2) * 16)
}

/// Headers and segments: valid-looking ones at the buffer area's start, then raw bytes.
fn buffers(u: &mut Unstructured, mem: &GuestMemoryMmap) -> Result<()> {
    for k in 0..u.int_in_range(0u8..=16)? {
        let kind: u32 = match u.int_in_range(0u8..=7)? {
            0 => 0,
            1 => 1,
            2 => 4,
            3 => 8,
            4 => 11,
            5 => 13,
            6 => u.int_in_range(0..=20)?,
            _ => u.arbitrary()?,
        };
        let sector: u64 = if u.ratio(1u8, 4)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=DISK / 512 + 8)?
        };
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        // A segment right after: sector, num_sectors, flags.
        let seg_sector: u64 = u.int_in_range(0..=DISK / 512 + 8)?;
        let num: u32 = u.int_in_range(0..=4096)?;
        let flags: u32 = u.int_in_range(0..=3)?;
        h[16..24].copy_from_slice(&seg_sector.to_le_bytes());
        h[24..28].copy_from_slice(&num.to_le_bytes());
        h[28..32].copy_from_slice(&flags.to_le_bytes());
        let _ = mem.write_slice(&h, GuestAddress(BUFS + 32 * u64::from(k)));
    }
    for _ in 0..u.int_in_range(0u8..=8)? {
        let off = u.int_in_range(0..=BUFS_LEN - 1)?;
        let n = u.int_in_range(0usize..=512)?;
        let bytes = u.bytes(n.min(u.len()))?;
        let _ = mem.write_slice(bytes, GuestAddress(BUFS + off));
    }
    Ok(())
}

fn run(u: &mut Unstructured) -> Result<()> {
    let size: u16 = 1 << u.int_in_range(0u8..=8)?;
    let qcow2 = u.ratio(1u8, 4)?;
    let werror = if u.arbitrary()? {
        WriteErrorPolicy::Enospc
    } else {
        WriteErrorPolicy::Report
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return Ok(());
    };
    let Some(inner) = open_image(qcow2) else {
        return Ok(());
    };
    let full = Arc::new(AtomicBool::new(false));
    let image = FullableImage {
        inner,
        full: full.clone(),
    };
    let stats = Arc::new(BlockStats::default());
    let disk = Disk::new(
        Box::new(image),
        [0x5a; 20],
        stats.clone(),
        werror,
        u.arbitrary()?,
    );
    let limits = Limits {
        capacity_sectors: DISK / 512,
        seg_max: SEG_MAX,
        max_discard_sectors: 2048,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 2048,
        max_write_zeroes_seg: 4,
        read_only: u.ratio(1u8, 8)?,
        discard_unmap: true,
    };
    let mut engine =
        Engine::new(disk, limits, "fuzz".into()).with_first_retry(std::time::Duration::ZERO);
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else {
        return Ok(());
    };
    let irq = Interrupt::new(evt);
    let Ok(mut q) = Queue::new(256) else {
        return Ok(());
    };
    if q.try_set_size(size).is_err()
        || q.try_set_desc_table_address(GuestAddress(0)).is_err()
        || q.try_set_avail_ring_address(GuestAddress(AVAIL)).is_err()
        || q.try_set_used_ring_address(GuestAddress(USED)).is_err()
    {
        return Ok(());
    }
    q.set_ready(true);
    q.set_event_idx(u.arbitrary()?);

    buffers(u, &mem)?;
    descriptors(u, &mem, 0, u32::from(size))?;
    if u.ratio(1u8, 3)? {
        let n = u.int_in_range(1u32..=64)?;
        descriptors(u, &mem, TABLES, n)?;
    } else if u.ratio(1u8, 2)? {
        let bytes = long_table(u, &mem)?;
        // Descriptor 0 points at it.
        write_desc(&mem, 0, TABLES, bytes, 4, 0);
    }
    let mut avail_idx: u16 = 0;
    let mut popped_total = 0usize;
    for _pass in 0..u.int_in_range(1u8..=6)? {
        // The guest makes chains available (often the same heads), sometimes with an index
        // that is no valid distance from the device's.
        let n: u16 = if u.ratio(1u8, 10)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=size)?
        };
        for _ in 0..n.min(512) {
            let head: u16 = if u.ratio(1u8, 16)? {
                u.arbitrary()?
            } else {
                u.int_in_range(0..=size - 1)?
            };
            let slot = AVAIL + 4 + 2 * u64::from(avail_idx % size);
            let _ = mem.write_obj(head, GuestAddress(slot));
            avail_idx = avail_idx.wrapping_add(1);
        }
        let shown = if u.ratio(1u8, 16)? {
            u.arbitrary()?
        } else {
            avail_idx
        };
        let _ = mem.write_obj(shown, GuestAddress(AVAIL + 2));
        full.store(u.ratio(1u8, 4)?, Ordering::Relaxed);
        let stop_after: u32 = if u.ratio(1u8, 8)? {
            u.int_in_range(0..=300)?
        } else {
            u32::MAX
        };
        let calls = std::cell::Cell::new(0u32);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > stop_after
        };
        let used_before = q
            .used_idx(&mem, Ordering::Acquire)
            .map(|w| w.0)
            .unwrap_or(0);
        let r = engine.pass(&mut q, &mem, &irq, &stop);
        assert!(
            r.popped <= usize::from(size),
            "pass popped {} of a queue of {size}",
            r.popped
        );
        assert!(
            r.answered <= r.popped,
            "answered {} of {} popped",
            r.answered,
            r.popped
        );
        assert!(engine.held() <= usize::from(size), "{} held", engine.held());
        popped_total += r.popped;
        let used_after = q
            .used_idx(&mem, Ordering::Acquire)
            .map(|w| w.0)
            .unwrap_or(0);
        assert!(
            usize::from(used_after.wrapping_sub(used_before)) <= r.answered,
            "used ring moved by more than the answers"
        );
        if u.arbitrary()? {
            full.store(u.ratio(1u8, 3)?, Ordering::Relaxed);
            engine.retry_held(&mut q, &mem, &irq, &|| false);
        }
    }
    let _ = popped_total;
    engine.abandon();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
