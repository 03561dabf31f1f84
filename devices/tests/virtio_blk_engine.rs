//! The queue engine's bounds, one pass at a time over a real virtio-queue `Queue`: a pass
//! takes at most queue-size chains and asks `stop` between requests; a broken available
//! index makes no pass at all; requests held for lack of host space count against the
//! queue size, so a guest reusing the same heads cannot make the device hold more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use block::raw::RawImage;
use common::*;
use devices::virtio::block::engine::Engine;
use devices::virtio::block::execute::{Disk, WriteErrorPolicy};
use devices::virtio::block::BlockStats;
use devices::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

struct Setup {
    mem: GuestMemoryMmap,
    ring: Ring,
    q: Queue,
    engine: Engine,
    irq: Arc<Interrupt>,
    faults: Arc<Faults>,
    stats: Arc<BlockStats>,
    _dir: TempDir,
}

fn setup(size: u16) -> Setup {
    let dir = TempDir::new("engine");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let faults = Arc::new(Faults::default());
    let image = FaultyImage {
        inner: Box::new(RawImage::open(&p, false).unwrap()),
        faults: faults.clone(),
    };
    let stats = Arc::new(BlockStats::default());
    let disk = Disk::new(
        Box::new(image),
        [0; 20],
        stats.clone(),
        WriteErrorPolicy::Enospc,
        true,
    );
    let limits = engine_limits(2048);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let ring = Ring::at(0x1000, size);
    let q = ready_queue(&ring, size);
    Setup {
        mem,
        ring,
        q,
        engine: Engine::new(disk, limits, "test".into()),
        irq: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        faults,
        stats,
        _dir: dir,
    }
}

fn get_id_chain(s: &Setup) {
    header(&s.mem, HDR, T_GET_ID, 0);
    write_chain(
        &s.mem,
        &s.ring,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
}

#[test]
fn a_pass_takes_at_most_a_queue_of_chains_and_asks_stop_between_requests() {
    let mut s = setup(256);
    get_id_chain(&s);
    for _ in 0..256 {
        s.ring.publish(&s.mem, 0);
    }
    let asked = Cell::new(0u32);
    let stop = || {
        asked.set(asked.get() + 1);
        false
    };
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &stop);
    assert_eq!(
        (r.popped, r.answered, r.more, r.stopped),
        (256, 256, true, false)
    );
    assert!(asked.get() >= 512, "stop asked {} times", asked.get());
    // The guest makes 256 more available meanwhile: the next pass takes those, no more.
    for _ in 0..256 {
        s.ring.publish(&s.mem, 0);
    }
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (256, 256));
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.more), (0, false));
    assert_eq!(s.stats.snapshot().get_ids, 512);
    // A stop that comes mid-pass leaves the rest unanswered.
    for _ in 0..16 {
        s.ring.publish(&s.mem, 0);
    }
    let n = Cell::new(0u32);
    let stop = || {
        n.set(n.get() + 1);
        n.get() > 16 + 4
    };
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &stop);
    assert!(r.stopped && r.popped == 16 && r.answered < 16, "{r:?}");
}

#[test]
fn a_broken_available_index_makes_no_pass() {
    let mut s = setup(16);
    get_id_chain(&s);
    s.mem
        .write_obj(17u16, GuestAddress(s.ring.avail + 2))
        .unwrap();
    for _ in 0..3 {
        let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
        assert_eq!((r.popped, r.answered, r.more), (0, 0, false));
    }
}

#[test]
fn held_writes_count_against_the_queue_size() {
    let mut s = setup(16);
    s.faults.no_space.store(true, Ordering::SeqCst);
    header(&s.mem, HDR, T_OUT, 0);
    write_chain(
        &s.mem,
        &s.ring,
        0,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    for _ in 0..16 {
        s.ring.publish(&s.mem, 0);
    }
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (16, 0));
    assert_eq!(s.engine.held(), 16);
    // The same head, made available again and again: nothing more is taken.
    for _ in 0..16 {
        s.ring.publish(&s.mem, 0);
    }
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.more), (0, false));
    assert_eq!(s.engine.held(), 16);
    // Space returns: the retry answers them all; the next pass takes the 16 waiting.
    s.faults.no_space.store(false, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(60));
    assert_eq!(s.engine.retry_held(&mut s.q, &s.mem, &s.irq, &|| false), 16);
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (16, 16));
    assert_eq!(s.stats.snapshot().writes, 32);
}

