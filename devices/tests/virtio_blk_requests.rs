//! virtio-blk requests of every type through the device as a guest sends them: scattered
//! and overlapping buffers, discard and write-zeroes (with discard=unmap and =ignore), a
//! read-only disk, and the status each hostile request gets (IOERR, UNSUPP, or no answer).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use block::raw::RawImage;
use common::*;
use devices::virtio::block::BlockConfig;
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

fn vm_cfg(cfg: BlockConfig) -> (Vm, Ring) {
    let dir = TempDir::new("req");
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x11u8; 1 << 20]).unwrap();
    let image = RawImage::open(&p, cfg.read_only).unwrap();
    let mut vm = vm_with(Box::new(image), cfg, dir);
    let ring = Ring::at(0x1000, 16);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    (vm, ring)
}

fn vm() -> (Vm, Ring) {
    vm_cfg(block_config())
}

/// Header of `kind` at `sector`, then `data`, then the status: submitted, waited for;
/// returns (status, used length).
fn run(vm: &mut Vm, ring: &Ring, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
    header(&vm.mem, HDR, kind, sector);
    fill(&vm.mem, STATUS, 1, 0xff);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend_from_slice(data);
    bufs.push((STATUS, 1, true));
    let n = ring.used_idx(&vm.mem);
    write_chain(&vm.mem, ring, 0, &bufs);
    ring.publish(&vm.mem, 0);
    kick(vm);
    assert!(
        ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT),
        "not answered"
    );
    (status_at(&vm.mem, STATUS), ring.used_elem(&vm.mem, n).1)
}

fn disk(vm: &Vm, off: u64, len: usize) -> Vec<u8> {
    disk_bytes(&vm.dir.join("disk.raw"), off, len)
}

#[test]
fn scattered_segments_gather_and_scatter_in_order() {
    let (mut vm, ring) = vm();
    // 12 KiB of distinct bytes written through five segments of uneven sizes placed out of
    // order in guest memory.
    let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let segs = [
        (0x3000u64, 512u32),
        (0x0, 1536),
        (0x8000, 4096),
        (0x5000, 2048),
        (0x1000, 4096),
    ];
    let mut at = 0usize;
    let mut bufs = Vec::new();
    for &(off, len) in &segs {
        vm.mem
            .write_slice(&data[at..at + len as usize], GuestAddress(DATA + off))
            .unwrap();
        bufs.push((DATA + off, len, false));
        at += len as usize;
    }
    assert_eq!(run(&mut vm, &ring, T_OUT, 3, &bufs), (0, 1));
    assert!(
        disk(&vm, 3 * 512, 12288) == data,
        "written in segment order"
    );
    // Read it back through a different split, with one sector before and after.
    let reads = [
        (0x20000u64, 1024u32),
        (0x10000, 4096),
        (0x18000, 512),
        (0x30000, 7680),
    ];
    let bufs: Vec<_> = reads.iter().map(|&(o, l)| (DATA + o, l, true)).collect();
    assert_eq!(run(&mut vm, &ring, T_IN, 2, &bufs), (0, 13313));
    let mut back = Vec::new();
    for &(o, l) in &reads {
        back.extend(read_mem(&vm.mem, DATA + o, l as usize));
    }
    assert_eq!(&back[..512], &[0x11u8; 512][..]);
    assert!(back[512..12800] == data[..], "read in segment order");
    assert_eq!(&back[12800..], &[0x11u8; 512][..]);
}

#[test]
fn reads_into_overlapping_segments_land_in_segment_order() {
    let (mut vm, ring) = vm();
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 13 + i / 256) as u8).collect();
    vm.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(run(&mut vm, &ring, T_OUT, 8, &[(DATA, 2048, false)]).0, 0);
    // Two segments sharing 512 bytes of guest memory (no driver does this; a hostile one
    // may): the request still reads as if the segments were filled one after the other.
    let bufs = [(DATA + 0x4_0000, 1024, true), (DATA + 0x4_0200, 1024, true)];
    assert_eq!(run(&mut vm, &ring, T_IN, 8, &bufs), (0, 2049));
    let back = read_mem(&vm.mem, DATA + 0x4_0000, 1536);
    assert_eq!(&back[..512], &data[..512]);
    assert!(back[512..] == data[1024..2048]);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let (mut vm, ring) = vm();
    assert_eq!(run(&mut vm, &ring, T_FLUSH, 0, &[]), (0, 1));
    assert_eq!(
        run(&mut vm, &ring, T_GET_ID, 0, &[(DATA, 20, true)]),
        (0, 21)
    );
    assert_eq!(&read_mem(&vm.mem, DATA, 11), b"test-serial");
    // A shorter GET_ID buffer gets what fits.
    assert_eq!(run(&mut vm, &ring, T_GET_ID, 0, &[(DATA, 4, true)]), (0, 5));
    segment(&vm.mem, DATA, 0, 8, 0);
    segment(&vm.mem, DATA + 16, 16, 8, 0);
    assert_eq!(run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 32, false)]).0, 0);
    segment(&vm.mem, DATA, 32, 8, 1);
    assert_eq!(
        run(&mut vm, &ring, T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
        0
    );
    let d = disk(&vm, 0, 40 * 512);
    assert!(d[..8 * 512].iter().all(|&x| x == 0), "discarded");
    assert!(d[8 * 512..16 * 512].iter().all(|&x| x == 0x11), "untouched");
    assert!(d[32 * 512..].iter().all(|&x| x == 0), "write-zeroes");
    let s = vm.stats.snapshot();
    assert_eq!(
        (
            s.flushes,
            s.get_ids,
            s.discards,
            s.discard_bytes,
            s.write_zeroes
        ),
        (1, 2, 2, 16 * 512, 1)
    );
}

