//! `--debug-exit` on the host's KVM with the tiny guest (tests/guest/hello.c, `mode=debug-exit`):
//! the guest's value comes back as thinvm's exit status `(v << 1) | 1` (QEMU's
//! isa-debug-exit), for every access width, at QEMU's default port and a configured one, and
//! a write where no debug-exit device is configured changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

fn run(debug_exit: Option<&str>, guest_args: &str) -> (Option<i32>, String, String) {
    let kernel = guest("hello");
    let cmdline = format!("mode=debug-exit {guest_args}");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    if let Some(opts) = debug_exit {
        args.push("--debug-exit");
        if !opts.is_empty() {
            args.push(opts);
        }
    }
    let out = run_thinvm(&args, 30);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn the_guests_value_becomes_the_exit_status_at_the_default_port() {
    if !kvm_or_skip("the_guests_value_becomes_the_exit_status_at_the_default_port") {
        return;
    }
    // QEMU's default: port 0x501, 2 bytes; a 16-bit write of 42 -> (42 << 1) | 1 = 85.
    let (code, stdout, stderr) = run(Some(""), "exitval=42");
    assert_eq!(code, Some(85), "{stdout}\n{stderr}");
    assert!(stdout.contains("debug exit 42"), "{stdout}");
    assert!(!stdout.contains("still running"), "{stdout}");
    assert!(
        stderr.contains("guest wrote 0x2a to the debug-exit port (exit status 85)"),
        "{stderr}"
    );
    // Value 0 -> 1: a guest cannot make thinvm exit 0 through this port.
    let (code, _, stderr) = run(Some(""), "exitval=0 exitwidth=1");
    assert_eq!(code, Some(1), "{stderr}");
    // The second port of the default range counts too.
    let (code, _, stderr) = run(Some(""), "exitport=0x502 exitval=3 exitwidth=1");
    assert_eq!(code, Some(7), "{stderr}");
}

#[test]
fn a_configured_port_and_width_and_values_that_wrap() {
    if !kvm_or_skip("a_configured_port_and_width_and_values_that_wrap") {
        return;
    }
    let (code, stdout, stderr) = run(
        Some("port=0x600,size=4"),
        "exitport=0x600 exitval=127 exitwidth=4",
    );
    assert_eq!(code, Some(255), "{stdout}\n{stderr}");
    // 128 << 1 | 1 = 257: the process status keeps 8 bits, as with QEMU.
    let (code, _, stderr) = run(
        Some("port=0x600,size=4"),
        "exitport=0x603 exitval=128 exitwidth=1",
    );
    assert_eq!(code, Some(1), "{stderr}");
    // The old default port is nothing now: the guest goes on and resets (exit 0).
    let (code, stdout, stderr) = run(Some("port=0x600,size=1"), "exitport=0x501 exitval=5");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("still running after the debug-exit write"),
        "{stdout}"
    );
}

#[test]
fn without_the_device_the_write_is_ignored() {
    if !kvm_or_skip("without_the_device_the_write_is_ignored") {
        return;
    }
    let (code, stdout, stderr) = run(None, "exitval=42");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("still running after the debug-exit write"),
        "{stdout}"
    );
    assert!(stderr.contains("guest requested a reset"), "{stderr}");
}

#[test]
fn bad_options_are_one_clear_line() {
    let kernel = guest("hello");
    for (opts, needle) in [
        ("size=3", "expected 1, 2 or 4"),
        ("port=0x40", "in-kernel PIT"),
        ("port=0x3f8", "overlaps another device"),
        ("port=0xffff,size=4", "beyond the last port"),
        ("bogus=1", "unknown option"),
    ] {
        let out = run_thinvm(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--debug-exit",
                opts,
            ],
            30,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{opts}: {err}");
        assert!(err.contains(needle), "{opts}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{opts}: {err}");
    }
}
