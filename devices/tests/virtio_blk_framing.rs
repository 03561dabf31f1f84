//! virtio-blk message framing (virtio 1.2 §2.7.4, "any layout"): a request is a byte stream,
//! header first, status last, however the driver spreads it over descriptors. Each layout
//! here is legal and must do exactly what a one-buffer-per-part layout does; requests whose
//! bytes do not fit their type are answered IOERR, never OK.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);

/// A VM with a 1 MiB raw disk of 0x22 and a 16-entry ring, driver initialised.
fn vm() -> (Vm, Ring) {
    let mut vm = raw_vm(1 << 20);
    let ring = Ring::at(0x1000, 16);
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    (vm, ring)
}

/// Submits `bufs` as one direct chain and waits for it; returns the used length.
fn submit(vm: &mut Vm, ring: &Ring, bufs: &[(u64, u32, bool)]) -> u32 {
    let n = ring.used_idx(&vm.mem);
    write_chain(&vm.mem, ring, 0, bufs);
    ring.publish(&vm.mem, 0);
    kick(vm);
    assert!(
        ring.wait_used(&vm.mem, n.wrapping_add(1), WAIT),
        "not answered"
    );
    ring.used_elem(&vm.mem, n).1
}

fn disk(vm: &Vm, off: u64, len: usize) -> Vec<u8> {
    disk_bytes(&vm.dir.join("disk.raw"), off, len)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_write_with_header_and_data_in_one_descriptor_writes_its_data() {
    let (mut vm, ring) = vm();
    // [header + 1024 bytes of data] [status]
    header(&vm.mem, HDR, T_OUT, 2);
    let data = pattern(1024, 7);
    vm.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    fill(&vm.mem, STATUS, 1, 0xff);
    let used = submit(
        &mut vm,
        &ring,
        &[(HDR, 16 + 1024, false), (STATUS, 1, true)],
    );
    assert_eq!((status_at(&vm.mem, STATUS), used), (0, 1));
    assert_eq!(disk(&vm, 1024, 1024), data, "the data reached the disk");
    assert_eq!(disk(&vm, 2048, 512), vec![0x22; 512], "and nothing more");
}

#[test]
fn a_read_with_data_and_status_in_one_descriptor_reads_its_data() {
    let (mut vm, ring) = vm();
    let data = pattern(512, 3);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(vm.dir.join("disk.raw"))
            .unwrap();
        f.write_all_at(&data, 5 * 512).unwrap();
    }
    header(&vm.mem, HDR, T_IN, 5);
    fill(&vm.mem, DATA, 513, 0xee);
    let used = submit(&mut vm, &ring, &[(HDR, 16, false), (DATA, 513, true)]);
    assert_eq!(read_mem(&vm.mem, DATA, 512), data, "the data was read");
    assert_eq!(status_at(&vm.mem, DATA + 512), 0, "status in the last byte");
    assert_eq!(used, 513);
}

