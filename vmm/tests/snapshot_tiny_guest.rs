//! Snapshot and restore on the host's KVM with tiny guests: the counting guest
//! (tests/guest/counter.c) goes on where it was in a clone (same count, same memory checksum
//! as the original run printed for it), two clones run at once, pause and resume, a disk's
//! overlay is frozen under a running VM (the blk guest), and snapshots from another thinvm
//! version, another CPU or a damaged state are refused before anything runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn counter() -> String {
    guest("counter").to_str().unwrap().to_string()
}

/// (count, checksum) pairs of a console log (complete lines only: the guest may be writing).
fn counts(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "COUNT").then_some(())?;
            let n = w.next()?.parse().ok()?;
            (w.next()? == "mem").then_some(())?;
            Some((n, w.next()?.parse().ok()?))
        })
        .collect()
}

fn wait_count(log: &Path, n: u64, child: &mut Child) {
    let t0 = Instant::now();
    while counts(log).last().map_or(0, |c| c.0) < n {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("thinvm ended ({st}) before COUNT {n}: {err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no COUNT {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(thinvm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts the counting guest with `cmdline`, an API socket at `api`, its console in `log`,
/// and `extra` options.
fn spawn_counter(cmdline: &str, api: &Path, log: &Path, extra: &[&str]) -> Child {
    let kernel = counter();
    let serial = format!("file={}", log.display());
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        cmdline,
        "--api-socket",
        api.to_str().unwrap(),
        "--serial",
        &serial,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

fn stop(mut c: Child) {
    // SAFETY: signalling our child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

fn ctl(api: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(thinvm())
        .arg("ctl")
        .arg(api)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// Runs the counting guest with an API socket, snapshots it at COUNT >= 5, lets it count on
/// to `after`; returns the original's counts.
fn take_snapshot(dir: &TempDir, snap: &Path, after: u64) -> Vec<(u64, u64)> {
    let api = dir.join("api.sock");
    let log = dir.join("orig.txt");
    let mut vm = spawn_counter("every=5", &api, &log, &[]);
    wait_count(&log, 5, &mut vm);
    let (code, out, err) = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("\"ok\":true"), "{out}");
    // The original goes on.
    wait_count(&log, after, &mut vm);
    stop(vm);
    counts(&log)
}

#[test]
fn a_clone_goes_on_where_the_snapshot_was_taken() {
    if !kvm_or_skip("a_clone_goes_on_where_the_snapshot_was_taken") {
        return;
    }
    let dir = TempDir::new("snap");
    let snap = dir.join("snap");
    let orig = take_snapshot(&dir, &snap, 30);
    let truth: HashMap<u64, u64> = orig.iter().copied().collect();
    // Two clones at once, from the same snapshot.
    let logs = [dir.join("clone1.txt"), dir.join("clone2.txt")];
    let mut clones: Vec<Child> = logs
        .iter()
        .map(|l| {
            spawn(&[
                "restore",
                snap.to_str().unwrap(),
                "--serial",
                &format!("file={}", l.display()),
            ])
        })
        .collect();
    for (l, c) in logs.iter().zip(clones.iter_mut()) {
        let first = {
            wait_count(l, 1, c);
            counts(l)[0].0
        };
        wait_count(l, first + 10, c);
    }
    for c in clones {
        stop(c);
    }
    let snap_count = orig.iter().map(|c| c.0).find(|&n| n >= 5).unwrap();
    for l in &logs {
        let got = counts(l);
        // It started counting after the snapshot, not from 1 ...
        assert!(got[0].0 > snap_count, "{got:?}");
        assert!(
            got[0].0 <= snap_count + 10,
            "{got:?} (snapshot near {snap_count})"
        );
        // ... in steps of one, with the memory the original had at each count.
        for w in got.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{got:?}");
        }
        for (n, sum) in &got {
            if let Some(t) = truth.get(n) {
                assert_eq!(sum, t, "count {n}: memory differs from the original's");
            }
        }
    }
}

/// A clone has the snapshot's debug-exit device: the counting guest writes 3 to port 0x501
/// at its last count, and the original and its clone both end with (3 << 1) | 1 = 7 (a clone
/// without the device would go on to the guest's reset and exit 0).
#[test]
fn a_clone_keeps_the_debug_exit_device() {
    if !kvm_or_skip("a_clone_keeps_the_debug_exit_device") {
        return;
    }
    let dir = TempDir::new("snapexit");
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    let (orig_log, clone_log) = (dir.join("orig.txt"), dir.join("clone.txt"));
    let mut vm = spawn_counter(
        "every=2 limit=40 exitval=3",
        &api,
        &orig_log,
        &["--debug-exit"],
    );
    wait_count(&orig_log, 5, &mut vm);
    let (code, out, err) = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out} {err}");
    let status = vm.wait_with_output().unwrap();
    assert_eq!(status.status.code(), Some(7), "{}", text(&status.stderr));
    let clone = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file={}", clone_log.display()),
    ])
    .wait_with_output()
    .unwrap();
    let log = std::fs::read_to_string(&clone_log).unwrap_or_default();
    assert!(log.contains("COUNTER-EXIT"), "{log}");
    assert_eq!(
        clone.status.code(),
        Some(7),
        "{}\n{log}",
        text(&clone.stderr)
    );
}

#[test]
fn pause_and_resume_stop_and_restart_the_guest() {
    if !kvm_or_skip("pause_and_resume_stop_and_restart_the_guest") {
        return;
    }
    let dir = TempDir::new("pause");
    let api = dir.join("api.sock");
    let log = dir.join("log.txt");
    let mut vm = spawn_counter("every=2", &api, &log, &[]);
    wait_count(&log, 3, &mut vm);
    assert_eq!(ctl(&api, &["pause"]).0, 0);
    assert!(ctl(&api, &["status"]).1.contains("paused"));
    let n = counts(&log).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(counts(&log).len(), n, "counted while paused");
    // A snapshot of a paused VM leaves it paused.
    let snap = dir.join("snap");
    assert_eq!(ctl(&api, &["snapshot", snap.to_str().unwrap()]).0, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(&log).len(), n);
    assert_eq!(ctl(&api, &["resume"]).0, 0);
    wait_count(&log, counts(&log).last().unwrap().0 + 3, &mut vm);
    let (code, _, err) = ctl(&api, &["resume"]);
    assert_eq!(code, 1);
    assert!(err.contains("not paused"), "{err}");
    // A snapshot directory that is not empty is refused.
    let (code, _, err) = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("must be new or empty"), "{err}");
    stop(vm);
}

