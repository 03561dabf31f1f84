//! virtio-vsock through the MMIO transport with a test driver (tests/vsock_support): both
//! connection directions of Firecracker's host side, data both ways, credit-based flow
//! control, shutdown and reset, many connections at once, device reset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod vsock_support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use devices::virtio::vsock::connection::CONN_BUF;
use devices::virtio::vsock::header::{Header, Op, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use vm_memory::Bytes;
use vsock_support::*;

const REQUEST: u16 = Op::Request as u16;
const RESPONSE: u16 = Op::Response as u16;
const RST: u16 = Op::Rst as u16;
const SHUTDOWN: u16 = Op::Shutdown as u16;
const RW: u16 = Op::Rw as u16;
const CREDIT_UPDATE: u16 = Op::CreditUpdate as u16;

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut b).unwrap();
    b
}

/// The guest connects to host port `port` (a listener at PATH_port); returns the host end.
fn guest_connect(vm: &mut VsockVm, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
    vm.send(gh(gport, port, REQUEST, 0), &[]);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Response), "{h:?}");
    assert_eq!((h.src_port(), h.dst_port()), (port, gport));
    assert_eq!((h.src_cid(), h.dst_cid()), (HOST_CID, GUEST_CID));
    assert_eq!(h.buf_alloc(), CONN_BUF);
    let (s, _) = l.accept().unwrap();
    s
}

#[test]
fn guest_to_host_connection_carries_data_both_ways_and_closes() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(52)).unwrap();
    let mut host = guest_connect(&mut vm, &l, 1000, 52);
    vm.send(gh(1000, 52, RW, 5), b"hello");
    assert_eq!(read_n(&mut host, 5), b"hello");
    host.write_all(b"world!").unwrap();
    let (h, data) = vm.recv();
    assert_eq!(h.op(), Some(Op::Rw));
    assert_eq!(data, b"world!");
    // The guest closes: RST answers, the host sees end of file.
    vm.send(gh(1000, 52, SHUTDOWN, 0).with_flags(SHUTDOWN_BOTH), &[]);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Rst));
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn host_to_guest_connection_with_connect_line() {
    let mut vm = vm();
    let mut host = vm.host_connect(7);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Request));
    assert_eq!(h.dst_port(), 7);
    let hport = h.src_port();
    assert!(hport >= 1 << 30, "{hport}");
    vm.send(gh(7, hport, RESPONSE, 0), &[]);
    let ok = format!("OK {hport}\n");
    assert_eq!(read_n(&mut host, ok.len()), ok.as_bytes());
    host.write_all(b"ping").unwrap();
    let (h, data) = vm.recv();
    assert_eq!((h.op(), data.as_slice()), (Some(Op::Rw), &b"ping"[..]));
    vm.send(gh(7, hport, RW, 4), b"pong");
    assert_eq!(read_n(&mut host, 4), b"pong");
    // The host half-closes: the guest is told it gets no more data.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Shutdown));
    assert_eq!(h.flags(), SHUTDOWN_SEND);
    // Data from the guest still flows the other way.
    vm.send(gh(7, hport, RW, 3), b"end");
    assert_eq!(read_n(&mut host, 3), b"end");
}

#[test]
fn nobody_listening_means_reset_both_ways() {
    let mut vm = vm();
    // Guest to a host port without a socket.
    vm.send(gh(1000, 53, REQUEST, 0), &[]);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Rst));
    assert_eq!((h.src_port(), h.dst_port()), (53, 1000));
    // Host to a guest port nobody listens on: the guest answers RST, the stream closes.
    let mut host = vm.host_connect(9);
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Request));
    vm.send(gh(9, h.src_port(), RST, 0), &[]);
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // A bad command line closes the stream too.
    let mut bad = UnixStream::connect(&vm.uds).unwrap();
    bad.write_all(b"HELLO 9\n").unwrap();
    assert!(closed(&mut bad));
}

