//! What a hostile guest's ring may cost the VMM, and that a reset or shutdown always ends
//! the device's work: chains longer than `seg_max` + 2 descriptors (indirect tables of up to
//! 65535 entries, zero-length descriptors) are dropped unread, a ring the guest keeps full
//! does not starve a reset, a reset never leaves the worker serving the old queue after a
//! new DRIVER_OK, and shutdown returns even when the worker is stuck in host I/O.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use devices::virtio::block::SEG_MAX;
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);

fn vm(size: u16) -> (Vm, Ring) {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, size);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    (vm, ring)
}

/// Submits an indirect chain (one ring descriptor pointing at a table of `bufs`) and waits
/// for it; returns the used length.
fn submit_indirect(vm: &mut Vm, ring: &Ring, bufs: &[(u64, u32, bool)]) -> u32 {
    let n = ring.used_idx(&vm.mem);
    let len = write_indirect(&vm.mem, TABLES, bufs);
    ring.set_desc(&vm.mem, 0, TABLES, len, F_INDIRECT, 0);
    ring.publish(&vm.mem, 0);
    kick(vm);
    assert!(
        ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT),
        "not answered"
    );
    ring.used_elem(&vm.mem, n).1
}

#[test]
fn chains_of_seg_max_plus_two_descriptors_are_served_and_longer_ones_dropped() {
    let (mut vm, ring) = vm(16);
    // A read of SEG_MAX segments of 512 bytes: header + segments + status = 256 descriptors.
    header(&vm.mem, HDR, T_IN, 0);
    let mut bufs = vec![(HDR, 16, false)];
    for i in 0..SEG_MAX as u64 {
        bufs.push((DATA + 512 * i, 512, true));
    }
    bufs.push((STATUS, 1, true));
    fill(&vm.mem, STATUS, 1, 0xff);
    let used = submit_indirect(&mut vm, &ring, &bufs);
    assert_eq!(status_at(&vm.mem, STATUS), 0);
    assert_eq!(used, SEG_MAX * 512 + 1);
    // One segment more: dropped, the status byte untouched.
    bufs.insert(1, (DATA + 0x40_0000, 512, true));
    fill(&vm.mem, STATUS, 1, 0xff);
    assert_eq!(submit_indirect(&mut vm, &ring, &bufs), 0);
    assert_eq!(
        status_at(&vm.mem, STATUS),
        0xff,
        "no status for a dropped chain"
    );
    assert_eq!(vm.stats.snapshot().dropped, 1);
    assert_eq!(vm.stats.snapshot().reads, 1);
}

#[test]
fn zero_length_descriptors_count_towards_the_limit() {
    let (mut vm, ring) = vm(16);
    header(&vm.mem, HDR, T_FLUSH, 0);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend(std::iter::repeat_n((DATA, 0, true), SEG_MAX as usize));
    bufs.push((STATUS, 1, true));
    fill(&vm.mem, STATUS, 1, 0xff);
    assert_eq!(submit_indirect(&mut vm, &ring, &bufs), 1);
    assert_eq!(
        status_at(&vm.mem, STATUS),
        0,
        "seg_max + 2 descriptors: served"
    );
    bufs.insert(1, (DATA, 0, false));
    fill(&vm.mem, STATUS, 1, 0xff);
    assert_eq!(submit_indirect(&mut vm, &ring, &bufs), 0);
    assert_eq!(status_at(&vm.mem, STATUS), 0xff, "one more: dropped");
    // The largest table there is: 65535 entries, all but header and status empty.
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend(std::iter::repeat_n((DATA, 0, true), 65533));
    bufs.push((STATUS, 1, true));
    assert_eq!(submit_indirect(&mut vm, &ring, &bufs), 0);
    assert_eq!(
        status_at(&vm.mem, STATUS),
        0xff,
        "65535 descriptors: dropped"
    );
    assert_eq!(vm.stats.snapshot().dropped, 2);
}

#[test]
fn the_same_head_many_times_in_the_ring_is_answered_each_time_within_the_ring() {
    let (mut vm, ring) = vm(16);
    header(&vm.mem, HDR, T_GET_ID, 0);
    write_chain(
        &vm.mem,
        &ring,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    for _ in 0..16 {
        ring.publish(&vm.mem, 0);
    }
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, 16, WAIT));
    for i in 0..16 {
        assert_eq!(ring.used_elem(&vm.mem, i), (0, 21));
    }
    assert_eq!(vm.stats.snapshot().get_ids, 16);
}

#[test]
fn an_available_index_too_far_ahead_is_refused_and_does_not_hold_up_a_reset() {
    let (mut vm, ring) = vm(16);
    header(&vm.mem, HDR, T_GET_ID, 0);
    write_chain(
        &vm.mem,
        &ring,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    // 17 chains "available" in a ring of 16: virtio-queue pops none of them.
    vm.mem
        .write_obj(17u16, GuestAddress(ring.avail + 2))
        .unwrap();
    kick(&mut vm);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.used_idx(&vm.mem), 0);
    let t0 = Instant::now();
    w(&mut vm.t, 0x70, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "reset took {:?}",
        t0.elapsed()
    );
    let ring2 = Ring::at(0x8000, 16);
    assert_eq!(driver_init(&mut vm, &ring2, FEATURES) & 0x40, 0);
    write_chain(
        &vm.mem,
        &ring2,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    ring2.publish(&vm.mem, 0);
    kick(&mut vm);
    assert!(
        ring2.wait_used(&vm.mem, 1, WAIT),
        "the new activation does not serve"
    );
    assert_eq!(vm.stats.snapshot().get_ids, 1);
}

/// A hostile driver on another vCPU: keeps the ring full of the same cheap request (and
/// notifies, as KVM's ioeventfd would deliver it) until told to stop, whatever the device
/// status.
fn keep_full(vm: &Vm, ring: Ring, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let mem = vm.mem.clone();
    let notify = vm.t.notify_eventfds()[0].1.try_clone().unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let used = ring.used_idx(&mem);
            let avail = ring.avail_idx(&mem);
            if avail.wrapping_sub(used) < ring.size {
                for _ in 0..ring.size - avail.wrapping_sub(used) {
                    ring.publish(&mem, 0);
                }
                let _ = notify.write(1);
            } else {
                std::hint::spin_loop();
            }
        }
    })
}