fn edit_state(snap: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = snap.join("state.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn incompatible_snapshots_are_refused_before_anything_runs() {
    if !kvm_or_skip("incompatible_snapshots_are_refused_before_anything_runs") {
        return;
    }
    let dir = TempDir::new("refuse");
    let snap = dir.join("snap");
    take_snapshot(&dir, &snap, 6);
    let original = std::fs::read(snap.join("state.json")).unwrap();
    let refused = |needle: &str| {
        let log = dir.join("never.txt");
        let _ = std::fs::remove_file(&log);
        let out = run_thinvm(
            &[
                "restore",
                snap.to_str().unwrap(),
                "--serial",
                &format!("file={}", log.display()),
            ],
            30,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("cannot be restored") || err.contains("not a thinvm snapshot"),
            "{err}"
        );
        assert!(err.contains(needle), "'{err}' lacks '{needle}'");
        assert!(!log.exists(), "a VM was started");
    };
    edit_state(&snap, |v| v["thinvm_version"] = "0.0.1".into());
    refused("thinvm 0.0.1");
    std::fs::write(snap.join("state.json"), &original).unwrap();
    edit_state(&snap, |v| v["format"] = 99.into());
    refused("format 99");
    std::fs::write(snap.join("state.json"), &original).unwrap();
    edit_state(&snap, |v| {
        let s = v["cpu"]["signature"].as_u64().unwrap();
        v["cpu"]["signature"] = (s ^ 0xf0).into();
        v["cpu"]["brand"] = "Imaginary CPU".into();
    });
    refused("Imaginary CPU");
    std::fs::write(snap.join("state.json"), &original).unwrap();
    edit_state(&snap, |v| {
        v["vcpus"] = serde_json::json!([]);
    });
    refused("holds the state of 0");
    std::fs::write(snap.join("state.json"), &original).unwrap();
    edit_state(&snap, |v| v["mem_size"] = u64::MAX.into());
    refused("guest RAM size 18446744073709551615");
    std::fs::write(
        snap.join("state.json"),
        b"{\"format\":1,\"thinvm_version\":\"",
    )
    .unwrap();
    refused("not a thinvm snapshot");
    // The untouched state still restores.
    std::fs::write(snap.join("state.json"), &original).unwrap();
    let log = dir.join("ok.txt");
    let mut c = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file={}", log.display()),
    ]);
    wait_count(&log, counts(&log).first().map_or(1, |x| x.0) + 1, &mut c);
    stop(c);
}

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
fn a_disk_is_frozen_into_the_snapshot_and_clones_get_overlays_of_their_own() {
    if !kvm_or_skip("a_disk_is_frozen_into_the_snapshot_and_clones_get_overlays_of_their_own") {
        return;
    }
    let dir = TempDir::new("snapdisk");
    let base = dir.join("base.raw");
    let ov = dir.join("ov.qcow2");
    let (b, o) = (base.to_str().unwrap(), ov.to_str().unwrap());
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "raw", b, "4M"]).0,
        0
    );
    assert_eq!(
        qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", b]).0,
        0
    );
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", o]).0,
        0
    );
    assert_eq!(qemu(&["qemu-io", "-c", "write -P 0xab 0 64k", o]).0, 0);
    let api = dir.join("api.sock");
    let log = dir.join("log.txt");
    let mut vm = spawn_counter(
        "every=5",
        &api,
        &log,
        &["--disk", &format!("path={o},format=qcow2")],
    );
    wait_count(&log, 2, &mut vm);
    let snap = dir.join("snap");
    let (code, out, err) = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    // The VM runs on a new overlay at the same path, over the snapshot's frozen layer.
    let layer = snap.join("disk0.qcow2");
    // (-U: the running VM holds the image's lock.)
    let (_, info) = qemu(&["qemu-img", "info", "-U", "--output=json", o]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["backing-filename"].as_str().unwrap(),
        std::fs::canonicalize(&layer).unwrap().to_str().unwrap()
    );
    wait_count(&log, counts(&log).last().unwrap().0 + 2, &mut vm);
    stop(vm);
    for img in [o, layer.to_str().unwrap()] {
        let (code, check) = qemu(&["qemu-img", "check", img]);
        assert_eq!(code, 0, "{img}: {check}");
    }
    let (code, io) = qemu(&[
        "qemu-io",
        "-r",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0x11 64k 1M",
        layer.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{io}");
    assert!(!io.contains("verification failed"), "{io}");
    // A clone without --ephemeral: an overlay of its own in the snapshot directory.
    let clog = dir.join("clone.txt");
    let mut c = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--serial",
        &format!("file={}", clog.display()),
    ]);
    wait_count(&clog, counts(&clog).first().map_or(1, |x| x.0) + 1, &mut c);
    stop(c);
    let overlays: Vec<_> = std::fs::read_dir(&snap)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("clone-")
        })
        .collect();
    assert_eq!(overlays.len(), 1, "{overlays:?}");
    let (_, info) = qemu(&[
        "qemu-img",
        "info",
        "--output=json",
        overlays[0].to_str().unwrap(),
    ]);
    assert!(info.contains("disk0.qcow2"), "{info}");
    // With --ephemeral: nothing is left behind.
    let elog = dir.join("eph.txt");
    let mut e = spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--ephemeral",
        "--serial",
        &format!("file={}", elog.display()),
    ]);
    wait_count(&elog, counts(&elog).first().map_or(1, |x| x.0) + 1, &mut e);
    stop(e);
    let n = std::fs::read_dir(&snap).unwrap().count();
    assert_eq!(n, 4, "state, memory, layer, the first clone's overlay");
}
