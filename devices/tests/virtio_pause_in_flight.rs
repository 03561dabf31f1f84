//! Pausing a virtio-blk device while requests are in flight in its I/O pipeline (data I/O
//! started, completions not yet in): the pause returns only once every request of every
//! queue has completed and its used-ring entry is written, the saved positions of every
//! queue match the used rings, and a transport restored from that state goes on from there:
//! nothing lost, nothing answered twice. The data I/O runs on a test engine that holds its
//! completions back until the test opens its gate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use block::engine::{run_sync, Aio, Completion, DataOp, Engine};
use common::*;
use devices::virtio::block::{Block, BlockConfig, BlockStats};
use devices::virtio::mmio::{MmioTransport, TransportState};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Shared by a test and its [`GatedEngine`]: while closed, data operations stay in flight.
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    event: EventFd,
}

impl Gate {
    fn new(open: bool) -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(open),
            cv: Condvar::new(),
            event: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        })
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
        self.event.write(1).unwrap();
    }
}

/// Runs each data operation only once its gate is open (then at once, on the reaping
/// thread); completions are signalled on the gate's eventfd.
struct GatedEngine {
    gate: Arc<Gate>,
    ops: Vec<(u64, DataOp)>,
}

impl Engine for GatedEngine {
    fn aio(&self) -> Aio {
        Aio::Threads
    }

    unsafe fn submit(&mut self, tag: u64, op: DataOp) {
        self.ops.push((tag, op));
        if *self.gate.open.lock().unwrap() {
            self.gate.event.write(1).unwrap();
        }
    }

    fn reap(&mut self, wait: bool, out: &mut Vec<Completion>) {
        let _ = self.gate.event.read();
        let mut open = self.gate.open.lock().unwrap();
        while wait && !*open && !self.ops.is_empty() {
            open = self.gate.cv.wait(open).unwrap();
        }
        if *open {
            for (tag, op) in self.ops.drain(..) {
                out.push((tag, run_sync(&op)));
            }
        }
    }

    fn notifier(&self) -> Option<RawFd> {
        Some(self.gate.event.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.ops.len()
    }
}

struct GatedVm {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    stats: Arc<BlockStats>,
    dir: TempDir,
}

/// A transport over a `queues`-queue device on raw image `path`, its data I/O behind `gate`.
fn gated_transport(
    path: &Path,
    queues: u16,
    mem: &GuestMemoryMmap,
    gate: &Arc<Gate>,
) -> (MmioTransport, Arc<BlockStats>) {
    let image = block::raw::RawImage::open(path, false).unwrap();
    let engine = GatedEngine {
        gate: gate.clone(),
        ops: Vec::new(),
    };
    let block = Block::with_io_engine(
        Box::new(image),
        BlockConfig {
            num_queues: queues,
            ..block_config()
        },
        None,
        Box::new(engine),
    )
    .unwrap();
    let stats = block.stats();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (
        MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap(),
        stats,
    )
}

fn gated_vm(queues: u16, gate: &Arc<Gate>) -> GatedVm {
    let dir = TempDir::new("pause-in-flight");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x22u8; 1 << 20]).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (t, stats) = gated_transport(&p, queues, &mem, gate);
    GatedVm { mem, t, stats, dir }
}

/// Negotiates FEATURES (plus MQ when the device has several queues) and makes `rings`
/// queues 0, 1, ... ready.
fn init(t: &mut MmioTransport, mem: &GuestMemoryMmap, rings: &[Ring]) {
    w(t, 0x70, 0);
    w(t, 0x70, 1);
    w(t, 0x70, 1 | 2);
    w(t, 0x14, 0);
    let f0 = u64::from(r(t, 0x10));
    let accept = (FEATURES | (1 << 12)) & (f0 | (1 << 32));
    w(t, 0x24, 0);
    w(t, 0x20, accept as u32);
    w(t, 0x24, 1);
    w(t, 0x20, (accept >> 32) as u32);
    w(t, 0x70, 1 | 2 | 8);
    for (i, ring) in (0u32..).zip(rings) {
        ring.clear(mem);
        setup_queue_at(t, i, ring);
    }
    w(t, 0x70, 1 | 2 | 8 | 4);
    assert_eq!(r(t, 0x70) & 0x40, 0, "no NEEDS_RESET");
}

