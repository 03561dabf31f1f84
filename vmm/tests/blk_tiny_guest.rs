//! virtio-blk end to end on the host's KVM with the tiny driver guest (tests/guest/blk.c):
//! every request type, hostile requests, device reset and re-activation; afterwards the
//! overlay is checked with QEMU's tools and its allocation matches what the guest did. Also
//! the format-probing attack: a guest writing a qcow2 header into its raw disk.
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
            &format!("path={ov},format=qcow2,serial=blk-test"),
        ],
        60,
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    checks_passed(&stdout);
    assert!(!stderr.contains("never looked for it"), "{stderr}");
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
    // The any-layout write at MiB 8 (4 KiB of 0x3c over the backing file's 0x11).
    let (code, io) = qemu(&[
        "qemu-io",
        "-c",
        "read -P 0x3c 8M 4k",
        "-c",
        "read -P 0x11 8196k 60k",
        &ov,
    ]);
    assert_eq!(code, 0, "{io}");
    assert!(!io.contains("verification failed"), "{io}");
    // Two data clusters allocated: header, refcount table and block, L1, L2 + 2 data.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&ov).unwrap();
    assert!(m.size() <= 7 * 65536, "apparent size {}", m.size());
    assert!(
        m.blocks() * 512 <= 7 * 65536,
        "allocated {}",
        m.blocks() * 512
    );
}

/// A guest that never probes its disk (the hello guest has no virtio driver, as a
/// distribution kernel under `--acpi off` finds none) is told apart at exit, where a user
/// whose guest booted without its disk looks first.
#[test]
fn a_disk_the_guest_never_looked_for_is_reported_at_exit() {
    if !kvm_or_skip("a_disk_the_guest_never_looked_for_is_reported_at_exit") {
        return;
    }
    let dir = TempDir::new("blk-unseen");
    let (_b, ov) = make_overlay(&dir);
    let kernel = guest("hello");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &format!("path={ov},format=qcow2"),
        ],
        60,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("thinvm: disk vda: the guest never looked for it")
            && stderr.contains("--acpi on"),
        "{stderr}"
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
            &format!("path={ov},format=qcow2,readonly=on,serial=blk-ro"),
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

/// The ephemeral overlays in `tmp` (the TMPDIR the test gives its thinvm: tests running
/// beside it start ephemeral VMs of their own).
fn leftover_overlays(tmp: &std::path::Path) -> usize {
    std::fs::read_dir(tmp)
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
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let n0 = leftover_overlays(&tmp);
    let kernel = guest("blk");
    // The guest writes, zeroes, discards: all into the temporary overlay.
    let out = Command::new("timeout")
        .args(["-s", "KILL", "60"])
        .arg(thinvm())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--ephemeral",
            "--disk",
            &format!("path={ov},format=qcow2,serial=blk-eph"),
        ])
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    checks_passed(&text(&out.stdout));
    assert_eq!(checksum(&ov), before, "base image changed");
    assert_eq!(leftover_overlays(&tmp), n0, "overlay left behind");

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
        .arg(format!("path={ov},format=qcow2"))
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .env("TMPDIR", &tmp)
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
    assert_eq!(
        leftover_overlays(&tmp),
        n0 + 1,
        "overlay exists while running"
    );
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(
        leftover_overlays(&tmp),
        n0,
        "overlay left behind after SIGTERM"
    );
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

/// Runs `script` (sh) in a private mount namespace (`unshare -rm`), where it may mount a
/// small tmpfs; `None` (after a SKIPPED line) where that is not allowed.
fn in_mount_namespace(test: &str, script: &str) -> Option<std::process::Output> {
    let probe = Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "d=$(mktemp -d) && mount -t tmpfs -o size=1M t $d && umount $d && rmdir $d",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIPPED {test}: no private tmpfs mounts here ({other:?})");
            return None;
        }
    }
    Some(
        Command::new("timeout")
            .args(["-s", "KILL", "120", "unshare", "-rm", "sh", "-c", script])
            .output()
            .unwrap(),
    )
}

