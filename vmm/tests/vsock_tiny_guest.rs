//! virtio-vsock end to end on the host's KVM with the tiny driver guest (tests/guest/vsock.c):
//! a guest connection to a host Unix socket (PATH_5000), hostile transmit chains the device
//! survives, and a host connection (CONNECT 1234) carrying 128 KiB each way through the guest's
//! echo, within both sides' credit; thinvm's seccomp filters on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn guest_and_host_connections_with_data_both_ways() {
    if !kvm_or_skip("guest_and_host_connections_with_data_both_ways") {
        return;
    }
    let dir = TempDir::new("vsock");
    let uds = dir.join("v.sock");
    let l5000 = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    let kernel = guest("vsock");
    let log = dir.join("console.txt");
    let mut child = Command::new(thinvm())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 1. The guest connects to host port 5000.
    let (mut s, _) = l5000.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 11];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"guest-hello");
    s.write_all(b"host-hello").unwrap();
    // 3. Connect to the guest's port 1234 once it listens (until then: closed at once).
    let t0 = Instant::now();
    let mut host = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest never accepted"
        );
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!(
                "thinvm ended ({st}): {err}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let mut c = match UnixStream::connect(&uds) {
            Ok(c) => c,
            Err(e) => panic!(
                "{e}: {:?}",
                std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>()
            ),
        };
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"CONNECT 1234\n").unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while let Ok(1) = c.read(&mut byte) {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        if line.starts_with(b"OK ") {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = 128 << 10;
    let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = host.try_clone().unwrap();
    let to_send = data.clone();
    let w = std::thread::spawn(move || {
        for c in to_send.chunks(10_000) {
            writer.write_all(c).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    host.read_to_end(&mut echoed).unwrap();
    w.join().unwrap();
    assert_eq!(echoed.len(), total);
    assert!(echoed == data, "echo differs");
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let console = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{console}\n{err}");
    assert!(console.contains("VSOCK-CHECK setup ok"), "{console}");
    assert!(!console.contains("FAIL"), "{console}");
    assert!(console.contains("all checks passed"), "{console}");
    assert!(
        console.contains(&format!("echoed bytes: {total}")),
        "{console}"
    );
}