/// A 4 KiB write of `slot`'s byte at sector `slot * 8`, with descriptors from `3 * desc`
/// of `ring`; returns its head.
fn queue_write(mem: &GuestMemoryMmap, ring: &Ring, desc: u16, slot: u16) -> u16 {
    fill(mem, DATA + 0x1_0000 * u64::from(slot), 4096, byte_of(slot));
    queue_request(mem, ring, desc, slot, T_OUT, u64::from(slot) * 8, 4096)
}

fn byte_of(slot: u16) -> u8 {
    0x40 + slot as u8
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Pauses `t` on another thread while the gate is closed: checks the pause has not returned
/// and nothing was answered while the requests are held, then opens the gate.
fn pause_across_the_gate(
    t: &mut MmioTransport,
    gate: &Gate,
    mem: &GuestMemoryMmap,
    rings: &[Ring],
) -> TransportState {
    let returned = AtomicBool::new(false);
    std::thread::scope(|s| {
        let r = &returned;
        let h = s.spawn(move || {
            let st = t.pause();
            r.store(true, Ordering::SeqCst);
            st
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !returned.load(Ordering::SeqCst),
            "paused while requests were in flight"
        );
        for ring in rings {
            assert_eq!(ring.used_idx(mem), 0, "answered before their I/O ended");
        }
        gate.open();
        h.join().unwrap().unwrap()
    })
}

/// The used ring's first `n` entries, as (head, length).
fn used_entries(mem: &GuestMemoryMmap, ring: &Ring, n: u16) -> Vec<(u32, u32)> {
    (0..n).map(|i| ring.used_elem(mem, i)).collect()
}

#[test]
fn a_pause_waits_for_requests_in_flight_and_a_restore_goes_on_after_them() {
    const N: u16 = 32;
    let gate = Gate::new(false);
    let mut vm = gated_vm(1, &gate);
    let ring = Ring::at(0x1000, 128);
    init(&mut vm.t, &vm.mem, &[ring]);
    let mut heads = BTreeSet::new();
    for slot in 0..N {
        heads.insert(u32::from(queue_write(&vm.mem, &ring, slot, slot)));
    }
    w(&mut vm.t, 0x50, 0);
    wait_for("every request taken and in flight", || {
        vm.stats.in_flight.load(Ordering::SeqCst) == u64::from(N)
    });

    let st = pause_across_the_gate(&mut vm.t, &gate, &vm.mem, &[ring]);
    // Every request taken was answered, once, before the device said paused.
    assert_eq!(ring.used_idx(&vm.mem), N);
    assert_eq!(st.progress.len(), 1);
    assert_eq!(st.progress[0].next_avail, N);
    assert_eq!(st.progress[0].next_used, N);
    let answered = used_entries(&vm.mem, &ring, N);
    let answered_heads: BTreeSet<u32> = answered.iter().map(|e| e.0).collect();
    assert_eq!(answered_heads, heads, "each request answered exactly once");
    for slot in 0..N {
        assert_eq!(status_at(&vm.mem, STATUS + u64::from(slot)), 0);
    }
    assert_eq!(vm.stats.in_flight.load(Ordering::SeqCst), 0);

    // The original goes away with nothing new queued: it answers nothing more.
    vm.t.resume();
    vm.t.shutdown();
    assert_eq!(ring.used_idx(&vm.mem), N);

    // A clone of the device on the same memory and image, restored from the state.
    let disk = vm.dir.join("disk.raw");
    let (mut t2, _) = gated_transport(&disk, 1, &vm.mem, &Gate::new(true));
    t2.restore(&st).unwrap();
    let more: Vec<u32> = (N..N + 8)
        .map(|slot| u32::from(queue_write(&vm.mem, &ring, slot, slot)))
        .collect();
    w(&mut t2, 0x50, 0);
    wait_for("the writes after the restore", || {
        ring.used_idx(&vm.mem) == N + 8
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.used_idx(&vm.mem), N + 8, "nothing answered twice");
    assert_eq!(
        used_entries(&vm.mem, &ring, N),
        answered,
        "the entries of the answered requests stay"
    );
    let new_heads: BTreeSet<u32> = (N..N + 8).map(|i| ring.used_elem(&vm.mem, i).0).collect();
    assert_eq!(new_heads, more.into_iter().collect::<BTreeSet<u32>>());
    for slot in 0..N + 8 {
        assert_eq!(status_at(&vm.mem, STATUS + u64::from(slot)), 0);
        assert_eq!(
            disk_bytes(&disk, u64::from(slot) * 8 * 512, 4096),
            vec![byte_of(slot); 4096],
            "slot {slot}'s data"
        );
    }
    t2.shutdown();
}

#[test]
fn a_multi_queue_pause_drains_and_saves_every_queue_the_driver_uses() {
    // Four queues offered, two used by the driver (as Linux does with fewer vCPUs).
    let gate = Gate::new(false);
    let mut vm = gated_vm(4, &gate);
    let rings = [Ring::at(0x1000, 128), Ring::at(0x8000, 128)];
    init(&mut vm.t, &vm.mem, &rings);
    // Eight writes on each queue (slots 0-7 on queue 0, 8-15 on queue 1).
    for slot in 0..16u16 {
        let (ring, desc) = if slot < 8 {
            (&rings[0], slot)
        } else {
            (&rings[1], slot - 8)
        };
        queue_write(&vm.mem, ring, desc, slot);
    }
    w(&mut vm.t, 0x50, 0);
    w(&mut vm.t, 0x50, 1);
    wait_for("every request of both queues in flight", || {
        vm.stats.in_flight.load(Ordering::SeqCst) == 16
    });

    let st = pause_across_the_gate(&mut vm.t, &gate, &vm.mem, &rings);
    assert_eq!(st.progress.len(), 4, "one position per transport queue");
    for (q, ring) in rings.iter().enumerate() {
        assert_eq!(ring.used_idx(&vm.mem), 8, "queue {q} answered");
        assert_eq!(st.progress[q].next_avail, 8, "queue {q}");
        assert_eq!(st.progress[q].next_used, 8, "queue {q}");
    }
    assert_eq!(st.progress[2], Default::default());
    assert_eq!(st.progress[3], Default::default());
    for slot in 0..16u16 {
        assert_eq!(status_at(&vm.mem, STATUS + u64::from(slot)), 0);
    }
    vm.t.resume();
    vm.t.shutdown();

    let disk = vm.dir.join("disk.raw");
    let (mut t2, _) = gated_transport(&disk, 4, &vm.mem, &Gate::new(true));
    t2.restore(&st).unwrap();
    // Two more on queue 1, one more on queue 0: each answered on its own queue, after the
    // positions saved.
    let h1: BTreeSet<u32> = [(8u16, 16u16), (9, 17)]
        .iter()
        .map(|&(desc, slot)| u32::from(queue_write(&vm.mem, &rings[1], desc, slot)))
        .collect();
    let h0 = u32::from(queue_write(&vm.mem, &rings[0], 8, 18));
    w(&mut t2, 0x50, 1);
    w(&mut t2, 0x50, 0);
    wait_for("the writes after the restore", || {
        rings[1].used_idx(&vm.mem) == 10 && rings[0].used_idx(&vm.mem) == 9
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rings[1].used_idx(&vm.mem), 10, "nothing answered twice");
    assert_eq!(rings[0].used_idx(&vm.mem), 9, "nothing answered twice");
    let got1: BTreeSet<u32> = (8..10).map(|i| rings[1].used_elem(&vm.mem, i).0).collect();
    assert_eq!(got1, h1);
    assert_eq!(rings[0].used_elem(&vm.mem, 8).0, h0);
    for slot in 0..19u16 {
        assert_eq!(status_at(&vm.mem, STATUS + u64::from(slot)), 0);
        assert_eq!(
            disk_bytes(&disk, u64::from(slot) * 8 * 512, 4096),
            vec![byte_of(slot); 4096],
            "slot {slot}'s data"
        );
    }
    t2.shutdown();
}