/// The guest fills a disk whose overlay lives on a nearly full 8 MiB tmpfs (the guest writes 4 MiB). With
/// `werror=enospc` (the default) its writes are held, not failed (thinvm's log and the
/// console go elsewhere: they could not be written there either); `free` decides what the
/// test does then: free the space (writing resumes, the guest finishes, thinvm exits 0) or
/// stop thinvm with SIGTERM (it exits at once, 143). Either way the overlay checks clean
/// (no leaks either) and the blocks written before the file system filled up read back.
fn full_host_fs(test: &str, free: bool) {
    if !kvm_or_skip(test) {
        return;
    }
    let dir = TempDir::new("enospc");
    let base = dir.join("base.raw").display().to_string();
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "raw", &base, "16M"]).0,
        0
    );
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let then = if free {
        "rm -f $M/filler; wait $pid; echo \"EXIT code=$?\""
    } else {
        "t0=$(date +%s%N); kill -TERM $pid; wait $pid; echo \"EXIT code=$? ms=$(( ($(date +%s%N) - t0) / 1000000 ))\""
    };
    let script = format!(
        r#"M={mnt}
L={logs}
mount -t tmpfs -o size=8M thinvm-test $M || exit 77
qemu-img create -q -f qcow2 -b {base} -F raw $M/ov.qcow2
avail=$(df --output=avail -B1 $M | tail -1)
head -c $((avail - 640 * 1024)) /dev/zero > $M/filler
{thinvm} run --kernel {kernel} --cmdline mode=fill --serial file=$L/console --disk path=$M/ov.qcow2,format=qcow2 >$L/vmm.log 2>&1 &
pid=$!
i=0
until grep -q 'host file system is full' $L/vmm.log; do
  i=$((i + 1)); [ $i -gt 400 ] && break; sleep 0.05
done
sleep 0.5
echo "HELD blocks=$(grep -c 'BLK-FILL .* ok' $L/console) fails=$(grep -c FAIL $L/console)"
{then}
echo "DONE n=$(grep -c 'BLK-FILL done' $L/console)"
qemu-img check $M/ov.qcow2 >/dev/null 2>&1; echo "CHECK rc=$?"
qemu-io -c 'read -P 1 1M 64k' -c 'read -P 2 1088k 64k' $M/ov.qcow2 | grep -c 'verification failed' | sed 's/^/MISMATCH n=/'
cat $L/vmm.log
"#,
        mnt = mnt.display(),
        logs = dir.path().display(),
        base = base,
        thinvm = thinvm(),
        kernel = guest("blk").display(),
    );
    let Some(out) = in_mount_namespace(test, &script) else {
        return;
    };
    let stdout = text(&out.stdout);
    let all = format!("{stdout}\n{}", text(&out.stderr));
    let field = |line: &str, key: &str| -> i64 {
        stdout
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line} {key}= in:\n{all}"))
    };
    assert!(stdout.contains("host file system is full"), "{all}");
    let held_at = field("HELD", "blocks");
    assert!(
        held_at < 64,
        "every block was written on a full file system: {all}"
    );
    assert_eq!(
        field("HELD", "fails"),
        0,
        "the guest saw an I/O error: {all}"
    );
    if free {
        assert_eq!(field("EXIT", "code"), 0, "{all}");
        assert_eq!(field("DONE", "n"), 1, "the guest did not finish: {all}");
        assert!(stdout.contains("host space available again"), "{all}");
    } else {
        assert_eq!(field("EXIT", "code"), 143, "{all}");
        assert!(
            field("EXIT", "ms") < 5000,
            "thinvm took long to stop: {all}"
        );
    }
    assert_eq!(field("CHECK", "rc"), 0, "qemu-img check: {all}");
    assert_eq!(field("MISMATCH", "n"), 0, "{all}");
}

#[test]
fn a_full_host_file_system_pauses_guest_writes_until_space_returns() {
    full_host_fs(
        "a_full_host_file_system_pauses_guest_writes_until_space_returns",
        true,
    );
}

#[test]
fn thinvm_stops_at_once_while_writes_wait_for_host_space() {
    full_host_fs(
        "thinvm_stops_at_once_while_writes_wait_for_host_space",
        false,
    );
}