/// Publishes one chain per block of `blocks`: chain i a `kind` request (read or write) of
/// 4 KiB block `blocks[i]`, its data buffer 64 KiB apart from the others' in guest memory and
/// filled with `fill(i)` first, its status byte set to 0xff.
fn block_chains(s: &Setup, kind: u32, blocks: &[u64], fill: impl Fn(u64) -> u8) {
    for (i, &b) in blocks.iter().enumerate() {
        let i = i as u64;
        header(&s.mem, HDR + 16 * i, kind, b * 8);
        s.mem
            .write_slice(&[fill(i); 4096], GuestAddress(DATA + 0x10000 * i))
            .unwrap();
        s.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        let head = write_chain(
            &s.mem,
            &s.ring,
            3 * i as u16,
            &[
                (HDR + 16 * i, 16, false),
                (DATA + 0x10000 * i, 4096, kind == T_IN),
                (STATUS + i, 1, true),
            ],
        );
        s.ring.publish(&s.mem, head);
    }
}

/// Reads that continue one another in one pass run as one image read (as QEMU's virtio-blk
/// merges a batch's adjacent requests), each request answered with its own data and length;
/// a read that does not continue them runs on its own; when the merged read fails, every
/// request in it is answered with IOERR, none with OK.
#[test]
fn adjacent_reads_of_a_pass_run_as_one_image_read_and_each_gets_its_own_answer() {
    let mut s = setup(16);
    // Each 4 KiB block of the disk holds its number + 1.
    let pattern: Vec<u8> = (0..256u32).flat_map(|b| [(b + 1) as u8; 4096]).collect();
    std::fs::write(s._dir.join("disk.raw"), &pattern).unwrap();
    // Chain i reads block BLOCKS[i] into its own buffer (64 KiB apart in guest memory).
    const BLOCKS: [u64; 5] = [0, 1, 2, 3, 10];
    let chains = |s: &Setup| block_chains(s, T_IN, &BLOCKS, |_| 0xee);
    chains(&s);
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (5, 5), "{r:?}");
    for (i, &b) in BLOCKS.iter().enumerate() {
        let i = i as u64;
        assert_eq!(status_at(&s.mem, STATUS + i), 0, "chain {i}");
        let mut got = [0u8; 4096];
        s.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x10000 * i))
            .unwrap();
        assert!(
            got.iter().all(|&x| x == (b + 1) as u8),
            "chain {i}: block {b}"
        );
    }
    for k in 0..5u16 {
        let (head, len) = s.ring.used_elem(&s.mem, k);
        assert_eq!(len, 4096 + 1, "used entry {k} (head {head})");
    }
    // Blocks 0-3 in one image read, block 10 in another.
    assert_eq!(s.faults.plan_reads.load(Ordering::SeqCst), 2);
    let st = s.stats.snapshot();
    assert_eq!((st.reads, st.merged_reads, st.errors), (5, 4, 0));
    // The same again, the image failing: five IOERRs, no data claimed.
    s.faults.read_eio.store(true, Ordering::SeqCst);
    chains(&s);
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (5, 5), "{r:?}");
    for i in 0..5u64 {
        assert_eq!(status_at(&s.mem, STATUS + i), 1, "chain {i}: IOERR");
    }
    for k in 5..10u16 {
        assert_eq!(s.ring.used_elem(&s.mem, k).1, 1, "used entry {k}");
    }
    assert_eq!(s.faults.plan_reads.load(Ordering::SeqCst), 4);
    let st = s.stats.snapshot();
    assert_eq!((st.reads, st.errors), (5, 5));
}

