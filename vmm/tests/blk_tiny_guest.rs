//! virtio-blk end to end on the host's KVM with the tiny driver guest (tests/guest/blk.c):
//! every request type, hostile requests, device reset and re-activation; afterwards the
//! overlay is checked with QEMU's tools and its allocation matches what the guest did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

fn make_overlay(dir: &TempDir) -> (String, String) {
    let base = dir.join("base.raw");
    let ov = dir.join("ov.qcow2");
    let (b, o) = (base.display().to_string(), ov.display().to_string());
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "raw", &b, "16M"]).0,
        0
    );
    assert_eq!(
        qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", &b]).0,
        0
    );
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &o]).0,
        0
    );
    (b, o)
}

fn checks_passed(stdout: &str) {
    assert!(stdout.contains("BLK-CHECK setup ok"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn guest_driver_exercises_every_request_and_the_overlay_matches() {
    if !kvm_or_skip("guest_driver_exercises_every_request_and_the_overlay_matches") {
        return;
    }
    let dir = TempDir::new("blk");
    let (_b, ov) = make_overlay(&dir);
    let kernel = guest("blk");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &format!("path={ov},serial=blk-test"),
        ],
        60,
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    checks_passed(&stdout);
    // Statistics on exit, with what was reclaimed by each path.
    assert!(
        stderr.contains("reclaimed: zero-detect 64 KiB, discard 64 KiB, write-zeroes 64 KiB"),
        "{stderr}"
    );
    // QEMU agrees with what the guest did.
    let (code, check) = qemu(&["qemu-img", "check", &ov]);
    assert_eq!(code, 0, "{check}");
    let (code, io) = qemu(&[
        "qemu-io",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0 64k 192k",
        "-c",
        "read -P 0x11 256k 1M",
        &ov,
    ]);
    assert_eq!(code, 0, "{io}");
    assert!(!io.contains("verification failed"), "{io}");
    let (_, map) = qemu(&["qemu-img", "map", "--output=json", &ov]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    assert_eq!(map[0]["data"], true);
    assert_eq!(map[0]["length"], 65536);
    assert_eq!(map[1]["zero"], true);
    assert_eq!(map[1]["data"], false);
    assert_eq!(map[1]["depth"], 0);
    assert_eq!(map[1]["length"], 3 * 65536);
    // One data cluster allocated: header, refcount table and block, L1, L2 + 1 data.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&ov).unwrap();
    assert!(m.size() <= 6 * 65536, "apparent size {}", m.size());
    assert!(
        m.blocks() * 512 <= 6 * 65536,
        "allocated {}",
        m.blocks() * 512
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    if !kvm_or_skip("read_only_disks_refuse_writes") {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let (_b, ov) = make_overlay(&dir);
    let before = std::fs::read(&ov).unwrap();
    let kernel = guest("blk");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &format!("path={ov},readonly=on,serial=blk-ro"),
        ],
        60,
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("read-only disk"), "{stdout}");
    checks_passed(&stdout);
    assert_eq!(
        std::fs::read(&ov).unwrap(),
        before,
        "a read-only disk changed"
    );
}

fn checksum(p: &str) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(p).unwrap(),
        std::fs::metadata(p).unwrap().modified().unwrap(),
    )
}

fn leftover_overlays() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("thinvm-ephemeral-")
        })
        .count()
}

#[test]
fn ephemeral_overlays_leave_the_base_untouched_and_vanish() {
    if !kvm_or_skip("ephemeral_overlays_leave_the_base_untouched_and_vanish") {
        return;
    }
    let dir = TempDir::new("eph");
    let (_b, ov) = make_overlay(&dir);
    let before = checksum(&ov);
    let n0 = leftover_overlays();
    let kernel = guest("blk");
    // The guest writes, zeroes, discards: all into the temporary overlay.
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--ephemeral",
            "--disk",
            &format!("path={ov},serial=blk-eph"),
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    checks_passed(&text(&out.stdout));
    assert_eq!(checksum(&ov), before, "base image changed");
    assert_eq!(leftover_overlays(), n0, "overlay left behind");

    // Killed with SIGTERM while running: the overlay goes too.
    let hello = guest("hello");
    let log = dir.join("console.txt");
    let mut child = Command::new(thinvm())
        .args([
            "run",
            "--kernel",
            hello.to_str().unwrap(),
            "--cmdline",
            "mode=spin",
            "--ephemeral",
            "--disk",
        ])
        .arg(format!("path={ov}"))
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("idling")
    {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(leftover_overlays(), n0 + 1, "overlay exists while running");
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(leftover_overlays(), n0, "overlay left behind after SIGTERM");
    assert_eq!(checksum(&ov), before, "base image changed");
}

#[test]
fn eight_disks_attach() {
    if !kvm_or_skip("eight_disks_attach") {
        return;
    }
    let dir = TempDir::new("eight");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        guest("hello").display().to_string(),
    ];
    for i in 0..8 {
        let p = dir.join(&format!("d{i}.qcow2")).display().to_string();
        assert_eq!(
            qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &p, "64M"]).0,
            0
        );
        args.push("--disk".into());
        args.push(p);
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run_thinvm(&refs, 60);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("virtio_mmio.device=4K@0xd0007000:12"),
        "{stdout}"
    );
}
