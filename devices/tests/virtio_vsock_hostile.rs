//! virtio-vsock against a hostile driver: broken transmit chains and receive buffers, packets
//! for other CIDs, unknown connections and operations, floods while the driver gives no
//! receive buffers, the connection limit. After each, the device still works, answers what
//! it must, and holds bounded state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod vsock_support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::{F_INDIRECT, F_NEXT, F_WRITE, TABLES};
use devices::virtio::vsock::header::{Header, Op, MAX_PKT_LEN};
use devices::virtio::vsock::muxer::{MAX_CONNECTIONS, MAX_RST_REPLIES};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vsock_support::*;

const REQUEST: u16 = Op::Request as u16;
const RW: u16 = Op::Rw as u16;

/// The device still connects and carries data (a fresh guest port each time).
fn still_works(vm: &mut VsockVm, l: &UnixListener, gport: u32, port: u32) {
    vm.send(gh(gport, port, REQUEST, 0), &[]);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Response), "{h:?}");
    let (mut s, _) = l.accept().unwrap();
    vm.send(gh(gport, port, RW, 3), b"abc");
    let mut b = [0u8; 3];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
}

const HDR_AT: u64 = 0x30_0000;

fn put_header(vm: &VsockVm, h: Header) {
    vm.mem
        .write_slice(h.as_slice(), GuestAddress(HDR_AT))
        .unwrap();
}

#[test]
fn broken_transmit_chains_are_dropped_and_the_device_goes_on() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(90)).unwrap();
    // Header shorter than 44 bytes.
    put_header(&vm, gh(1, 90, REQUEST, 0));
    vm.raw_desc(0, HDR_AT, 43, 0, 0);
    vm.send_head(0);
    // Length beyond what the chain carries, and beyond 64 KiB.
    put_header(&vm, gh(1, 90, RW, 100));
    vm.raw_desc(0, HDR_AT, 44 + 50, 0, 0);
    vm.send_head(0);
    put_header(&vm, gh(1, 90, RW, MAX_PKT_LEN + 1));
    vm.raw_desc(0, HDR_AT, 44, F_NEXT, 1);
    vm.raw_desc(1, 0x10_0000, MAX_PKT_LEN + 1, 0, 0);
    vm.send_head(0);
    // A buffer outside guest RAM, and one wrapping around the address space.
    put_header(&vm, gh(1, 90, RW, 10));
    vm.raw_desc(0, HDR_AT, 44, F_NEXT, 1);
    vm.raw_desc(1, 0x4000_0000, 10, 0, 0);
    vm.send_head(0);
    vm.raw_desc(1, u64::MAX - 4, 10, 0, 0);
    vm.send_head(0);
    // A device-writable buffer in a transmit chain.
    vm.raw_desc(0, HDR_AT, 44, F_WRITE, 0);
    vm.send_head(0);
    // A descriptor loop.
    vm.raw_desc(0, HDR_AT, 44, F_NEXT, 1);
    vm.raw_desc(1, HDR_AT, 4, F_NEXT, 0);
    vm.send_head(0);
    // An indirect table of 65535 entries, each 1 byte: far more than a chain may have.
    for i in 0..65535u64 {
        common::write_desc(&vm.mem, TABLES + 16 * i, HDR_AT, 1, F_NEXT, (i + 1) as u16);
    }
    vm.raw_desc(0, TABLES, 65535 * 16, F_INDIRECT, 0);
    vm.send_head(0);
    // None of them was answered (no connection exists, nothing to reset).
    assert!(vm.nothing_within(Duration::from_millis(200)));
    still_works(&mut vm, &l, 2, 90);
}

#[test]
fn broken_receive_buffers_are_returned_empty_and_good_ones_used() {
    let mut vm = vm_without_rx_buffers();
    // A device-readable buffer, one too short for a header and a byte, one outside RAM.
    let base = 200u16;
    vm.rx.set_desc(&vm.mem, base, 0x70_0000, 4096, 0, 0);
    vm.rx.set_desc(&vm.mem, base + 1, 0x70_0000, 44, F_WRITE, 0);
    vm.rx
        .set_desc(&vm.mem, base + 2, 0x4000_0000, 4096, F_WRITE, 0);
    for i in 0..3 {
        vm.rx.publish(&vm.mem, base + i);
    }
    // Something is owed to the guest: a reset for an unknown connection.
    vm.send(gh(5, 6, RW, 1), b"x");
    vm.kick(0);
    // The three bad buffers come back with length 0 ...
    let t0 = std::time::Instant::now();
    while vm.rx.used_idx(&vm.mem) != 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "bad buffers not returned"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 0..3u16 {
        assert_eq!(vm.rx.used_elem(&vm.mem, i), (u32::from(base + i), 0));
    }
    // ... and the reset lands in the first good one.
    vm.rx
        .set_desc(&vm.mem, base + 3, 0x70_0000, 44 + 8, F_WRITE, 0);
    vm.rx.publish(&vm.mem, base + 3);
    vm.kick(0);
    while vm.rx.used_idx(&vm.mem) != 4 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no reset");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(vm.rx.used_elem(&vm.mem, 3), (u32::from(base + 3), 44));
    let h: Header = vm.mem.read_obj(GuestAddress(0x70_0000)).unwrap();
    assert_eq!(h.op(), Some(Op::Rst));
    assert_eq!((h.src_port(), h.dst_port()), (6, 5));
}