/// Writes that continue one another in one pass run as one image write, each request
/// answered OK with the disk holding every request's own data; a write that does not
/// continue them runs on its own. When the merged write finds the host full, every request
/// in it is held (none answered), and once space returns each is retried and answered.
#[test]
fn adjacent_writes_of_a_pass_run_as_one_image_write_and_a_full_host_holds_each() {
    let mut s = setup(16);
    // Chain i writes block BLOCKS[i] with the byte 0x10 + i + 16 * round.
    const BLOCKS: [u64; 5] = [4, 5, 6, 7, 20];
    let chains =
        |s: &Setup, round: u8| block_chains(s, T_OUT, &BLOCKS, |i| 0x10 + i as u8 + 16 * round);
    let disk_holds = |s: &Setup, round: u8| {
        let disk = std::fs::read(s._dir.join("disk.raw")).unwrap();
        for (i, &b) in BLOCKS.iter().enumerate() {
            let at = (b * 4096) as usize;
            let want = 0x10 + i as u8 + 16 * round;
            assert!(
                disk[at..at + 4096].iter().all(|&x| x == want),
                "round {round}: block {b} does not hold chain {i}'s data"
            );
        }
    };
    chains(&s, 0);
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (5, 5), "{r:?}");
    for i in 0..5u64 {
        assert_eq!(status_at(&s.mem, STATUS + i), 0, "chain {i}");
    }
    for k in 0..5u16 {
        assert_eq!(s.ring.used_elem(&s.mem, k).1, 1, "used entry {k}");
    }
    disk_holds(&s, 0);
    // Blocks 4-7 in one image write, block 20 in another.
    assert_eq!(s.faults.plan_writes.load(Ordering::SeqCst), 2);
    let st = s.stats.snapshot();
    assert_eq!((st.writes, st.merged_writes, st.errors), (5, 4, 0));
    // Again with the host full: all five held, none answered.
    s.faults.no_space.store(true, Ordering::SeqCst);
    chains(&s, 1);
    let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
    assert_eq!((r.popped, r.answered), (5, 0), "{r:?}");
    assert_eq!(s.engine.held(), 5);
    assert_eq!(s.ring.used_idx(&s.mem), 5);
    // Space returns: each is retried on its own and answered OK, the disk holds round 1.
    s.faults.no_space.store(false, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(60));
    assert_eq!(s.engine.retry_held(&mut s.q, &s.mem, &s.irq, &|| false), 5);
    assert_eq!(s.engine.held(), 0);
    for i in 0..5u64 {
        assert_eq!(
            status_at(&s.mem, STATUS + i),
            0,
            "chain {i} after the retry"
        );
    }
    disk_holds(&s, 1);
    let st = s.stats.snapshot();
    assert_eq!((st.writes, st.errors), (10, 0));
}

/// An available ring whose index is readable but whose entries lie outside guest memory
/// announces requests virtio-queue cannot pop: after a pass or two the device stops asking
/// for another pass (a worker spinning on it would burn a host CPU for the guest) and waits
/// for the next notification.
#[test]
fn an_available_ring_that_cannot_be_read_is_not_spun_on() {
    let mut s = setup(16);
    let avail = MEM_SIZE as u64 - 4;
    s.q.set_ready(false);
    s.q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    s.q.set_ready(true);
    // Three requests announced; their ring entries would be past the end of memory.
    s.mem.write_obj(3u16, GuestAddress(avail + 2)).unwrap();
    let mut passes = 0;
    loop {
        let r = s.engine.pass(&mut s.q, &s.mem, &s.irq, &|| false);
        assert_eq!(r.popped, 0, "{r:?}");
        passes += 1;
        if !r.more {
            break;
        }
        assert!(passes < 10, "still asking for another pass after {passes}");
    }
    assert!(passes <= 3, "{passes} passes");
}

/// Two queues each answer a request in one worker round: the passes only record that
/// answers are owed, and the round's end (`signal_answers`) raises one interrupt for both,
/// not one per queue; a single-queue `pass` is a round of its own and signals by itself.
#[test]
fn a_round_over_two_queues_raises_one_interrupt() {
    let mut s = setup(16);
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Interrupt::new(evt.try_clone().unwrap());
    let ring1 = Ring::at(0x10000, 16);
    let q1 = ready_queue(&ring1, 16);
    get_id_chain(&s);
    header(&s.mem, HDR, T_GET_ID, 0);
    write_chain(
        &s.mem,
        &ring1,
        0,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    s.ring.publish(&s.mem, 0);
    ring1.publish(&s.mem, 0);
    let mut queues = vec![s.q, q1];
    for qi in 0..2 {
        let r = s
            .engine
            .pass_queue(&mut queues, qi, &s.mem, &irq, &|| false);
        assert_eq!((r.popped, r.answered), (1, 1), "queue {qi}");
    }
    assert_eq!(s.ring.used_idx(&s.mem), 1);
    assert_eq!(ring1.used_idx(&s.mem), 1);
    assert!(s.engine.unsignalled());
    assert!(evt.read().is_err(), "no interrupt before the round ends");
    s.engine.signal_answers(&mut queues, &s.mem, &irq);
    assert!(!s.engine.unsignalled());
    // Nothing owed: a second call raises nothing.
    s.engine.signal_answers(&mut queues, &s.mem, &irq);
    assert_eq!(evt.read().unwrap_or(0), 1, "one interrupt for the round");

    // A round of one pass over a single queue signals at its end.
    s.ring.publish(&s.mem, 0);
    let r = s.engine.pass(&mut queues[0], &s.mem, &irq, &|| false);
    assert_eq!((r.popped, r.answered), (1, 1));
    assert!(!s.engine.unsignalled());
    assert_eq!(evt.read().unwrap_or(0), 1, "the pass signalled its answer");
}
