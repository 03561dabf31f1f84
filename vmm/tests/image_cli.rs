//! `thinvm image ...` through the binary, with QEMU's tools as the oracle: create, info,
//! check (with qemu-img's exit codes and repair), map, io (including the reclaim paths),
//! bench, compact, and clear one-line errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Output};

use common::*;

fn tv(args: &[&str]) -> Output {
    Command::new(thinvm()).args(args).output().unwrap()
}

fn ok_out(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

#[test]
fn create_matches_qemu_img_info_and_passes_check() {
    let d = TempDir::new("img-create");
    let base = d.join("base.raw");
    ok_out(
        &sh(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "raw",
            base.to_str().unwrap(),
            "32M",
        ]),
        "base",
    );
    let cases: &[(&str, &str, bool)] = &[
        ("0.10", "cluster_size=65536", false),
        ("0.10", "cluster_size=4096", true),
        ("1.1", "cluster_size=512,refcount_bits=1", false),
        ("1.1", "cluster_size=2M,refcount_bits=64", true),
        ("1.1", "refcount_bits=8", true),
    ];
    for (i, (compat, opts, backing)) in cases.iter().enumerate() {
        let img = d.join(&format!("i{i}.qcow2"));
        let o = format!("compat={compat},{opts}");
        let mut args = vec!["image", "create", "-f", "qcow2", "-o", &o];
        if *backing {
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        args.push(img.to_str().unwrap());
        if !backing {
            args.push("48M");
        }
        let out = ok_out(&tv(&args), "create");
        assert!(out.starts_with("Formatting '"), "{out}");
        let q = sh(&["qemu-img", "check", img.to_str().unwrap()]);
        assert_eq!(q.status.code(), Some(0), "{}", text(&q.stdout));
        let ours = json(&ok_out(
            &tv(&["image", "info", "--output=json", img.to_str().unwrap()]),
            "info",
        ));
        let theirs = json(&ok_out(
            &sh(&["qemu-img", "info", "--output=json", img.to_str().unwrap()]),
            "qemu info",
        ));
        for k in [
            "virtual-size",
            "cluster-size",
            "format",
            "backing-filename",
            "backing-filename-format",
            "dirty-flag",
        ] {
            assert_eq!(ours[k], theirs[k], "case {i} field {k}");
        }
        for k in ["compat", "refcount-bits", "corrupt", "lazy-refcounts"] {
            assert_eq!(
                ours["format-specific"]["data"][k], theirs["format-specific"]["data"][k],
                "case {i} {k}"
            );
        }
        let human = ok_out(&tv(&["image", "info", img.to_str().unwrap()]), "info");
        assert!(human.contains(&format!("compat: {compat}")), "{human}");
    }
    // SIZE defaults to the backing file's; suffixes work.
    let img = d.join("sized.qcow2");
    ok_out(
        &tv(&[
            "image",
            "create",
            "-q",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            img.to_str().unwrap(),
        ]),
        "create",
    );
    let info = json(&ok_out(
        &tv(&["image", "info", "--output=json", img.to_str().unwrap()]),
        "info",
    ));
    assert_eq!(info["virtual-size"], 32 << 20);
    let raw = d.join("r.raw");
    ok_out(
        &tv(&[
            "image",
            "create",
            "-q",
            "-f",
            "raw",
            raw.to_str().unwrap(),
            "1G",
        ]),
        "raw",
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 30);
    // --backing-chain lists both layers.
    let chain = json(&ok_out(
        &tv(&[
            "image",
            "info",
            "--backing-chain",
            "--output=json",
            img.to_str().unwrap(),
        ]),
        "chain",
    ));
    assert_eq!(chain.as_array().unwrap().len(), 2);
}

#[test]
fn io_round_trips_with_qemu_io_and_map_matches_qemu_img() {
    let d = TempDir::new("img-io");
    let base = d.join("base.raw");
    let img = d.join("ov.qcow2");
    let (b, i) = (base.to_str().unwrap(), img.to_str().unwrap());
    ok_out(
        &sh(&["qemu-img", "create", "-q", "-f", "raw", b, "8M"]),
        "base",
    );
    ok_out(
        &sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", b]),
        "fill base",
    );
    ok_out(
        &tv(&["image", "create", "-q", "-b", b, "-F", "raw", i]),
        "create",
    );
    let out = ok_out(
        &tv(&[
            "image",
            "io",
            "-f",
            "qcow2",
            i,
            "-c",
            "write -P 0xaa 64k 64k",
            "-c",
            "write -P 0xbb 1000 3000",
            "-c",
            "read -P 0xaa 64k 64k",
            "-c",
            "flush",
        ]),
        "io",
    );
    assert!(
        out.contains("wrote 65536/65536 bytes at offset 65536"),
        "{out}"
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 65536"),
        "{out}"
    );
    // QEMU reads what we wrote, and the backing data around it.
    let q = sh(&[
        "qemu-io",
        "-c",
        "read -P 0xaa 64k 64k",
        "-c",
        "read -P 0xbb 1000 3000",
        "-c",
        "read -P 0x33 0 1000",
        "-c",
        "read -P 0x33 128k 1M",
        i,
    ]);
    assert!(
        q.status.success() && !text(&q.stdout).contains("failed"),
        "{}",
        text(&q.stdout)
    );
    // We read what QEMU wrote.
    ok_out(
        &sh(&["qemu-io", "-c", "write -P 0xcc 2M 128k", i]),
        "qemu write",
    );
    ok_out(
        &tv(&["image", "io", "-r", i, "-c", "read -P 0xcc 2M 128k"]),
        "read qemu's data",
    );
    // A mismatch is a clear failure with exit code 1.
    let bad = tv(&["image", "io", "-r", i, "-c", "read -P 0xcc 0 4k"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("Pattern verification failed"),
        "{}",
        text(&bad.stderr)
    );
    // map equals qemu-img map.
    ok_out(
        &sh(&["qemu-io", "-c", "write -z 4M 256k", i]),
        "qemu write -z",
    );
    let ours = json(&ok_out(&tv(&["image", "map", "--output=json", i]), "map"));
    let theirs = json(&ok_out(
        &sh(&["qemu-img", "map", "--output=json", i]),
        "qemu map",
    ));
    assert_eq!(ours, theirs);
    let human = ok_out(&tv(&["image", "map", i]), "map human");
    assert!(
        human.contains("Mapped to") && human.contains("base.raw"),
        "{human}"
    );
}

#[test]
fn io_reclaim_paths_read_zeros_and_stay_clean() {
    let d = TempDir::new("img-reclaim");
    let base = d.join("base.raw");
    let img = d.join("ov.qcow2");
    let (b, i) = (base.to_str().unwrap(), img.to_str().unwrap());
    ok_out(
        &sh(&["qemu-img", "create", "-q", "-f", "raw", b, "8M"]),
        "base",
    );
    ok_out(
        &sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 8M", b]),
        "fill base",
    );
    ok_out(
        &tv(&["image", "create", "-q", "-b", b, "-F", "raw", i]),
        "create",
    );
    ok_out(
        &tv(&["image", "io", "-f", "qcow2", i, "-c", "write -P 0x55 0 4M"]),
        "fill",
    );
    let out = ok_out(
        &tv(&[
            "image",
            "io",
            "-f",
            "qcow2",
            "--detect-zeroes=unmap",
            i,
            "-c",
            "write -P 0 0 1M",
            "-c",
            "write -z -u 1M 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "discard 3M 1M",
        ]),
        "reclaim",
    );
    assert!(
        out.contains("discard 1048576/1048576 bytes at offset 3145728"),
        "{out}"
    );
    let q = sh(&[
        "qemu-io",
        "-c",
        "read -P 0 0 4M",
        "-c",
        "read -P 0x44 4M 4M",
        i,
    ]);
    assert!(!text(&q.stdout).contains("failed"), "{}", text(&q.stdout));
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    let map = json(&ok_out(
        &sh(&["qemu-img", "map", "--output=json", i]),
        "map",
    ));
    assert_eq!(map[0]["zero"], true);
    assert_eq!(map[0]["data"], false);
    assert_eq!(map[0]["length"], 4 << 20);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&img).unwrap();
    assert!(
        m.size() <= 6 * 65536 && m.blocks() * 512 <= 6 * 65536,
        "overlay did not shrink: {m:?}"
    );
}

#[test]
fn check_exit_codes_and_repair() {
    let d = TempDir::new("img-check");
    let img = d.join("c.qcow2");
    let i = img.to_str().unwrap();
    ok_out(&tv(&["image", "create", "-q", i, "16M"]), "create");
    ok_out(&tv(&["image", "io", i, "-c", "write -P 1 0 128k"]), "write");
    let clean = tv(&["image", "check", "--output=json", i]);
    assert_eq!(clean.status.code(), Some(0));
    let j = json(&text(&clean.stdout));
    let q = json(&text(
        &sh(&["qemu-img", "check", "--output=json", i]).stdout,
    ));
    for k in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "check-errors",
    ] {
        assert_eq!(j[k], q[k], "{k}");
    }
    // Leak: raise the refcount of an unreferenced cluster (file extended to hold it).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, 0x10000).unwrap();
    let rb = u64::from_be_bytes(rt);
    f.set_len(12 * 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), rb + 2 * 10).unwrap();
    let leaky = tv(&["image", "check", i]);
    assert_eq!(leaky.status.code(), Some(3), "{}", text(&leaky.stdout));
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(3));
    let fixed = tv(&["image", "check", "-r", "leaks", i]);
    assert_eq!(fixed.status.code(), Some(0), "{}", text(&fixed.stdout));
    assert!(
        text(&fixed.stdout).contains("1 leaked clusters"),
        "{}",
        text(&fixed.stdout)
    );
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    // Corruption: a data cluster's refcount dropped to 0.
    f.write_all_at(&0u16.to_be_bytes(), rb + 2 * 5).unwrap();
    let bad = tv(&["image", "check", i]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stdout));
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(2));
    let all = tv(&["image", "check", "-r", "all", i]);
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stdout));
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    // Could not check: 1.
    let junk = d.join("junk");
    std::fs::write(&junk, b"not an image").unwrap();
    assert_eq!(
        tv(&["image", "check", junk.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        tv(&["image", "check", "/nonexistent.qcow2"]).status.code(),
        Some(1)
    );
}

#[test]
fn compact_and_bench_work() {
    let d = TempDir::new("img-compact");
    let img = d.join("c.qcow2");
    let i = img.to_str().unwrap();
    ok_out(
        &sh(&["qemu-img", "create", "-q", "-f", "qcow2", i, "64M"]),
        "create",
    );
    ok_out(
        &sh(&[
            "qemu-io",
            "-c",
            "write -P 0 0 8M",
            "-c",
            "write -P 7 30M 64k",
            i,
        ]),
        "write",
    );
    let out = ok_out(&tv(&["image", "compact", i]), "compact");
    assert!(out.contains("zero clusters reclaimed: 128"), "{out}");
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    let q = sh(&[
        "qemu-io",
        "-c",
        "read -P 7 30M 64k",
        "-c",
        "read -P 0 0 30M",
        i,
    ]);
    assert!(!text(&q.stdout).contains("failed"));
    assert!(std::fs::metadata(&img).unwrap().len() <= 7 * 65536);
    let out = ok_out(
        &tv(&[
            "image", "bench", "-c", "200", "-w", "-s", "4k", "-S", "64k", i,
        ]),
        "bench",
    );
    assert!(
        out.contains("Sending 200 write requests, 4096 bytes each"),
        "{out}"
    );
    assert!(out.contains("Run completed in"), "{out}");
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    // Queue depth 16: batches whose data writes run in parallel (over allocated clusters
    // and fresh ones), then parallel reads; qemu-io sees every request's pattern.
    ok_out(
        &tv(&[
            "image",
            "bench",
            "-c",
            "300",
            "-d",
            "16",
            "-w",
            "--pattern",
            "0x3c",
            "-s",
            "8k",
            "-S",
            "96k",
            i,
        ]),
        "bench -d 16 -w",
    );
    ok_out(
        &tv(&[
            "image", "bench", "-c", "300", "-d", "16", "-s", "8k", "-S", "96k", i,
        ]),
        "bench -d 16",
    );
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    let mut cmds = Vec::new();
    for k in [0u64, 1, 150, 299] {
        cmds.push("-c".to_string());
        cmds.push(format!("read -P 0x3c {} 8k", k * 96 * 1024));
    }
    let mut args: Vec<&str> = vec!["qemu-io"];
    args.extend(cmds.iter().map(|c| c.as_str()));
    args.push(i);
    let q = sh(&args);
    let qout = text(&q.stdout);
    assert!(
        !qout.contains("fail") && qout.contains("read 8192/8192"),
        "{qout}"
    );
}

#[test]
fn direct_io_cache_none_writes_what_qemu_reads() {
    let d = TempDir::new("img-direct");
    let probe = d.join("probe");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    if sh(&[
        "dd",
        "if=/dev/zero",
        &format!("of={}", probe.display()),
        "bs=4096",
        "count=1",
        "oflag=direct",
    ])
    .status
    .code()
        != Some(0)
    {
        eprintln!(
            "SKIPPED: O_DIRECT is not supported in {}",
            d.path().display()
        );
        return;
    }
    let base = d.join("base.raw");
    let b = base.to_str().unwrap();
    ok_out(
        &sh(&["qemu-img", "create", "-q", "-f", "raw", b, "8M"]),
        "base",
    );
    ok_out(
        &sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", b]),
        "fill",
    );
    let img = d.join("ov.qcow2");
    let i = img.to_str().unwrap();
    // 512-byte clusters: every access is below the direct-I/O alignment.
    ok_out(
        &tv(&[
            "image",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.raw",
            "-F",
            "raw",
            i,
        ]),
        "create",
    );
    ok_out(
        &tv(&[
            "image",
            "io",
            "-f",
            "qcow2",
            "-t",
            "none",
            "--detect-zeroes=unmap",
            i,
            "-c",
            "write -P 0xa1 1000 3000",
            "-c",
            "write -P 0 1M 64k",
            "-c",
            "write -z -u 2M 4k",
            "-c",
            "discard 3M 512",
            "-c",
            "read -P 0x33 0 1000",
            "-c",
            "read -P 0xa1 1000 3000",
            "-c",
            "flush",
        ]),
        "io -t none",
    );
    assert_eq!(sh(&["qemu-img", "check", i]).status.code(), Some(0));
    let q = sh(&[
        "qemu-io",
        "-c",
        "read -P 0x33 0 1000",
        "-c",
        "read -P 0xa1 1000 3000",
        "-c",
        "read -P 0x33 4000 1044576",
        "-c",
        "read -P 0 1M 64k",
        "-c",
        "read -P 0 2M 4k",
        "-c",
        "read -P 0 3M 512",
        "-c",
        "read -P 0x33 3146240 512",
        i,
    ]);
    let out = text(&q.stdout);
    assert!(q.status.success() && !out.contains("fail"), "{out}");
    let out = ok_out(
        &tv(&["image", "bench", "-t", "none", "-c", "100", "-s", "4k", i]),
        "bench -t none",
    );
    assert!(out.contains("Run completed in"), "{out}");
}

#[test]
fn bad_arguments_are_one_clear_line() {
    let d = TempDir::new("img-args");
    let img = d.join("x.qcow2");
    let i = img.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["image", "create", i, "12q"], "invalid size"),
        (
            vec!["image", "create", "-o", "cluster_size=3000", i, "1M"],
            "power of two",
        ),
        (
            vec!["image", "create", "-o", "colour=blue", i, "1M"],
            "unknown option",
        ),
        (
            vec!["image", "create", "-o", "compat=2.0", i, "1M"],
            "compat",
        ),
        (
            vec!["image", "create", "-o", "refcount_bits=3", i, "1M"],
            "refcount_bits",
        ),
        (vec!["image", "create", i], "size required"),
        (
            vec!["image", "create", "-b", "/nonexistent.raw", i],
            "backing file",
        ),
        (vec!["image", "info", "/nonexistent.qcow2"], "cannot open"),
        (
            vec!["image", "io", "/nonexistent.qcow2", "-c", "read 0 1"],
            "cannot open",
        ),
    ];
    for (args, needle) in cases {
        let o = tv(&args);
        let err = text(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(err.contains(needle), "{args:?}: '{err}' lacks '{needle}'");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"));
    }
    ok_out(&tv(&["image", "create", "-q", i, "1M"]), "create");
    for (cmd, needle) in [
        ("frob 0 1", "unknown command"),
        ("write -P 0x1ff 0 1", "pattern"),
        ("read 0", "OFFSET LENGTH"),
        ("write -P 1 1M 1", "beyond the virtual size"),
    ] {
        let o = tv(&["image", "io", i, "-c", cmd]);
        assert_ne!(o.status.code(), Some(0), "{cmd}");
        assert!(
            text(&o.stderr).contains(needle),
            "{cmd}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn image_io_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let d = TempDir::new("img-pipe");
    let img = d.join("a.qcow2");
    ok_out(
        &tv(&[
            "image",
            "create",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
            "64M",
        ]),
        "create",
    );
    let mut args: Vec<&str> = vec!["image", "io", img.to_str().unwrap()];
    for _ in 0..20000 {
        args.extend(["-c", "read 0 4k"]);
    }
    let mut child = Command::new(thinvm())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -1`: read one line, then go away.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("read 4096/4096"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}

/// Images in use by another process (here qemu-nbd serving an overlay writable): the
/// readers `info`, `map`, `check` fail with one clear line naming the image, as qemu-img's
/// do, and work with `-U`; writers (`io`, `check -r`, `compact`, `bench -w`, `create` over
/// it) fail and leave it untouched; `-U` is refused where it would write.
#[test]
fn images_in_use_are_refused_unless_force_shared_for_reading() {
    let d = TempDir::new("img-lock");
    let base = d.join("base.qcow2");
    let ov = d.join("ov.qcow2");
    let (b, o) = (base.to_str().unwrap(), ov.to_str().unwrap());
    ok_out(
        &sh(&["qemu-img", "create", "-q", "-f", "qcow2", b, "8M"]),
        "base",
    );
    ok_out(&sh(&["qemu-io", "-c", "write -P 0x3c 0 1M", b]), "fill");
    ok_out(
        &sh(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", o,
        ]),
        "overlay",
    );
    let before = std::fs::read(&ov).unwrap();
    let nbd = QemuNbd::hold(&d, &["-f", "qcow2", o]);

    let refused = |args: &[&str], code: i32| {
        let out = tv(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(o), "{args:?}: {err}");
        assert!(err.contains("in use by another process"), "{args:?}: {err}");
        assert!(err.contains("-U"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    };
    refused(&["image", "info", o], 1);
    refused(&["image", "info", "--backing-chain", o], 1);
    refused(&["image", "map", o], 1);
    refused(&["image", "check", o], 1);
    refused(&["image", "check", "-r", "leaks", o], 1);
    refused(&["image", "io", "-c", "write 0 4k", o], 1);
    refused(&["image", "io", "-r", "-c", "read 0 4k", o], 1);
    refused(&["image", "compact", o], 1);
    refused(&["image", "bench", "-w", "-c", "8", o], 1);
    refused(&["image", "create", "-q", "-f", "qcow2", o, "1M"], 1);

    // -U: read-only inspection works, through the backing chain.
    let info = json(&ok_out(
        &tv(&["image", "info", "-U", "--output=json", o]),
        "info -U",
    ));
    assert_eq!(info["virtual-size"], 8 << 20);
    let chain = ok_out(
        &tv(&["image", "info", "--force-share", "--backing-chain", o]),
        "info --backing-chain -U",
    );
    assert!(chain.contains(b), "{chain}");
    let map = json(&ok_out(
        &tv(&["image", "map", "-U", "--output=json", o]),
        "map -U",
    ));
    assert_eq!(map[0]["depth"], 1, "{map}");
    let check = tv(&["image", "check", "-U", o]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    ok_out(
        &tv(&["image", "io", "-r", "-U", "-c", "read -P 0x3c 0 1M", o]),
        "io -r -U",
    );
    // ... and only read-only (usage errors, before anything is opened).
    for args in [
        vec!["image", "check", "-U", "-r", "leaks", o],
        vec!["image", "io", "-U", "-c", "write 0 4k", o],
    ] {
        let out = tv(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    drop(nbd);
    assert_eq!(
        std::fs::read(&ov).unwrap(),
        before,
        "an image in use changed"
    );
}

/// A crafted header whose backing file name offset lies near u64::MAX (its end wrapped and
/// a slice index panicked): `info` and `check` print one clear line and exit 1, no
/// backtrace.
#[test]
fn crafted_header_is_one_clear_line_not_a_panic() {
    let d = TempDir::new("img-crafted");
    let img = d.join("wrap.qcow2");
    let i = img.to_str().unwrap();
    ok_out(&tv(&["image", "create", "-q", i, "16M"]), "create");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&0xffff_ffff_ffff_fff0u64.to_be_bytes(), 8)
        .unwrap();
    f.write_all_at(&0x20u32.to_be_bytes(), 16).unwrap();
    drop(f);
    for args in [
        vec!["image", "info", i],
        vec!["image", "info", "--output=json", i],
        vec!["image", "check", i],
        vec!["image", "map", i],
    ] {
        let o = Command::new(thinvm())
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("backing file name"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