/// Runs the tiny guest's `mode=copy-header` on `disk` (a `--disk` value); returns
/// (exit code, stdout, stderr).
fn copy_header(disk: &str) -> (Option<i32>, String, String) {
    let kernel = guest("blk");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "mode=copy-header",
            "--disk",
            disk,
        ],
        60,
    );
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The format-probing attack (QEMU's CVE-2008-2004 class) on the host's KVM: the guest
/// copies a qcow2 header that names a host file over the start of its raw disk. Given
/// without format=, the disk stays raw (the write fails in the guest, ordinary and zero
/// writes there work). Given with format=raw, the write lands; the next boot without
/// format= is then refused, plain, read-only and --ephemeral, so the file never reaches a
/// guest.
#[test]
fn a_guest_cannot_make_its_raw_disk_name_a_host_file() {
    if !kvm_or_skip("a_guest_cannot_make_its_raw_disk_name_a_host_file") {
        return;
    }
    let dir = TempDir::new("probe-attack");
    let secret = dir.join("secret");
    std::fs::write(&secret, b"host secret: not for guests\n").unwrap();
    let (secret, header) = (
        secret.display().to_string(),
        dir.join("header.qcow2").display().to_string(),
    );
    let disk = dir.join("disk.raw").display().to_string();
    let (code, out) = qemu(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", &secret, "-F", "raw", &header, "1M",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(std::fs::metadata(&header).unwrap().len() <= 256 << 10);
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "raw", &disk, "16M"]).0,
        0
    );
    let (code, out) = qemu(&[
        "dd",
        &format!("if={header}"),
        &format!("of={disk}"),
        "bs=1M",
        "seek=1",
        "conv=notrunc",
    ]);
    assert_eq!(code, 0, "{out}");
    let info = |p: &str| {
        let (code, out) = qemu(&["qemu-img", "info", "--output=json", p]);
        assert_eq!(code, 0, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };

    // Probed: the header write fails, sector 0 keeps working, the disk stays raw.
    let (code, stdout, stderr) = copy_header(&format!("path={disk}"));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("BLK-HEADER st0=1 st1=0 magic=0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("BLK-SECTOR0 write=0 zeroes=0 readback=1"),
        "{stdout}"
    );
    assert!(stderr.contains("probing found raw"), "{stderr}");
    assert_eq!(info(&disk)["format"], "raw");

    // format=raw: the user allows it, and the disk now looks like a qcow2 image with the
    // secret as its backing file.
    let (code, stdout, stderr) = copy_header(&format!("path={disk},format=raw"));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("BLK-HEADER st0=0 st1=0 magic=1"),
        "{stdout}"
    );
    let i = info(&disk);
    assert_eq!(i["format"], "qcow2");
    assert_eq!(i["backing-filename"], secret.as_str());

    // Without format= again: refused before the guest runs, saying why and what to do.
    for disk_arg in [format!("path={disk}"), format!("path={disk},readonly=on")] {
        for ephemeral in [false, true] {
            let kernel = guest("blk");
            let mut args = vec!["run", "--kernel", kernel.to_str().unwrap()];
            if ephemeral {
                args.push("--ephemeral");
            }
            args.extend(["--disk", &disk_arg]);
            let out = run_thinvm(&args, 60);
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}\n{stderr}");
            assert!(
                !stdout.contains("thinvm-blk-guest"),
                "{args:?}: the guest ran"
            );
            assert!(stderr.contains("no format was given"), "{stderr}");
            assert!(stderr.contains(&secret), "{stderr}");
            assert!(stderr.contains("format=qcow2"), "{stderr}");
        }
    }
}

/// A `thinvm run` of the idling guest, stopped with SIGTERM when dropped.
struct SpinningVm(std::process::Child);

