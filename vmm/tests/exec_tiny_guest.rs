//! `thinvm run --exec` on the host's KVM with the tiny agent guest (tests/guest/agent.c, which
//! speaks the agent protocol over the vsock device): output and status of the command, stdin
//! forwarded, an error frame, `--timeout` (124), a guest that dies first (125).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn exec(cmd: &str, extra: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let kernel = guest("agent");
    let dir = TempDir::new("exec");
    let mut child = Command::new("timeout")
        .args(["-s", "KILL", "60"])
        .arg(thinvm())
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--vsock"])
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .args(["--exec", cmd])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(137),
        "thinvm did not end: {}",
        text(&out.stderr)
    );
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn output_and_status_of_the_command() {
    if !kvm_or_skip("output_and_status_of_the_command") {
        return;
    }
    let (code, out, err) = exec("echo hello-from-the-guest", &[], b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "hello-from-the-guest\n", "{err}");
    let (code, _, err) = exec("exit 42", &[], b"");
    assert_eq!(code, Some(42), "{err}");
    assert!(err.contains("the command exited with status 42"), "{err}");
    let (code, out, err) = exec("stderr", &[], b"");
    assert_eq!(code, Some(7), "{err}");
    assert!(out.is_empty());
    assert!(
        err.starts_with("oops\n") || err.contains("\noops\n"),
        "{err}"
    );
    // 96 KiB of output, in order, through the guest's and the device's credit.
    let (code, out, err) = exec("big 96", &[], b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.len(), 96 * 1024);
    assert!(out
        .bytes()
        .enumerate()
        .all(|(i, b)| b == b'a' + (i % 26) as u8));
}

#[test]
fn stdin_reaches_the_command() {
    if !kvm_or_skip("stdin_reaches_the_command") {
        return;
    }
    let input: Vec<u8> = (0..20_000u32).map(|i| b'A' + (i % 23) as u8).collect();
    let (code, out, err) = exec("cat", &[], &input);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.as_bytes(), &input[..]);
}

#[test]
fn failures_have_their_own_exit_codes() {
    if !kvm_or_skip("failures_have_their_own_exit_codes") {
        return;
    }
    let (code, _, err) = exec("no-such-thing", &[], b"");
    assert_eq!(code, Some(126), "{err}");
    assert!(
        err.contains("could not run the command: unknown command"),
        "{err}"
    );
    let (code, _, err) = exec("hang", &["--timeout", "3"], b"");
    assert_eq!(code, Some(124), "{err}");
    assert!(err.contains("--timeout of 3 s ran out"), "{err}");
    // What the guest was doing when the time ran out: spinning in its own code (loaded at
    // 2 MiB), runnable, after the exits of its vsock traffic.
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("thinvm: vCPU 0: rip "))
        .unwrap_or_else(|| panic!("no vCPU report: {err}"));
    let rip =
        u64::from_str_radix(line.split(',').next().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert!((0x20_0000..0x40_0000).contains(&rip), "{line}");
    assert!(line.contains("mp state runnable"), "{line}");
    let exits: u64 = line
        .split("; ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit count: {line}"));
    assert!(exits > 10, "{line}");
    let (code, _, err) = exec("die", &[], b"");
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("guest requested a reset"), "{err}");
    assert!(
        err.contains("before the command's status came back"),
        "{err}"
    );
}