#[test]
fn a_header_split_over_descriptors_and_data_split_unevenly_work() {
    let (mut vm, ring) = vm();
    // Write: header in 10 + 6 bytes (the 6 followed by the first 100 data bytes in the same
    // buffer), then the other 924 data bytes, then the status.
    let data = pattern(1024, 11);
    header(&vm.mem, HDR + 0x100, T_OUT, 8);
    let mut h = [0u8; 16];
    vm.mem
        .read_slice(&mut h, GuestAddress(HDR + 0x100))
        .unwrap();
    vm.mem.write_slice(&h[..10], GuestAddress(HDR)).unwrap();
    vm.mem.write_slice(&h[10..], GuestAddress(DATA)).unwrap();
    vm.mem
        .write_slice(&data[..100], GuestAddress(DATA + 6))
        .unwrap();
    vm.mem
        .write_slice(&data[100..], GuestAddress(DATA + 0x1000))
        .unwrap();
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[
            (HDR, 10, false),
            (DATA, 106, false),
            (DATA + 0x1000, 924, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 0);
    assert!(
        disk(&vm, 8 * 512, 1024) == data,
        "written through the split layout"
    );
    // Read it back: header in 8 two-byte buffers, data in 300 + the rest with the status.
    header(&vm.mem, HDR + 0x100, T_IN, 8);
    let mut bufs: Vec<(u64, u32, bool)> = (0..8).map(|i| (HDR + 0x100 + 2 * i, 2, false)).collect();
    bufs.push((DATA + 0x4000, 300, true));
    bufs.push((DATA + 0x8000, 724 + 1, true));
    fill(&vm.mem, DATA + 0x8000, 725, 0xff);
    let used = submit(&mut vm, &ring, &bufs);
    let mut back = read_mem(&vm.mem, DATA + 0x4000, 300);
    back.extend(read_mem(&vm.mem, DATA + 0x8000, 724));
    assert!(back == data, "read back through the split layout");
    assert_eq!(status_at(&vm.mem, DATA + 0x8000 + 724), 0);
    assert_eq!(used, 1025);
}

#[test]
fn get_id_and_discard_work_in_any_layout() {
    let (mut vm, ring) = vm();
    // GET_ID: the 20-byte buffer and the status in one 21-byte buffer.
    header(&vm.mem, HDR, T_GET_ID, 0);
    fill(&vm.mem, DATA, 21, 0xff);
    let used = submit(&mut vm, &ring, &[(HDR, 16, false), (DATA, 21, true)]);
    assert_eq!(&read_mem(&vm.mem, DATA, 11), b"test-serial");
    assert_eq!((status_at(&vm.mem, DATA + 20), used), (0, 21));
    // Discard: header and two segments in one buffer (sectors 0-7 and 16-23); with
    // discard=unmap a raw disk punches the range, which then reads zeros.
    header(&vm.mem, HDR, T_DISCARD, 0);
    segment(&vm.mem, HDR + 16, 0, 8, 0);
    segment(&vm.mem, HDR + 32, 16, 8, 0);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(&mut vm, &ring, &[(HDR, 48, false), (STATUS, 1, true)]);
    assert_eq!(status_at(&vm.mem, STATUS), 0);
    assert_eq!(disk(&vm, 0, 4096), vec![0; 4096]);
    assert_eq!(disk(&vm, 4096, 4096), vec![0x22; 4096]);
    assert_eq!(disk(&vm, 8192, 4096), vec![0; 4096]);
    assert_eq!(vm.stats.snapshot().discards, 2);
}

#[test]
fn a_discard_with_the_unmap_flag_is_accepted_as_qemu_does() {
    let (mut vm, ring) = vm();
    header(&vm.mem, HDR, T_DISCARD, 0);
    segment(&vm.mem, DATA, 8, 8, 1);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 0, "OK, not UNSUPP");
    assert_eq!(disk(&vm, 4096, 4096), vec![0; 4096], "discarded");
    // Other flag bits stay reserved.
    segment(&vm.mem, DATA, 8, 8, 2);
    submit(
        &mut vm,
        &ring,
        &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 2, "UNSUPP");
}

#[test]
fn zero_length_descriptors_carry_nothing() {
    let (mut vm, ring) = vm();
    let data = pattern(1024, 5);
    vm.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    header(&vm.mem, HDR, T_OUT, 0);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[
            (HDR, 16, false),
            (0x7fff_0000_0000, 0, false),
            (DATA, 512, false),
            (DATA, 0, false),
            (DATA + 512, 512, false),
            (STATUS, 1, true),
            (0, 0, true),
        ],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 0);
    assert_eq!(disk(&vm, 0, 1024), data);
}

#[test]
fn bytes_that_do_not_fit_the_request_type_get_ioerr_not_ok() {
    let (mut vm, ring) = vm();
    // A read whose header buffer carries 16 more device-readable bytes.
    header(&vm.mem, HDR, T_IN, 0);
    fill(&vm.mem, DATA, 512, 0xee);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[(HDR, 32, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 1, "read with readable data");
    assert_eq!(
        read_mem(&vm.mem, DATA, 512),
        vec![0xee; 512],
        "nothing read"
    );
    // A write with a device-writable byte before the status.
    header(&vm.mem, HDR, T_OUT, 0);
    fill(&vm.mem, DATA, 512, 0x77);
    fill(&vm.mem, STATUS, 2, 0xff);
    submit(
        &mut vm,
        &ring,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 2, true)],
    );
    assert_eq!(
        status_at(&vm.mem, STATUS + 1),
        1,
        "write with writable data"
    );
    assert_eq!(disk(&vm, 0, 512), vec![0x22; 512], "nothing written");
    // A device-readable buffer after a device-writable one.
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[
            (HDR, 16, false),
            (DATA + 0x1000, 1, true),
            (DATA, 512, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 1, "readable after writable");
    assert_eq!(disk(&vm, 0, 512), vec![0x22; 512], "nothing written");
    // A header shorter than 16 bytes in total.
    header(&vm.mem, HDR, T_FLUSH, 0);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[(HDR, 8, false), (HDR + 8, 4, false), (STATUS, 1, true)],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 1, "short header");
    // No device-writable byte at all: nothing to answer in, the chain comes back with 0.
    assert_eq!(submit(&mut vm, &ring, &[(HDR, 16, false)]), 0);
    // A write-type request through a buffer wrapping around the address space.
    header(&vm.mem, HDR, T_OUT, 0);
    fill(&vm.mem, STATUS, 1, 0xff);
    submit(
        &mut vm,
        &ring,
        &[
            (HDR, 16, false),
            (u64::MAX - 255, 512, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(status_at(&vm.mem, STATUS), 1, "wrapping buffer");
    let s = vm.stats.snapshot();
    assert_eq!((s.errors, s.dropped, s.writes, s.reads), (5, 1, 0, 0));
}