impl SpinningVm {
    /// Starts `thinvm run --ephemeral` of the idling guest on `disk`; returns once it idles.
    fn start(dir: &TempDir, disk: &str, tag: &str) -> SpinningVm {
        let hello = guest("hello");
        let log = dir.join(&format!("console-{tag}.txt"));
        let child = Command::new(thinvm())
            .args([
                "run",
                "--kernel",
                hello.to_str().unwrap(),
                "--cmdline",
                "mode=spin",
                "--ephemeral",
                "--disk",
            ])
            .arg(format!("path={disk},format=qcow2"))
            .arg("--serial")
            .arg(format!("file={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut vm = SpinningVm(child);
        let t0 = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("idling")
        {
            if let Some(status) = vm.0.try_wait().unwrap() {
                panic!("thinvm ended before its guest idled: {status}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "guest did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    /// Stops the VM with SIGTERM; it ends as a VM stopped by that signal does.
    fn stop(mut self) {
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        assert_eq!(self.0.wait().unwrap().code(), Some(143));
    }
}

impl Drop for SpinningVm {
    fn drop(&mut self) {
        // After stop() this finds the child reaped already; on a failed test it ends it.
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Many `--ephemeral` VMs run on one base at once, QEMU may read the base meanwhile, but
/// nobody may write it (a VM, qemu-io, another thinvm): the base is locked as QEMU locks a
/// backing file. The locks go when the VMs end.
#[test]
fn ephemeral_vms_share_their_base_and_keep_its_writers_out() {
    if !kvm_or_skip("ephemeral_vms_share_their_base_and_keep_its_writers_out") {
        return;
    }
    let dir = TempDir::new("eph-lock");
    let (base, ov) = make_overlay(&dir);
    let before = checksum(&ov);
    let first = SpinningVm::start(&dir, &ov, "a");
    let second = SpinningVm::start(&dir, &ov, "b");
    // A third VM, on the same base at the same time, runs the whole driver check.
    let kernel = guest("blk");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--ephemeral",
            "--disk",
            &format!("path={ov},format=qcow2,serial=blk-eph"),
        ],
        60,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    checks_passed(&text(&out.stdout));
    // QEMU may read the base chain, not write it.
    let (code, io) = qemu(&["qemu-io", "-r", "-c", "read -P 0x11 0 64k", &ov]);
    assert_eq!(code, 0, "{io}");
    let (code, io) = qemu(&["qemu-io", "-c", "write -P 0x22 0 64k", &ov]);
    assert_eq!(code, 1, "{io}");
    assert!(io.contains("Failed to get \"write\" lock"), "{io}");
    let (code, io) = qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 64k", &base]);
    assert_eq!(code, 1, "{io}");
    // Neither may a thinvm VM with the image as its writable disk.
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &format!("path={ov},format=qcow2"),
        ],
        60,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&ov), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    first.stop();
    second.stop();
    assert_eq!(checksum(&ov), before, "base image changed");
    // Every VM has ended: the base is free to write again.
    let (code, io) = qemu(&["qemu-io", "-c", "write -P 0x22 0 64k", &ov]);
    assert_eq!(code, 0, "{io}");
}

/// A disk that qemu-nbd serves writable is refused by `thinvm run` (exit 1, one message
/// naming the image), writable, read-only and as an `--ephemeral` base alike, and the
/// ephemeral overlay made for it is removed again.
#[test]
fn run_refuses_a_disk_qemu_nbd_is_serving() {
    if !kvm_or_skip("run_refuses_a_disk_qemu_nbd_is_serving") {
        return;
    }
    let dir = TempDir::new("nbd-lock");
    let (_base, ov) = make_overlay(&dir);
    let before = checksum(&ov);
    let _nbd = QemuNbd::hold(&dir, &["-f", "qcow2", &ov]);
    let kernel = guest("blk");
    for extra in [&[][..], &["--ephemeral"][..]] {
        for disk in [
            format!("path={ov},format=qcow2"),
            format!("path={ov},format=qcow2,readonly=on"),
        ] {
            let child = Command::new(thinvm())
                .args(["run", "--kernel", kernel.to_str().unwrap()])
                .args(extra)
                .args(["--disk", &disk])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let pid = child.id();
            let out = child.wait_with_output().unwrap();
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{extra:?} {disk}: {err}");
            assert!(err.contains(&ov), "{err}");
            assert!(err.contains("in use by another process"), "{err}");
            assert!(!text(&out.stdout).contains("BLK-CHECK"), "the guest ran");
            let prefix = format!("thinvm-ephemeral-{pid}-");
            let left = std::fs::read_dir(std::env::temp_dir())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count();
            assert_eq!(left, 0, "ephemeral overlay left behind");
        }
    }
    assert_eq!(checksum(&ov), before, "the served image changed");
}
