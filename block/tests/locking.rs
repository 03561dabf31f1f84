//! Image locking against QEMU's own processes (a paused QEMU VM with a virtio-blk disk,
//! `qemu-io` kept open on a pipe, `qemu-nbd`, `qemu-img`): thinvm and QEMU exclude each
//! other exactly as two QEMU processes do, with QEMU-against-QEMU as the oracle; the error
//! names the image; locks go away with the image and with the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use block::{DiskImage, Error, ImageFormat, OpenOptions};
use common::*;

/// One test at a time: a process spawned by one test holds copies of this process's
/// descriptors until its exec, so an image another test has just closed could look in use
/// to the QEMU process a test starts next (thinvm's own opens allow for that; QEMU does
/// not). So QEMU runs here once (`run_once`): a refusal is a refusal.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// How an image is opened, in QEMU's words: writable, `-r`, or `-r -U`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Write,
    Read,
    ForceShare,
}

const MODES: [Mode; 3] = [Mode::Write, Mode::Read, Mode::ForceShare];

impl Mode {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Mode::Write => &[],
            Mode::Read => &["-r"],
            Mode::ForceShare => &["-r", "-U"],
        }
    }
    /// `-drive` options of a QEMU VM disk opened this way.
    fn drive(self, file: &Path) -> String {
        let extra = match self {
            Mode::Write => "",
            Mode::Read => ",readonly=on",
            Mode::ForceShare => ",readonly=on,force-share=on",
        };
        format!("if=none,id=disk,file={}{extra}", file.display())
    }
    fn options(self) -> OpenOptions {
        OpenOptions {
            read_only: self != Mode::Write,
            force_share: self == Mode::ForceShare,
            ..Default::default()
        }
    }
}

/// A `qemu-io` process holding an image open: it reads commands from a pipe kept open.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
}

