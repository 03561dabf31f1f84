//! The virtio-mmio transport's edge cases (virtio 1.2 §4.2.2, §3.1): queue sizes and ring
//! addresses that cannot work, DRIVER_OK out of order, writes the driver may not make when it
//! makes them, selectors out of range, config-space accesses of any width and offset. A
//! device that cannot be used says DEVICE_NEEDS_RESET and serves nothing; everything else is
//! ignored without effect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use devices::bus::BusDevice;

const NEEDS_RESET: u32 = 0x40;
const WAIT: Duration = Duration::from_secs(10);

/// Negotiates features, writes queue 0 with `size` and the given ring addresses, sets
/// DRIVER_OK; returns the status register.
fn init_with(vm: &mut Vm, size: u32, desc: u64, avail: u64, used: u64, ready: bool) -> u32 {
    let t = &mut vm.t;
    w(t, 0x70, 0);
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x24, 0);
    w(t, 0x20, 0);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70), 1 | 2 | 8);
    Ring::at(0x1000, 16).clear(&vm.mem);
    w(t, 0x30, 0);
    w(t, 0x38, size);
    for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        w(t, off, a as u32);
        w(t, off + 4, (a >> 32) as u32);
    }
    w(t, 0x44, u32::from(ready));
    w(t, 0x70, 1 | 2 | 8 | 4);
    r(t, 0x70)
}

/// Whether a read request on `ring` gets answered (the device is really serving it).
fn serves(vm: &mut Vm, ring: &Ring) -> bool {
    header(&vm.mem, HDR, T_IN, 0);
    write_chain(
        &vm.mem,
        ring,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    let n = ring.used_idx(&vm.mem);
    ring.publish(&vm.mem, 0);
    kick(vm);
    ring.wait_used(&vm.mem, n.wrapping_add(1), Duration::from_millis(300))
}

#[test]
fn unusable_queue_sizes_need_a_reset() {
    for size in [0u32, 100, 512, 0x1_0010, 0xffff_ffff] {
        let mut vm = raw_vm(1 << 20);
        let ring = Ring::at(0x1000, 16);
        let status = init_with(&mut vm, size, ring.desc, ring.avail, ring.used, true);
        assert_eq!(
            status & NEEDS_RESET,
            NEEDS_RESET,
            "size {size:#x}: {status:#x}"
        );
        assert!(!vm.t.is_active(), "size {size:#x} activated");
        assert!(!serves(&mut vm, &ring), "size {size:#x} served");
        // The configuration interrupt tells the driver.
        assert_eq!(r(&mut vm.t, 0x60) & 2, 2);
        // A reset clears it all, and a good size works.
        assert_eq!(
            init_with(&mut vm, 16, ring.desc, ring.avail, ring.used, true) & NEEDS_RESET,
            0
        );
        assert!(serves(&mut vm, &ring));
    }
}

#[test]
fn rings_that_are_misaligned_or_not_in_ram_need_a_reset() {
    let ring = Ring::at(0x1000, 16);
    let end = MEM_SIZE as u64;
    let cases: [(&str, u64, u64, u64); 8] = [
        ("descriptors misaligned", 0x1008, ring.avail, ring.used),
        (
            "available ring misaligned",
            ring.desc,
            ring.avail + 1,
            ring.used,
        ),
        ("used ring misaligned", ring.desc, ring.avail, ring.used + 2),
        ("descriptors outside RAM", 1 << 40, ring.avail, ring.used),
        ("used ring outside RAM", ring.desc, ring.avail, end + 0x1000),
        (
            "descriptors across the end of RAM",
            end - 0x80,
            ring.avail,
            ring.used,
        ),
        (
            "used ring across the end of RAM",
            ring.desc,
            ring.avail,
            end - 0x40,
        ),
        (
            "available ring at the top of the address space",
            ring.desc,
            u64::MAX - 1,
            ring.used,
        ),
    ];
    for (what, desc, avail, used) in cases {
        let mut vm = raw_vm(1 << 20);
        let status = init_with(&mut vm, 16, desc, avail, used, true);
        assert_eq!(status & NEEDS_RESET, NEEDS_RESET, "{what}: {status:#x}");
        assert!(!vm.t.is_active(), "{what}: activated");
    }
    // A queue the driver did not make ready.
    let mut vm = raw_vm(1 << 20);
    let status = init_with(&mut vm, 16, ring.desc, ring.avail, ring.used, false);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET, "not ready: {status:#x}");
}

#[test]
fn driver_ok_before_features_ok_needs_a_reset() {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    let t = &mut vm.t;
    w(t, 0x70, 1 | 2);
    // Queue registers before FEATURES_OK are not taken either.
    setup_queue(t, &ring);
    w(t, 0x70, 1 | 2 | 4);
    let status = r(t, 0x70);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET, "{status:#x}");
    assert!(!vm.t.is_active());
    assert!(!serves(&mut vm, &ring));
    // FEATURES_OK refused because VERSION_1 is missing, then DRIVER_OK: the same.
    let t = &mut vm.t;
    w(t, 0x70, 0);
    w(t, 0x70, 1 | 2);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(r(t, 0x70) & 8, 0, "FEATURES_OK without VERSION_1");
    w(t, 0x70, 1 | 2 | 4);
    assert_eq!(r(t, 0x70) & NEEDS_RESET, NEEDS_RESET);
    assert!(!vm.t.is_active());
    // Feature bits beyond the device's 64 make FEATURES_OK fail.
    let t = &mut vm.t;
    w(t, 0x70, 0);
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x24, 2);
    w(t, 0x20, 1);
    w(t, 0x70, 1 | 2 | 8);
    assert_eq!(
        r(t, 0x70) & 8,
        0,
        "FEATURES_OK with a bit in feature word 2"
    );
}

