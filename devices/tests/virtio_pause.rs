//! Pausing virtio devices for a snapshot, through the MMIO transport: a virtio-blk device
//! answers what it took before it reports paused, takes nothing new until resumed, runs image
//! jobs meanwhile, refuses to pause while writes wait for host space; the transport's state
//! restores into a fresh transport that goes on from the saved queue positions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use devices::virtio::block::BlockConfig;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A 4 KiB write of `byte` at `sector` through chain slot `slot`.
fn queue_write(vm: &Vm, ring: &Ring, slot: u16, sector: u64, byte: u8) {
    fill(&vm.mem, DATA + 0x1_0000 * u64::from(slot), 4096, byte);
    queue_request(&vm.mem, ring, slot, slot, T_OUT, sector, 4096);
}

#[test]
fn a_paused_disk_is_drained_takes_nothing_new_and_resumes() {
    let (mut vm, faults) = faulty_vm(block_config());
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    // The worker gets stuck inside the first write: requests are in flight.
    faults.block();
    for slot in 0..2 {
        queue_write(&vm, &ring, slot, u64::from(slot) * 8, 0x40 + slot as u8);
    }
    kick(&mut vm);
    wait_for("the worker in a write", || {
        faults.blocked_calls.load(Ordering::SeqCst) >= 1
    });
    let returned = std::sync::atomic::AtomicBool::new(false);
    let st = std::thread::scope(|s| {
        let t = &mut vm.t;
        let r = &returned;
        let h = s.spawn(move || {
            let st = t.pause();
            r.store(true, Ordering::SeqCst);
            st
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !returned.load(Ordering::SeqCst),
            "paused with a request in flight"
        );
        faults.unblock();
        h.join().unwrap().unwrap()
    });
    // Everything it took was answered before it said paused.
    let used = ring.used_idx(&vm.mem);
    assert!(st.active);
    assert_eq!(st.progress.len(), 1);
    assert!(used >= 1);
    assert_eq!(st.progress[0].next_used, used);
    assert_eq!(st.progress[0].next_avail, used);
    // Nothing new is taken while paused ...
    queue_write(&vm, &ring, 2, 64, 0x99);
    kick(&mut vm);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ring.used_idx(&vm.mem), used);
    // ... and once resumed, everything is.
    vm.t.resume();
    wait_for("the writes after resume", || ring.used_idx(&vm.mem) == 3);
    for slot in 0..3 {
        assert_eq!(status_at(&vm.mem, STATUS + slot), 0);
    }
}

#[test]
fn image_jobs_run_only_while_paused() {
    let dir = TempDir::new("jobs");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let image = block::raw::RawImage::open(&p, false).unwrap();
    let block = devices::virtio::block::Block::new(Box::new(image), block_config(), None).unwrap();
    let jobs = block.image_jobs();
    let mut dev: Box<dyn devices::virtio::VirtioDevice> = Box::new(block);
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = ran.clone();
    assert!(jobs
        .run(Box::new(move |_img| {
            r.fetch_add(1, Ordering::SeqCst);
        }))
        .is_err());
    // Never activated: pausing parks its worker all the same (snapshots freeze its image).
    assert!(dev.pause().unwrap().is_empty());
    let r = ran.clone();
    jobs.run(Box::new(move |img| {
        assert_eq!(img.virtual_size(), 1 << 20);
        r.fetch_add(1, Ordering::SeqCst);
    }))
    .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    dev.resume();
    dev.shutdown();
}

#[test]
fn writes_waiting_for_host_space_refuse_a_pause() {
    let (mut vm, faults) = faulty_vm(BlockConfig {
        reset_wait: Duration::from_secs(2),
        ..block_config()
    });
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    faults.no_space.store(true, Ordering::SeqCst);
    queue_write(&vm, &ring, 0, 0, 0x55);
    kick(&mut vm);
    wait_for("a held write", || vm.stats.held.load(Ordering::SeqCst) == 1);
    let err = vm.t.pause().unwrap_err().to_string();
    assert!(err.contains("wait for host space"), "{err}");
    faults.no_space.store(false, Ordering::SeqCst);
    wait_for("the held write", || ring.used_idx(&vm.mem) == 1);
    assert!(vm.t.pause().is_ok());
    vm.t.resume();
}

#[test]
fn a_saved_transport_restores_and_goes_on_from_its_queue_positions() {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    for slot in 0..3 {
        queue_write(&vm, &ring, slot, u64::from(slot) * 8, 0x10 + slot as u8);
    }
    kick(&mut vm);
    wait_for("three writes", || ring.used_idx(&vm.mem) == 3);
    let st = vm.t.pause().unwrap();
    vm.t.resume();
    vm.t.shutdown();
    // A second device on the same image and memory, restored from the state.
    let p = vm.dir.join("disk.raw");
    let image = block::raw::RawImage::open(&p, false).unwrap();
    let block = devices::virtio::block::Block::new(Box::new(image), block_config(), None).unwrap();
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq_seen = irq.try_clone().unwrap();
    let mut t2 =
        devices::virtio::mmio::MmioTransport::new(Box::new(block), vm.mem.clone(), irq).unwrap();
    t2.restore(&st).unwrap();
    assert_eq!(r(&mut t2, 0x70), st.status);
    // The completions' interrupt was not acknowledged: the restored device raises it again
    // (the saved interrupt controller may have missed it) and shows it in its status.
    assert_ne!(
        st.interrupt_status, 0,
        "the completions' interrupt is pending"
    );
    assert_eq!(r(&mut t2, 0x60), st.interrupt_status);
    assert!(
        irq_seen.read().is_ok(),
        "a pending interrupt is raised again"
    );
    assert!(t2.is_active());
    queue_write(&vm, &ring, 3, 40, 0x77);
    w(&mut t2, 0x50, 0);
    wait_for("the write on the restored device", || {
        ring.used_idx(&vm.mem) == 4
    });
    assert_eq!(
        ring.used_elem(&vm.mem, 3).0,
        9,
        "the fourth chain (head 9) answered"
    );
    assert_eq!(disk_bytes(&p, 40 * 512, 4096), vec![0x77; 4096]);
    // A state for another device type, or queues of another count, is refused.
    let mut wrong = st.clone();
    wrong.device_type = 19;
    // (The disk is locked while t2's device holds it.)
    t2.shutdown();
    drop(t2);
    let image = block::raw::RawImage::open(&p, false).unwrap();
    let block = devices::virtio::block::Block::new(Box::new(image), block_config(), None).unwrap();
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq_seen = irq.try_clone().unwrap();
    let mut t3 =
        devices::virtio::mmio::MmioTransport::new(Box::new(block), vm.mem.clone(), irq).unwrap();
    assert!(t3.restore(&wrong).is_err());
    // Nothing pending, nothing raised.
    let mut quiet = st.clone();
    quiet.interrupt_status = 0;
    t3.restore(&quiet).unwrap();
    assert!(
        irq_seen.read().is_err(),
        "no interrupt without a pending one"
    );
    t3.shutdown();
}