#[test]
fn a_reset_ends_the_activation_even_while_the_guest_keeps_the_ring_full() {
    let (mut vm, ring) = vm(256);
    // A 64 KiB read: long enough for the guest to refill the ring while the device works.
    header(&vm.mem, HDR, T_IN, 0);
    write_chain(
        &vm.mem,
        &ring,
        0,
        &[(HDR, 16, false), (DATA, 65536, true), (STATUS, 1, true)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let filler = keep_full(&vm, ring, stop.clone());
    kick(&mut vm);
    let t0 = Instant::now();
    while vm.stats.snapshot().reads < 2_000 {
        assert!(t0.elapsed() < WAIT, "the device does not serve the ring");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reset while the ring is full and refilled: it must not wait for the ring to drain.
    let t0 = Instant::now();
    w(&mut vm.t, 0x70, 0);
    let took = t0.elapsed();
    assert_eq!(r(&mut vm.t, 0x70), 0);
    assert!(took < Duration::from_secs(2), "reset took {took:?}");
    // The old ring is not served any more, though the guest keeps filling it...
    let frozen = ring.used_idx(&vm.mem);
    let served = vm.stats.snapshot().reads;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        ring.used_idx(&vm.mem),
        frozen,
        "the old ring is still served"
    );
    // ... nor after a new activation on a new ring, which works.
    let ring2 = Ring::at(0x8000, 16);
    assert_eq!(driver_init(&mut vm, &ring2, FEATURES) & 0x40, 0);
    header(&vm.mem, HDR + 0x100, T_IN, 0);
    write_chain(
        &vm.mem,
        &ring2,
        0,
        &[
            (HDR + 0x100, 16, false),
            (DATA, 512, true),
            (STATUS + 8, 1, true),
        ],
    );
    ring2.publish(&vm.mem, 0);
    kick(&mut vm);
    assert!(ring2.wait_used(&vm.mem, 1, WAIT));
    assert_eq!(status_at(&vm.mem, STATUS + 8), 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ring.used_idx(&vm.mem),
        frozen,
        "the old ring was served after DRIVER_OK"
    );
    assert_eq!(vm.stats.snapshot().reads, served + 1);
    stop.store(true, Ordering::Relaxed);
    filler.join().unwrap();
}

#[test]
fn a_reset_that_cannot_wait_for_blocked_host_io_completes_and_no_stale_activation_follows() {
    let cfg = devices::virtio::block::BlockConfig {
        reset_wait: Duration::from_millis(300),
        ..block_config()
    };
    let (mut vm, faults) = faulty_vm(cfg);
    let ring = Ring::at(0x1000, 16);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    // A read that blocks in the host (a hung NFS server, say).
    faults.block();
    header(&vm.mem, HDR, T_IN, 0);
    fill(&vm.mem, STATUS, 1, 0xff);
    write_chain(
        &vm.mem,
        &ring,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    ring.publish(&vm.mem, 0);
    kick(&mut vm);
    let t0 = Instant::now();
    while faults.blocked_calls.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(1));
    }
    let t0 = Instant::now();
    w(&mut vm.t, 0x70, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "reset took {:?}",
        t0.elapsed()
    );
    assert_eq!(r(&mut vm.t, 0x70), 0);
    // While the worker is still inside the old activation, a new one is refused.
    let ring2 = Ring::at(0x8000, 16);
    let status = driver_init(&mut vm, &ring2, FEATURES);
    assert_eq!(status & 0x40, 0x40, "DEVICE_NEEDS_RESET: {status:#x}");
    // The host call returns: the old request is not answered into the reset ring.
    faults.unblock();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ring.used_idx(&vm.mem), 0, "answered after the reset");
    assert_eq!(status_at(&vm.mem, STATUS), 0xff);
    // Now a reset and a new activation work.
    assert_eq!(driver_init(&mut vm, &ring2, FEATURES) & 0x40, 0);
    header(&vm.mem, HDR, T_IN, 0);
    write_chain(
        &vm.mem,
        &ring2,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    ring2.publish(&vm.mem, 0);
    kick(&mut vm);
    assert!(ring2.wait_used(&vm.mem, 1, WAIT));
    assert_eq!(status_at(&vm.mem, STATUS), 0);
}

#[test]
fn shutdown_returns_even_when_the_worker_is_stuck_in_host_io() {
    let cfg = devices::virtio::block::BlockConfig {
        reset_wait: Duration::from_millis(300),
        shutdown_wait: Duration::from_millis(500),
        ..block_config()
    };
    let (mut vm, faults) = faulty_vm(cfg);
    let ring = Ring::at(0x1000, 16);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    faults.block();
    header(&vm.mem, HDR, T_OUT, 0);
    write_chain(
        &vm.mem,
        &ring,
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    ring.publish(&vm.mem, 0);
    kick(&mut vm);
    let t0 = Instant::now();
    while faults.blocked_calls.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(1));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let Vm { mut t, .. } = vm;
    std::thread::spawn(move || {
        t.shutdown();
        let _ = tx.send(());
        drop(t);
    });
    let returned = rx.recv_timeout(Duration::from_secs(10));
    faults.unblock();
    assert!(returned.is_ok(), "shutdown did not return");
}
