//! The virtio-mmio transport in front of a real virtio-blk device, driven by a hostile
//! guest's register accesses: any offset and width, read or write, mixed with guest memory
//! writes (rings, descriptors, headers), notifications, resets, and a well-formed driver
//! initialisation now and then so activation and reset are reached often. Nothing may panic
//! or hang (shutdown must return), and the status register must keep its rules: no
//! DRIVER_OK device without FEATURES_OK, 0 after a reset.
#![no_main]

use std::time::Duration;

use block::DiskImage;
use devices::bus::BusDevice;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::MmioTransport;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 2 << 20;
const DISK: u64 = 256 << 10;

/// The registers of §4.2.2, so most accesses hit one.
const REGS: [u64; 30] = [
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64, 0x70,
    0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xac, 0xb0, 0xb4, 0xb8, 0xbc, 0xc0, 0xfc, 0x100,
];

fn image() -> Option<Box<dyn DiskImage>> {
    let p = std::path::Path::new("/dev/shm")
        .join(format!("thinvm-fuzz-mmio-{}.raw", std::process::id()));
    std::fs::File::create(&p).ok()?.set_len(DISK).ok()?;
    Some(Box::new(block::raw::RawImage::open(&p, false).ok()?))
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A driver initialisation as Linux does it, with the queue size and ring addresses taken
/// from the input (often valid).
fn driver_init(u: &mut Unstructured, t: &mut MmioTransport) -> Result<()> {
    w(t, 0x70, 0);
    w(t, 0x70, 1);
    w(t, 0x70, 3);
    w(t, 0x24, 0);
    let f0: u32 = u.arbitrary()?;
    w(
        t,
        0x20,
        f0 & ((1 << 2) | (1 << 6) | (1 << 9) | (1 << 13) | (1 << 14) | (1 << 28) | (1 << 29)),
    );
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 3 | 8);
    w(t, 0x30, 0);
    let size: u32 = if u.ratio(1u8, 8)? {
        u.arbitrary()?
    } else {
        1 << u.int_in_range(0u32..=8)?
    };
    w(t, 0x38, size);
    let base: u64 = if u.ratio(1u8, 8)? {
        u.arbitrary()?
    } else {
        0x1000 * u64::from(u.int_in_range(0u8..=15)?)
    };
    let n = u64::from(size.min(256));
    for (off, a) in [
        (0x80, base),
        (0x90, base + 16 * n),
        (0xa0, (base + 18 * n + 4 + 3) & !3),
    ] {
        w(t, off, a as u32);
        w(t, off + 4, (a >> 32) as u32);
    }
    w(t, 0x44, 1);
    w(t, 0x70, 3 | 8 | 4);
    Ok(())
}

fn run(u: &mut Unstructured) -> Result<()> {
    let Some(img) = image() else { return Ok(()) };
    let cfg = BlockConfig {
        reset_wait: Duration::from_secs(2),
        shutdown_wait: Duration::from_secs(5),
        ..BlockConfig::default()
    };
    let Ok(block) = Block::new(img, cfg, None) else {
        return Ok(());
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return Ok(());
    };
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return Ok(());
    };
    let Ok(mut t) = MmioTransport::new(Box::new(block), mem.clone(), irq) else {
        return Ok(());
    };
    let ops = u.int_in_range(0u16..=400)?;
    for _ in 0..ops {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=15)? {
            0..=4 => {
                let off = if u.ratio(1u8, 6)? {
                    u64::from(u.int_in_range(0u16..=0x1ff)?)
                } else {
                    *u.choose(&REGS)?
                };
                let v: u32 = match u.int_in_range(0u8..=3)? {
                    0 => u.int_in_range(0..=15)?,
                    1 => 1 << u.int_in_range(0..=31)?,
                    _ => u.arbitrary()?,
                };
                match u.int_in_range(0u8..=7)? {
                    0 => t.write(off, &v.to_le_bytes()[..1]),
                    1 => t.write(off, &v.to_le_bytes()[..2]),
                    2 => t.write(off, &(u64::from(v) << 3).to_le_bytes()),
                    _ => w(&mut t, off, v),
                }
            }
            5 | 6 => {
                let off = *u.choose(&REGS)? + u64::from(u.int_in_range(0u8..=3)?);
                let mut b = vec![0u8; *u.choose(&[1usize, 2, 4, 8])?];
                t.read(off, &mut b);
            }
            7 | 8 => {
                // Guest memory: ring contents, descriptors, headers.
                let at = u.int_in_range(0..=MEM - 1)?;
                let n = u.int_in_range(0usize..=256)?;
                let bytes = u.bytes(n.min(u.len()))?;
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            9 => w(&mut t, 0x50, u.int_in_range(0..=1)?),
            10 => driver_init(u, &mut t)?,
            11 => {
                w(&mut t, 0x70, 0);
                assert_eq!(r(&mut t, 0x70), 0, "status after a reset");
                assert_eq!(r(&mut t, 0x60), 0, "interrupt status after a reset");
            }
            12 => std::thread::sleep(Duration::from_micros(u64::from(
                u.int_in_range(0u16..=500)?,
            ))),
            _ => {
                // Make chains available: the avail index of a ring at a guessed place.
                let base = 0x1000 * u64::from(u.int_in_range(0u8..=15)?);
                let size = 1u64 << u.int_in_range(0u8..=8)?;
                let idx: u16 = u.arbitrary()?;
                let _ = mem.write_obj(idx, GuestAddress(base + 16 * size + 2));
                w(&mut t, 0x50, 0);
            }
        }
        let status = r(&mut t, 0x70);
        if t.is_active() {
            assert_eq!(
                status & 0xf,
                0xf,
                "active without the whole handshake: {status:#x}"
            );
            assert_eq!(status & 0x40, 0, "active and needing a reset: {status:#x}");
        }
        if status & 4 != 0 && status & 8 == 0 {
            assert!(
                !t.is_active() && status & 0x40 != 0,
                "DRIVER_OK without FEATURES_OK: {status:#x}"
            );
        }
    }
    // Shutdown must come back, whatever the guest left the device doing.
    t.shutdown();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