#[test]
fn host_data_never_exceeds_the_guests_credit() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(60)).unwrap();
    // The guest offers 5000 bytes of buffer.
    vm.send(
        Header::from_guest(GUEST_CID, 2000, 60, REQUEST, 0, 0, 5000, 0),
        &[],
    );
    let (h, _) = vm.recv();
    assert_eq!(h.op(), Some(Op::Response));
    let (mut host, _) = l.accept().unwrap();
    let payload: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
    host.write_all(&payload).unwrap();
    let mut got = Vec::new();
    while let Some((h, d)) = vm.recv_within(Duration::from_millis(300)) {
        assert_eq!(h.op(), Some(Op::Rw));
        got.extend(d);
    }
    assert_eq!(got.len(), 5000, "more than the credit was sent");
    // The guest consumed it all: more flows, again within the credit.
    vm.send(
        Header::from_guest(GUEST_CID, 2000, 60, CREDIT_UPDATE, 0, 0, 5000, 5000),
        &[],
    );
    while let Some((_, d)) = vm.recv_within(Duration::from_millis(300)) {
        got.extend(d);
    }
    assert_eq!(got.len(), 10000);
    assert_eq!(got, payload[..10000]);
}

#[test]
fn guest_data_is_buffered_within_the_credit_and_a_guest_beyond_it_is_reset() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(61)).unwrap();
    let mut host = guest_connect(&mut vm, &l, 3000, 61);
    // The host does not read: the socket buffer fills, then the device's buffer.
    let chunk = vec![0x5au8; 60000];
    let mut sent = 0usize;
    let mut credit_updates = 0;
    while sent < (CONN_BUF as usize) + 400_000 {
        vm.send(gh(3000, 61, RW, chunk.len() as u32), &chunk);
        sent += chunk.len();
        // Anything the device says meanwhile is a credit update or, at the end, the reset.
        while let Some((h, _)) = vm.recv_within(Duration::from_millis(20)) {
            match h.op() {
                Some(Op::CreditUpdate) => credit_updates += 1,
                Some(Op::Rst) => {
                    // Reset: the host stream is closed after what it got.
                    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut all = Vec::new();
                    let _ = host.read_to_end(&mut all);
                    assert!(all.iter().all(|&b| b == 0x5a));
                    assert!(all.len() < sent, "everything sent arrived?");
                    assert!(credit_updates > 0 || all.len() <= CONN_BUF as usize);
                    return;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    panic!("a guest sending {sent} bytes without credit was not reset");
}

#[test]
fn a_slow_host_reader_gets_everything_in_order_with_credit_updates() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(62)).unwrap();
    let host = guest_connect(&mut vm, &l, 4000, 62);
    let total = 3 << 20;
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut got = Vec::with_capacity(total);
        let mut buf = [0u8; 8192];
        while got.len() < total {
            std::thread::sleep(Duration::from_micros(100));
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    // The guest sends only within the credit the device advertises.
    let (mut tx_cnt, mut peer_fwd, peer_alloc) = (0u64, 0u64, u64::from(CONN_BUF));
    let mut sent = 0usize;
    while sent < total {
        while tx_cnt - peer_fwd + 32768 > peer_alloc {
            let (h, _) = vm.recv();
            assert_eq!(h.op(), Some(Op::CreditUpdate), "{h:?}");
            peer_fwd = u64::from(h.fwd_cnt());
        }
        let chunk: Vec<u8> = (sent..sent + 32768).map(|i| (i % 253) as u8).collect();
        vm.send(gh(4000, 62, RW, chunk.len() as u32), &chunk);
        tx_cnt += chunk.len() as u64;
        sent += chunk.len();
    }
    let got = reader.join().unwrap();
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
}

#[test]
fn many_connections_at_once() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(70)).unwrap();
    let mut hosts = Vec::new();
    for g in 0..200u32 {
        hosts.push(guest_connect(&mut vm, &l, 10_000 + g, 70));
    }
    for g in 0..200u32 {
        let msg = format!("guest {g}");
        vm.send(gh(10_000 + g, 70, RW, msg.len() as u32), msg.as_bytes());
    }
    for (g, h) in hosts.iter_mut().enumerate() {
        let msg = format!("guest {g}");
        assert_eq!(read_n(h, msg.len()), msg.as_bytes());
        h.write_all(format!("host {g}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 200 {
        let (h, d) = vm.recv();
        assert_eq!(h.op(), Some(Op::Rw));
        seen.insert(h.dst_port(), d);
    }
    for g in 0..200u32 {
        assert_eq!(seen[&(10_000 + g)], format!("host {g}").as_bytes());
    }
}

#[test]
fn device_reset_closes_every_host_stream_and_the_device_works_again() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(80)).unwrap();
    let mut host = guest_connect(&mut vm, &l, 5000, 80);
    common::w(&mut vm.t, 0x70, 0);
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut rest).unwrap();
    vm.init();
    let mut host = guest_connect(&mut vm, &l, 5001, 80);
    vm.send(gh(5001, 80, RW, 2), b"ok");
    assert_eq!(read_n(&mut host, 2), b"ok");
}

