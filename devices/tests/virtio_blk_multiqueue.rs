//! virtio-blk multi-queue (VIRTIO_BLK_F_MQ): the device offers `num-queues` queues; each
//! request is answered on the queue it came from; a driver may leave the later queues
//! unused (Linux uses at most one per vCPU); a single-queue device does not offer MQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use devices::bus::BusDevice;
use devices::virtio::block::BlockConfig;

const MQ: u64 = 1 << 12;

fn mq_vm(queues: u16) -> Vm {
    let dir = TempDir::new("mq");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x22u8; 1 << 20]).unwrap();
    let image = block::raw::RawImage::open(&p, false).unwrap();
    vm_with(
        Box::new(image),
        BlockConfig {
            num_queues: queues,
            ..block_config()
        },
        dir,
    )
}

/// Sets up queue `index` for `ring` and makes it ready.
fn setup_queue_n(vm: &mut Vm, index: u32, ring: &Ring) {
    ring.clear(&vm.mem);
    setup_queue_at(&mut vm.t, index, ring);
}

/// Queues a write of `len` bytes of `byte` at `sector` on `ring` (descriptors from `slot`).
fn queue_write(vm: &Vm, ring: &Ring, slot: u16, sector: u64, byte: u8) -> u64 {
    fill(&vm.mem, DATA + 0x1_0000 * u64::from(slot), 4096, byte);
    queue_request(&vm.mem, ring, slot, slot, T_OUT, sector, 4096);
    STATUS + u64::from(slot)
}

#[test]
fn requests_are_answered_on_the_queue_they_came_from() {
    let mut vm = mq_vm(4);
    // The config space says 4 queues; MQ is offered.
    let mut nq = [0u8; 2];
    vm.t.read(0x100 + 0x22, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 4);
    let t = &mut vm.t;
    w(t, 0x14, 0);
    assert_ne!(u64::from(r(t, 0x10)) & MQ, 0, "VIRTIO_BLK_F_MQ offered");
    // The driver uses two of the four queues.
    let rings = [Ring::at(0x1000, 64), Ring::at(0x8000, 64)];
    let t = &mut vm.t;
    w(t, 0x70, 0);
    w(t, 0x70, 1);
    w(t, 0x70, 1 | 2);
    w(t, 0x24, 0);
    w(t, 0x20, (FEATURES | MQ) as u32);
    w(t, 0x24, 1);
    w(t, 0x20, (FEATURES >> 32) as u32);
    w(t, 0x70, 1 | 2 | 8);
    setup_queue_n(&mut vm, 0, &rings[0]);
    setup_queue_n(&mut vm, 1, &rings[1]);
    w(&mut vm.t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(
        r(&mut vm.t, 0x70) & 0x40,
        0,
        "no NEEDS_RESET: unused queues are fine"
    );
    // Two writes on queue 1, one on queue 0.
    let s1 = queue_write(&vm, &rings[1], 0, 8, 0x11);
    let s2 = queue_write(&vm, &rings[1], 1, 16, 0x12);
    let s0 = queue_write(&vm, &rings[0], 2, 24, 0x10);
    w(&mut vm.t, 0x50, 1);
    assert!(
        rings[1].wait_used(&vm.mem, 2, Duration::from_secs(10)),
        "queue 1 answered"
    );
    w(&mut vm.t, 0x50, 0);
    assert!(
        rings[0].wait_used(&vm.mem, 1, Duration::from_secs(10)),
        "queue 0 answered"
    );
    assert_eq!(
        rings[1].used_idx(&vm.mem),
        2,
        "queue 1: its two requests, no more"
    );
    assert_eq!(rings[0].used_idx(&vm.mem), 1, "queue 0: its one request");
    let heads: Vec<u32> = (0..2).map(|i| rings[1].used_elem(&vm.mem, i).0).collect();
    assert!(
        heads.contains(&0) && heads.contains(&3),
        "queue 1's own heads: {heads:?}"
    );
    assert_eq!(rings[0].used_elem(&vm.mem, 0).0, 6, "queue 0's own head");
    for s in [s0, s1, s2] {
        assert_eq!(status_at(&vm.mem, s), 0);
    }
    let disk = vm.dir.join("disk.raw");
    assert_eq!(disk_bytes(&disk, 8 * 512, 4096), vec![0x11; 4096]);
    assert_eq!(disk_bytes(&disk, 16 * 512, 4096), vec![0x12; 4096]);
    assert_eq!(disk_bytes(&disk, 24 * 512, 4096), vec![0x10; 4096]);
    // A reset ends the activation; the device comes back with one queue used.
    w(&mut vm.t, 0x70, 0);
    assert_eq!(driver_init(&mut vm, &rings[0], FEATURES) & 0x40, 0);
    queue_write(&vm, &rings[0], 0, 32, 0x13);
    kick(&mut vm);
    assert!(rings[0].wait_used(&vm.mem, 1, Duration::from_secs(10)));
    assert_eq!(disk_bytes(&disk, 32 * 512, 4096), vec![0x13; 4096]);
}

#[test]
fn a_single_queue_device_does_not_offer_mq() {
    let mut vm = mq_vm(1);
    w(&mut vm.t, 0x14, 0);
    assert_eq!(u64::from(r(&mut vm.t, 0x10)) & MQ, 0);
    let mut nq = [0u8; 2];
    vm.t.read(0x100 + 0x22, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
}