impl QemuIo {
    /// Starts `qemu-io ARGS` and waits until the image is open (it answers `length`); on
    /// failure returns what qemu-io printed.
    fn hold(args: &[&str]) -> Result<QemuIo, String> {
        let mut child = Command::new("qemu-io")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io (install qemu-utils)");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let _ = stdin.write_all(b"length\n");
        let _ = stdin.flush();
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if line.ends_with('\n') && line.contains("iB") {
            return Ok(QemuIo {
                child,
                stdin: Some(stdin),
                _stdout: stdout,
            });
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        Err(format!("{line}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        // End of input: qemu-io closes the image and exits.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A QEMU VM with the image as its virtio-blk disk, paused before its first instruction
/// (`-S`, TCG): QEMU's counterpart of `thinvm run`.
struct QemuVm {
    child: Child,
    _stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
}

impl QemuVm {
    /// Starts the VM and waits until QMP answers a command (the disk is open and the
    /// device realized by then); on failure returns what QEMU printed.
    fn hold(mode: Mode, file: &Path) -> Result<QemuVm, String> {
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "pc",
                "-accel",
                "tcg",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .args(["-qmp", "stdio", "-drive", &mode.drive(file)])
            .args(["-device", "virtio-blk-pci,drive=disk"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 (install qemu-system-x86)");
        let mut stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // The greeting may come before the device is realized (and a raw backing file's
        // locks depend on what the device shares); a command's answer comes only from the
        // main loop, once the machine is built.
        if let Some(input) = stdin.as_mut() {
            let _ = input
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n");
            let _ = input.flush();
        }
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&line);
            if line.contains("\"status\"") {
                return Ok(QemuVm {
                    child,
                    _stdin: stdin,
                    _stdout: stdout,
                });
            }
        }
        let line = seen;
        drop(stdin);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        Err(format!("{line}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `qemu-nbd --fork` server holding an image open until dropped.
struct QemuNbd(i32);

impl QemuNbd {
    fn hold(dir: &TempDir, args: &[&str]) -> Result<QemuNbd, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid_file = dir.path().join(format!("nbd-{n}.pid"));
        let sock = dir.path().join(format!("nbd-{n}.sock"));
        let (code, out, err) = run(
            "qemu-nbd",
            &[
                &["--fork", "--pid-file", s(&pid_file), "-k", s(&sock)],
                args,
            ]
            .concat(),
        );
        if code != 0 {
            return Err(format!("{out}{err}"));
        }
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        Ok(QemuNbd(pid.trim().parse().unwrap()))
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: signalling the qemu-nbd daemon this test started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

/// Whether `qemu-io [-r [-U]] -c length FILE` can open the image; with its output.
fn qemu_io_opens(mode: Mode, file: &Path) -> (bool, String) {
    let (code, out, err) = run_once(
        "qemu-io",
        &[mode.qemu_args(), &["-c", "length", s(file)]].concat(),
    );
    (code == 0, format!("{out}{err}"))
}

fn thinvm_open(mode: Mode, file: &Path) -> block::Result<Box<dyn DiskImage>> {
    // The format is given, as for any overlay (a probed image may not name a backing file).
    let format = if file.extension().is_some_and(|e| e == "raw") {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    };
    block::open(
        file,
        &OpenOptions {
            format: Some(format),
            ..mode.options()
        },
    )
}

/// base.qcow2 (or base.raw) with data, and two overlays on it, ov.qcow2 and ov2.qcow2.
struct Chain {
    dir: TempDir,
    base: PathBuf,
    ov: PathBuf,
    ov2: PathBuf,
}

fn chain(tag: &str, raw_base: bool) -> Chain {
    let dir = temp_dir(tag);
    let fmt = if raw_base { "raw" } else { "qcow2" };
    let base = dir.path().join(format!("base.{fmt}"));
    ok("qemu-img", &["create", "-q", "-f", fmt, s(&base), "4M"]);
    ok(
        "qemu-io",
        &["-f", fmt, "-c", "write -P 0x5a 0 1M", s(&base)],
    );
    let ov = dir.path().join("ov.qcow2");
    let ov2 = dir.path().join("ov2.qcow2");
    for o in [&ov, &ov2] {
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&base),
                "-F",
                fmt,
                s(o),
            ],
        );
    }
    Chain { dir, base, ov, ov2 }
}

/// A lock conflict on `path`, with what the message must tell the user: the image, and
/// either that another process uses it and how to inspect it anyway, or (`here`) that this
/// process has it open already.
fn assert_locked_by(
    r: block::Result<Box<dyn DiskImage>>,
    path: &Path,
    permission: &str,
    shared: bool,
    here: bool,
) {
    let e = match r {
        Err(e) => e,
        Ok(_) => panic!("{} opened although it is in use", path.display()),
    };
    let msg = e.to_string();
    let Error::Locked {
        path: p,
        permission: what,
        shared: sh,
        in_this_process,
    } = e
    else {
        panic!("expected a lock conflict on {}, got: {msg}", path.display())
    };
    assert_eq!(p, path, "{msg}");
    assert_eq!(
        (what, sh, in_this_process),
        (permission, shared, here),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    if here {
        assert!(msg.contains("already open in this process"), "{msg}");
    } else {
        assert!(msg.contains("another process"), "{msg}");
        assert!(msg.contains("QEMU"), "{msg}");
        assert!(msg.contains("-U"), "{msg}");
    }
}

/// A conflict with another process.
fn assert_locked(
    r: block::Result<Box<dyn DiskImage>>,
    path: &Path,
    permission: &str,
    shared: bool,
) {
    assert_locked_by(r, path, permission, shared, false)
}

/// Every combination of holder (a QEMU VM or thinvm, holding ov as a disk in each mode) and
/// opener (qemu-io or thinvm, opening ov, its base or the sibling overlay ov2 in each mode):
/// the outcome with thinvm on either side is QEMU's outcome with QEMU on both sides.
///
/// (The holder is a VM, not qemu-io: over a raw base the two differ in QEMU itself. qemu-io
/// shares writes of the image it opens, and a raw backing file passes that on, so a
/// qemu-io writing an overlay lets others write its raw base; a VM's disk does not.)
fn matches_qemu_between_qemus(raw_base: bool) {
    let c = chain("lock-matrix", raw_base);
    let targets = [("ov", &c.ov), ("base", &c.base), ("ov2", &c.ov2)];
    let mut table = String::new();
    for holder in MODES {
        // The oracle: a QEMU VM holding, qemu-io opening.
        let qemu_holder = QemuVm::hold(holder, &c.ov).unwrap();
        let mut oracle = Vec::new();
        for (name, t) in targets {
            for opener in MODES {
                let (opened, out) = qemu_io_opens(opener, t);
                oracle.push(opened);
                table.push_str(&format!(
                    "holder {holder:?} on ov, opener {opener:?} on {name}: {}\n",
                    if opened { "opens" } else { "refused" }
                ));
                if !opened {
                    assert!(out.contains("lock"), "{out}");
                }
            }
        }
        // QEMU holding, thinvm opening.
        let mut i = 0;
        for (name, t) in targets {
            for opener in MODES {
                let r = thinvm_open(opener, t);
                assert_eq!(
                    r.is_ok(),
                    oracle[i],
                    "QEMU VM holding ov {holder:?}, thinvm opening {name} {opener:?}: {:?}\n{table}",
                    r.err().map(|e| e.to_string())
                );
                if let Err(e) = r {
                    assert!(matches!(e, Error::Locked { .. }), "{e}");
                }
                i += 1;
            }
        }
        drop(qemu_holder);

        // thinvm holding, QEMU and thinvm opening.
        let thinvm_holder = thinvm_open(holder, &c.ov).unwrap();
        let mut i = 0;
        for (name, t) in targets {
            for opener in MODES {
                let (opened, out) = qemu_io_opens(opener, t);
                assert_eq!(
                    opened, oracle[i],
                    "thinvm holding ov {holder:?}, qemu-io opening {name} {opener:?}: {out}\n{table}"
                );
                let r = thinvm_open(opener, t);
                assert_eq!(
                    r.is_ok(),
                    oracle[i],
                    "thinvm holding ov {holder:?}, thinvm opening {name} {opener:?}: {:?}\n{table}",
                    r.err().map(|e| e.to_string())
                );
                i += 1;
            }
        }
        drop(thinvm_holder);
    }
    eprintln!("{table}");
    // QEMU's rules as the table must show them (so an oracle that refuses nothing, or
    // everything, cannot pass): a writer refuses other writers and readers of its file and
    // writers of its backing file; readers of one file coexist; -U readers pass.
    for line in [
        "holder Write on ov, opener Write on ov: refused",
        "holder Write on ov, opener Read on ov: refused",
        "holder Write on ov, opener ForceShare on ov: opens",
        "holder Write on ov, opener Write on base: refused",
        "holder Write on ov, opener Read on base: opens",
        "holder Write on ov, opener Write on ov2: opens",
        "holder Read on ov, opener Write on ov: refused",
        "holder Read on ov, opener Read on ov: opens",
        "holder Read on ov, opener Write on base: refused",
        "holder ForceShare on ov, opener Write on ov: opens",
    ] {
        assert!(table.contains(line), "expected '{line}' in\n{table}");
    }
}

#[test]
fn thinvm_and_qemu_exclude_each_other_as_two_qemus_do() {
    let _serial = serial();
    matches_qemu_between_qemus(false);
}

#[test]
fn thinvm_and_qemu_exclude_each_other_as_two_qemus_do_over_a_raw_base() {
    let _serial = serial();
    matches_qemu_between_qemus(true);
}

#[test]
fn qemu_nbd_serving_an_overlay_keeps_thinvm_writers_and_readers_out() {
    let _serial = serial();
    let c = chain("lock-nbd", false);
    let _nbd = QemuNbd::hold(&c.dir, &["-f", "qcow2", s(&c.ov)]).unwrap();
    assert_locked(thinvm_open(Mode::Write, &c.ov), &c.ov, "write", false);
    assert_locked(thinvm_open(Mode::Read, &c.ov), &c.ov, "write", true);
    // Read-only inspection with force-share works, through the backing chain.
    let mut img = thinvm_open(Mode::ForceShare, &c.ov).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    drop(img);
    // The image tool's entry points: info and check refuse, and pass with -U.
    let e = block::inspect::info(&c.ov).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let i = block::inspect::info_shared(&c.ov, true).unwrap();
    assert_eq!(i.virtual_size, 4 << 20);
    let e = block::inspect::check(&c.ov, None).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert_eq!(
        block::inspect::check_shared(&c.ov, None, true)
            .unwrap()
            .corruptions,
        0
    );
    assert!(matches!(
        block::inspect::check_shared(&c.ov, Some(block::inspect::RepairMode::Leaks), true),
        Err(Error::InvalidArgument(_))
    ));
    // Force-share is for reading only, as in QEMU.
    let e = block::open(
        &c.ov,
        &OpenOptions {
            force_share: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // Creating an image over it is refused before anything is truncated.
    let before = std::fs::read(&c.ov).unwrap();
    let e = block::qcow2::create(
        &c.ov,
        &block::qcow2::CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let e = block::create(
        &c.ov,
        block::ImageFormat::Raw,
        &block::qcow2::CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert_eq!(
        std::fs::read(&c.ov).unwrap(),
        before,
        "the image in use changed"
    );
}

#[test]
fn a_thinvm_writer_keeps_qemu_writers_and_readers_out() {
    let _serial = serial();
    let c = chain("lock-writer", false);
    let mut img = thinvm_open(Mode::Write, &c.ov).unwrap();
    img.write_at(0, &[0xa5; 4096]).unwrap();
    img.flush().unwrap();
    let (code, _, err) = run_once("qemu-io", &["-c", "write 0 4k", s(&c.ov)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let (code, _, err) = run_once("qemu-img", &["info", s(&c.ov)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    let (code, _, err) = run_once("qemu-img", &["check", s(&c.ov)]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("lock"), "{err}");
    let (code, _, err) = run_once("qemu-img", &["create", "-f", "qcow2", s(&c.ov), "1M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lock"), "{err}");
    // -U reads it: what thinvm flushed is there.
    ok("qemu-img", &["info", "-U", s(&c.ov)]);
    let out = ok(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0xa5 0 4k", s(&c.ov)],
    );
    assert!(!out.contains("failed"), "{out}");
    // Its backing file: readers welcome, writers refused.
    ok("qemu-io", &["-r", "-c", "read -P 0x5a 0 1M", s(&c.base)]);
    let (code, _, err) = run_once("qemu-io", &["-c", "write 0 4k", s(&c.base)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    // Another overlay on the same base is no conflict.
    ok("qemu-io", &["-c", "write -P 1 0 4k", s(&c.ov2)]);
}

#[test]
fn a_base_in_use_by_qemu_is_shared_with_readers_and_refused_to_writers() {
    let _serial = serial();
    let c = chain("lock-base", false);
    // qemu-io writes ov, so it reads base as its backing file.
    let _q = QemuIo::hold(&[s(&c.ov)]).unwrap();
    assert_locked(thinvm_open(Mode::Write, &c.base), &c.base, "write", false);
    let mut b = thinvm_open(Mode::Read, &c.base).unwrap();
    let mut ov2 = thinvm_open(Mode::Write, &c.ov2).unwrap();
    ov2.write_at(0, &[1; 512]).unwrap();
    let mut buf = [0u8; 512];
    b.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 512]);
    drop((b, ov2));
    // A writer of the base itself: thinvm cannot open an overlay on it, and the error
    // names the backing file, not the overlay.
    drop(_q);
    let _w = QemuIo::hold(&[s(&c.base)]).unwrap();
    assert_locked(thinvm_open(Mode::Write, &c.ov2), &c.base, "write", true);
    assert_locked(thinvm_open(Mode::Read, &c.ov2), &c.base, "write", true);
    thinvm_open(Mode::ForceShare, &c.ov2).unwrap();
}

#[test]
fn two_thinvm_writers_are_refused_and_readers_of_a_base_share_it() {
    let _serial = serial();
    let c = chain("lock-thinvm", false);
    let a = thinvm_open(Mode::Write, &c.ov).unwrap();
    assert_locked_by(thinvm_open(Mode::Write, &c.ov), &c.ov, "write", false, true);
    assert_locked_by(thinvm_open(Mode::Read, &c.ov), &c.ov, "write", true, true);
    // Many users of one base: two overlays written at once, two direct readers.
    let b = thinvm_open(Mode::Write, &c.ov2).unwrap();
    let r1 = thinvm_open(Mode::Read, &c.base).unwrap();
    let r2 = thinvm_open(Mode::Read, &c.base).unwrap();
    assert_locked_by(
        thinvm_open(Mode::Write, &c.base),
        &c.base,
        "write",
        false,
        true,
    );
    drop((a, b, r1, r2));
    // Two read-only users of one overlay.
    let r1 = thinvm_open(Mode::Read, &c.ov).unwrap();
    let r2 = thinvm_open(Mode::Read, &c.ov).unwrap();
    assert_locked_by(thinvm_open(Mode::Write, &c.ov), &c.ov, "write", false, true);
    drop((r1, r2));
}

#[test]
fn raw_images_are_locked_like_a_qemu_vm_disk() {
    let _serial = serial();
    let dir = temp_dir("lock-raw");
    let raw = dir.path().join("disk.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let img = thinvm_open(Mode::Write, &raw).unwrap();
    let (code, _, err) = run_once("qemu-io", &["-f", "raw", "-c", "write 0 4k", s(&raw)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    // `info` reads only the size of a raw file and, like qemu-img's, takes no lock.
    assert_eq!(block::inspect::info(&raw).unwrap().virtual_size, 1 << 20);
    drop(img);
    let _q = QemuIo::hold(&["-f", "raw", s(&raw)]).unwrap();
    assert_locked(thinvm_open(Mode::Write, &raw), &raw, "write", true);
    assert_locked(thinvm_open(Mode::Read, &raw), &raw, "write", true);
    thinvm_open(Mode::ForceShare, &raw).unwrap();
}

#[test]
fn locks_go_with_the_image() {
    let _serial = serial();
    let c = chain("lock-drop", false);
    for _ in 0..3 {
        let mut img = thinvm_open(Mode::Write, &c.ov).unwrap();
        img.write_at(0, &[7; 512]).unwrap();
        drop(img);
    }
    // Closed: QEMU may write it and its base again.
    ok(
        "qemu-io",
        &["-c", "read -P 7 0 512", "-c", "write 0 4k", s(&c.ov)],
    );
    ok("qemu-io", &["-c", "write 1M 4k", s(&c.base)]);
    // A refused open leaves nothing behind either.
    let q = QemuIo::hold(&[s(&c.ov)]).unwrap();
    assert!(thinvm_open(Mode::Write, &c.ov).is_err());
    drop(q);
    thinvm_open(Mode::Write, &c.ov).unwrap();
}

/// Run as a child process by `locks_go_when_the_process_dies`: holds the image named by
/// `THINVM_LOCK_HOLDER` writable until killed.
#[test]
#[ignore = "helper process of locks_go_when_the_process_dies"]
fn lock_holder_process() {
    let Some(p) = std::env::var_os("THINVM_LOCK_HOLDER") else {
        return;
    };
    let _img = thinvm_open(Mode::Write, Path::new(&p)).unwrap();
    println!("LOCK-HELD");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn locks_go_when_the_process_dies() {
    let _serial = serial();
    let c = chain("lock-death", false);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_holder_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("THINVM_LOCK_HOLDER", &c.ov)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("LOCK-HELD") {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "holder ended early");
    }
    // Another process holds it: refused, in QEMU and here.
    let (code, _, err) = run_once("qemu-io", &["-c", "write 0 4k", s(&c.ov)]);
    assert_eq!(code, 1, "{err}");
    assert_locked(thinvm_open(Mode::Write, &c.ov), &c.ov, "write", false);
    // SIGKILL: no destructor runs, the kernel drops the locks with the process.
    child.kill().unwrap();
    child.wait().unwrap();
    thinvm_open(Mode::Write, &c.ov).unwrap();
    ok("qemu-io", &["-c", "write 0 4k", s(&c.ov)]);
}

/// Another thread spawning processes all the while: each child holds copies of this
/// process's descriptors until its exec, among them (for a moment) an image just closed
/// here, with its locks. Reopening the image must not take that for another user.
#[test]
fn reopening_while_another_thread_spawns_processes_is_no_conflict() {
    let _serial = serial();
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = chain("lock-spawn", false);
    let stop = Arc::new(AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                Command::new("true").status().unwrap();
                n += 1;
            }
            n
        })
    };
    let mut refused = Vec::new();
    for i in 0..300 {
        let mode = [Mode::Write, Mode::Read][i % 2];
        match thinvm_open(mode, &c.ov) {
            Ok(img) => drop(img),
            Err(e) => refused.push(e.to_string()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let spawned = spawner.join().unwrap();
    assert!(spawned > 0);
    assert!(
        refused.is_empty(),
        "{} of 300 opens refused: {:?}",
        refused.len(),
        refused.first()
    );
}