#[test]
fn discard_ignore_leaves_the_data() {
    let (mut vm, ring) = vm_cfg(BlockConfig {
        discard_unmap: false,
        ..block_config()
    });
    segment(&vm.mem, DATA, 0, 8, 0);
    assert_eq!(run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 16, false)]).0, 0);
    assert_eq!(disk(&vm, 0, 4096), vec![0x11; 4096]);
}

#[test]
fn hostile_requests_get_the_right_status() {
    let (mut vm, ring) = vm();
    let cap = 2048u64;
    // Beyond the capacity, sector numbers that overflow, lengths not a multiple of 512.
    assert_eq!(
        run(&mut vm, &ring, T_IN, cap - 1, &[(DATA, 1024, true)]),
        (IOERR, 1)
    );
    assert_eq!(
        run(&mut vm, &ring, T_OUT, u64::MAX - 1, &[(DATA, 1024, false)]).0,
        IOERR
    );
    assert_eq!(
        run(&mut vm, &ring, T_OUT, 0, &[(DATA, 100, false)]).0,
        IOERR
    );
    // Wrong directions.
    assert_eq!(run(&mut vm, &ring, T_IN, 0, &[(DATA, 512, false)]).0, IOERR);
    assert_eq!(run(&mut vm, &ring, T_OUT, 0, &[(DATA, 512, true)]).0, IOERR);
    assert_eq!(
        run(&mut vm, &ring, T_GET_ID, 0, &[(DATA, 20, false)]).0,
        IOERR
    );
    // Buffers outside guest RAM.
    let end = MEM_SIZE as u64;
    assert_eq!(
        run(&mut vm, &ring, T_IN, 0, &[(end - 256, 512, true)]).0,
        IOERR
    );
    assert_eq!(
        run(&mut vm, &ring, T_OUT, 0, &[(1 << 40, 512, false)]).0,
        IOERR
    );
    // Unknown types; discard / write-zeroes segment problems.
    assert_eq!(run(&mut vm, &ring, 42, 0, &[]).0, UNSUPP);
    assert_eq!(run(&mut vm, &ring, 14, 0, &[]).0, UNSUPP, "secure erase");
    segment(&vm.mem, DATA, 0, 8, 4);
    assert_eq!(
        run(&mut vm, &ring, T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
        UNSUPP
    );
    segment(&vm.mem, DATA, cap - 8, 16, 0);
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 16, false)]).0,
        IOERR,
        "beyond"
    );
    segment(&vm.mem, DATA, 0, (1 << 21) + 1, 0);
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 16, false)]).0,
        IOERR,
        "too long"
    );
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 33 * 16, false)]).0,
        IOERR,
        "too many segments"
    );
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 20, false)]).0,
        IOERR,
        "partial"
    );
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[]).0,
        IOERR,
        "no segment"
    );
    // A header that is device-writable: no readable header at all.
    fill(&vm.mem, STATUS, 1, 0xff);
    let n = ring.used_idx(&vm.mem);
    write_chain(&vm.mem, &ring, 0, &[(HDR, 16, true), (STATUS, 1, true)]);
    ring.publish(&vm.mem, 0);
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT));
    assert_eq!(status_at(&vm.mem, STATUS), IOERR, "writable header");
    // Unanswerable chains come back with length 0: a read-only status, a status outside
    // RAM, a loop.
    for bufs in [
        vec![(HDR, 16, false), (STATUS, 1, false)],
        vec![(HDR, 16, false), (end + 10, 1, true)],
    ] {
        let n = ring.used_idx(&vm.mem);
        write_chain(&vm.mem, &ring, 0, &bufs);
        ring.publish(&vm.mem, 0);
        kick(&mut vm);
        assert!(ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT));
        assert_eq!(ring.used_elem(&vm.mem, n).1, 0, "{bufs:?}");
    }
    let n = ring.used_idx(&vm.mem);
    ring.set_desc(&vm.mem, 0, HDR, 16, F_NEXT, 1);
    ring.set_desc(&vm.mem, 1, DATA, 512, F_NEXT | F_WRITE, 0);
    ring.publish(&vm.mem, 0);
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT));
    assert_eq!(ring.used_elem(&vm.mem, n).1, 0, "loop");
    assert_eq!(disk(&vm, 0, 4096), vec![0x11; 4096], "nothing written");
}

#[test]
fn a_read_only_disk_refuses_write_types() {
    let (mut vm, ring) = vm_cfg(BlockConfig {
        read_only: true,
        ..block_config()
    });
    w(&mut vm.t, 0x14, 0);
    assert_eq!(
        r(&mut vm.t, 0x10) & (1 << 5),
        1 << 5,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(
        run(&mut vm, &ring, T_OUT, 0, &[(DATA, 512, false)]).0,
        IOERR
    );
    segment(&vm.mem, DATA, 0, 8, 0);
    assert_eq!(
        run(&mut vm, &ring, T_DISCARD, 0, &[(DATA, 16, false)]).0,
        IOERR
    );
    assert_eq!(
        run(&mut vm, &ring, T_WRITE_ZEROES, 0, &[(DATA, 16, false)]).0,
        IOERR
    );
    assert_eq!(run(&mut vm, &ring, T_IN, 0, &[(DATA, 512, true)]), (0, 513));
    assert_eq!(run(&mut vm, &ring, T_FLUSH, 0, &[]).0, 0);
    assert_eq!(disk(&vm, 0, 4096), vec![0x11; 4096]);
}