#[test]
fn writes_after_driver_ok_and_status_bits_cleared_are_ignored() {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES), 1 | 2 | 4 | 8);
    let t = &mut vm.t;
    // Queue size, addresses, readiness and driver features no longer change.
    w(t, 0x38, 4);
    w(t, 0x80, 0x5000);
    w(t, 0x44, 0);
    w(t, 0x24, 0);
    w(t, 0x20, 0);
    assert_eq!(r(t, 0x44), 1, "QUEUE_READY still set");
    // Clearing status bits (other than by a reset) is ignored.
    w(t, 0x70, 1 | 2 | 4);
    assert_eq!(r(t, 0x70), 1 | 2 | 4 | 8);
    assert!(
        serves(&mut vm, &ring),
        "the device keeps serving the queue as set up"
    );
    assert!(vm.t.is_active());
    // FAILED is recorded.
    w(&mut vm.t, 0x70, 1 | 2 | 4 | 8 | 0x80);
    assert_eq!(r(&mut vm.t, 0x70) & 0x80, 0x80);
}

#[test]
fn queue_registers_change_only_while_the_queue_is_not_ready() {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    let t = &mut vm.t;
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 1 | 2 | 8);
    setup_queue(t, &ring);
    // Ready: a new size and descriptor address are not taken (§4.2.2.2).
    w(t, 0x38, 4);
    w(t, 0x80, 0x5000);
    w(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(r(t, 0x70) & NEEDS_RESET, 0);
    assert!(serves(&mut vm, &ring));
}

#[test]
fn queue_selectors_out_of_range_touch_nothing() {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    let t = &mut vm.t;
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 1);
    w(t, 0x20, 1);
    w(t, 0x70, 1 | 2 | 8);
    setup_queue(t, &ring);
    for sel in [1u32, 7, u32::MAX] {
        w(t, 0x30, sel);
        assert_eq!(r(t, 0x34), 0, "QUEUE_NUM_MAX of queue {sel}");
        assert_eq!(r(t, 0x44), 0, "QUEUE_READY of queue {sel}");
        w(t, 0x38, 2);
        w(t, 0x80, 0x4000);
        w(t, 0x44, 0);
    }
    w(t, 0x30, 0);
    assert_eq!(r(t, 0x34), 256);
    w(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(r(t, 0x70) & NEEDS_RESET, 0);
    assert!(serves(&mut vm, &ring), "queue 0 as the driver set it up");
}

#[test]
fn config_space_reads_of_any_width_and_offset_and_odd_register_accesses() {
    let mut vm = raw_vm(1 << 20);
    // capacity (le64 at 0): 2048 sectors; seg_max (le32 at 12): 254.
    let read = |t: &mut devices::virtio::mmio::MmioTransport, off: u64, n: usize| {
        let mut b = vec![0xaau8; n];
        t.read(0x100 + off, &mut b);
        b
    };
    assert_eq!(read(&mut vm.t, 0, 8), 2048u64.to_le_bytes());
    assert_eq!(read(&mut vm.t, 1, 1), [8]);
    assert_eq!(read(&mut vm.t, 1, 2), [8, 0]);
    assert_eq!(read(&mut vm.t, 12, 4), 254u32.to_le_bytes());
    assert_eq!(read(&mut vm.t, 13, 8), [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read(&mut vm.t, 0x22, 2), [1, 0], "num_queues");
    // Across the end of the config space: the bytes inside, then zeros.
    let cfg_len = 96u64;
    assert_eq!(read(&mut vm.t, cfg_len - 2, 4), [0, 0, 0, 0]);
    let b = read(&mut vm.t, 0x38 - 2, 4);
    assert_eq!(b, [0, 0, 1, 0], "write_zeroes_may_unmap straddling a read");
    assert_eq!(read(&mut vm.t, 0xeff, 1), [0]);
    // Config writes change nothing, not even the generation.
    vm.t.write(0x100, &[0xff; 8]);
    assert_eq!(read(&mut vm.t, 0, 8), 2048u64.to_le_bytes());
    assert_eq!(r(&mut vm.t, 0xfc), 0);
    // Register reads that are not 32-bit aligned read zeros; such writes do nothing.
    let mut b = [0xaau8; 2];
    vm.t.read(0x00, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xaau8; 4];
    vm.t.read(0x02, &mut b);
    assert_eq!(b, [0; 4]);
    vm.t.write(0x70, &[1]);
    vm.t.write(0x71, &[1, 0, 0, 0]);
    assert_eq!(r(&mut vm.t, 0x70), 0);
    // No shared memory regions: length -1.
    assert_eq!(
        (r(&mut vm.t, 0xb0), r(&mut vm.t, 0xb4)),
        (u32::MAX, u32::MAX)
    );
    // Reset clears the interrupt status and QUEUE_READY.
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    assert!(serves(&mut vm, &ring));
    assert_eq!(r(&mut vm.t, 0x60) & 1, 1);
    w(&mut vm.t, 0x70, 0);
    assert_eq!((r(&mut vm.t, 0x60), r(&mut vm.t, 0x44)), (0, 0));
    assert!(ring.wait_used(&vm.mem, 1, WAIT));
}