#[test]
fn strangers_wrong_types_and_unknown_connections() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(91)).unwrap();
    // Another guest's CID, or not addressed to the host: dropped without a word.
    vm.send(
        Header::from_guest(GUEST_CID + 1, 1, 91, REQUEST, 0, 0, 4096, 0),
        &[],
    );
    let mut to_other = gh(1, 91, REQUEST, 0);
    to_other.as_mut_slice()[8..16].copy_from_slice(&7u64.to_le_bytes());
    vm.send(to_other, &[]);
    assert!(vm.nothing_within(Duration::from_millis(100)));
    // Not a stream (SEQPACKET = 2 was not offered): reset.
    vm.send(gh(1, 91, REQUEST, 0).with_type(2), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Rst));
    // Data, shutdown, credit packets for no connection: reset; a reset for none: nothing.
    for op in [
        Op::Rw,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
        Op::Response,
    ] {
        vm.send(gh(1, 91, op as u16, 0), &[]);
        assert_eq!(vm.recv().0.op(), Some(Op::Rst), "{op:?}");
    }
    vm.send(gh(1, 91, Op::Rst as u16, 0), &[]);
    assert!(vm.nothing_within(Duration::from_millis(100)));
    // An unknown operation on a live connection: the connection is reset, the host stream
    // closed.
    vm.send(gh(7, 91, REQUEST, 0), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Response));
    let (mut s, _) = l.accept().unwrap();
    vm.send(gh(7, 91, 99, 0), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Rst));
    assert!(closed(&mut s));
    // A second request for a live connection resets it too.
    vm.send(gh(8, 91, REQUEST, 0), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Response));
    let (mut s, _) = l.accept().unwrap();
    vm.send(gh(8, 91, REQUEST, 0), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Rst));
    assert!(closed(&mut s));
    still_works(&mut vm, &l, 9, 91);
}

#[test]
fn data_before_the_guest_accepted_resets_the_connection() {
    let mut vm = vm();
    let mut host = vm.host_connect(12);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Request));
    vm.send(gh(12, h.src_port(), RW, 2), b"no");
    assert_eq!(vm.recv().0.op(), Some(Op::Rst));
    assert!(closed(&mut host));
}

#[test]
fn a_flood_without_receive_buffers_queues_a_bounded_number_of_resets() {
    let mut vm = vm_without_rx_buffers();
    for i in 0..2000u32 {
        vm.send(gh(100_000 + i, 7, RW, 1), b"z");
    }
    vm.post_rx_buffers();
    let mut n = 0;
    while let Some((h, _)) = vm.recv_within(Duration::from_millis(300)) {
        assert_eq!(h.op(), Some(Op::Rst));
        n += 1;
    }
    assert_eq!(n, MAX_RST_REPLIES);
}

#[test]
fn the_connection_limit_holds_and_frees_up() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(92)).unwrap();
    l.set_nonblocking(true).unwrap();
    let mut hosts = Vec::new();
    for g in 0..MAX_CONNECTIONS as u32 {
        vm.send(gh(20_000 + g, 92, REQUEST, 0), &[]);
        assert_eq!(vm.recv().0.op(), Some(Op::Response), "connection {g}");
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    hosts.push(s);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    }
    // One more is refused ...
    vm.send(gh(30_000, 92, REQUEST, 0), &[]);
    assert_eq!(vm.recv().0.op(), Some(Op::Rst));
    // ... and a host connection too.
    let mut extra = UnixStream::connect(&vm.uds).unwrap();
    let _ = extra.write_all(b"CONNECT 1\n");
    assert!(closed(&mut extra));
    // Closing one frees a place.
    vm.send(gh(20_000, 92, Op::Rst as u16, 0), &[]);
    std::thread::sleep(Duration::from_millis(50));
    l.set_nonblocking(false).unwrap();
    still_works(&mut vm, &l, 30_001, 92);
}

#[test]
fn a_host_that_never_sends_its_connect_line_is_dropped() {
    let vm = vm();
    let mut idle = UnixStream::connect(&vm.uds).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 1];
    let r = idle.read(&mut b);
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "dropped too early");
}