#[test]
fn a_restored_device_announces_a_transport_reset() {
    let mut vm = vm_with(true);
    wait_for_reset_event(&mut vm);
    // Only once: a driver reset and re-activation gets none.
    common::w(&mut vm.t, 0x70, 0);
    vm.init();
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.events().is_empty());
}

/// Waits for the restored device's transport-reset event.
fn wait_for_reset_event(vm: &mut VsockVm) {
    let t0 = std::time::Instant::now();
    loop {
        let ev = vm.events();
        if !ev.is_empty() {
            assert_eq!(ev, vec![0]);
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no reset event");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_restored_device_asks_the_guest_for_host_connections_only_once_it_handled_the_reset() {
    let mut vm = vm_with(true);
    wait_for_reset_event(&mut vm);
    let mut host = vm.host_connect(7);
    // The driver has not handled the event yet (it would reset a connection made now
    // without telling the device): the guest hears nothing of the host's connection.
    assert!(vm.nothing_within(Duration::from_millis(400)));
    // It handled it: the event buffer comes back, and the request follows.
    vm.ev.publish(&vm.mem, 0);
    vm.kick(2);
    let t0 = std::time::Instant::now();
    let (h, _) = vm.recv();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!((h.op(), h.dst_port()), (Some(Op::Request), 7));
    vm.send(gh(7, h.src_port(), RESPONSE, 0), &[]);
    let ok = format!("OK {}\n", h.src_port());
    assert_eq!(read_n(&mut host, ok.len()), ok.as_bytes());
}

#[test]
fn host_connections_to_a_restored_guest_whose_driver_never_answers_the_reset_go_ahead_later() {
    let mut vm = vm_with(true);
    wait_for_reset_event(&mut vm);
    // (Kept open: the device drops a closed stream.)
    let _host = vm.host_connect(8);
    // No event buffer ever comes back: the request is sent after the device's wait (2 s).
    let (h, _) = vm.recv_within(Duration::from_secs(10)).expect("no request");
    assert_eq!((h.op(), h.dst_port()), (Some(Op::Request), 8));
}

#[test]
fn a_paused_device_takes_nothing_until_resumed_and_keeps_its_connections() {
    let mut vm = vm();
    let l = UnixListener::bind(vm.host_path(81)).unwrap();
    let mut host = guest_connect(&mut vm, &l, 6000, 81);
    let st = vm.t.pause().unwrap();
    assert_eq!(st.progress.len(), 3);
    assert_eq!(st.progress[1].next_avail, st.progress[1].next_used);
    // Host data and a guest packet wait while paused.
    host.write_all(b"later").unwrap();
    let used_before = vm.tx.used_idx(&vm.mem);
    let h = gh(6000, 81, RW, 3);
    let base = 0x3f_0000;
    vm.mem
        .write_slice(
            vm_memory::ByteValued::as_slice(&h),
            vm_memory::GuestAddress(base),
        )
        .unwrap();
    vm.mem
        .write_slice(b"abc", vm_memory::GuestAddress(base + 44))
        .unwrap();
    vm.raw_desc(200, base, 47, 0, 0);
    vm.tx.publish(&vm.mem, 200);
    vm.kick(1);
    assert!(vm.nothing_within(Duration::from_millis(300)));
    assert_eq!(vm.tx.used_idx(&vm.mem), used_before);
    vm.t.resume();
    assert_eq!(read_n(&mut host, 3), b"abc");
    let (h, d) = vm.recv();
    assert_eq!((h.op(), d.as_slice()), (Some(Op::Rw), &b"later"[..]));
}
