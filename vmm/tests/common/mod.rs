//! Helpers of thinvm's integration tests: the binary, the tiny test guests built with gcc,
//! and KVM availability (tests skip with a visible message where /dev/kvm is missing).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn thinvm() -> &'static str {
    env!("CARGO_BIN_EXE_thinvm")
}

/// Whether /dev/kvm can be opened; prints a SKIPPED line when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Builds a tiny guest from `tests/guest/<name>.c` (plus start.S) with gcc, once.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let map = BUILT.get_or_init(Default::default);
    let mut m = map.lock().unwrap();
    if let Some(p) = m.get(name) {
        return p.clone();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guest-{name}.elf"));
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-no-pie",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Wno-unused-function",
            "-Wl,--no-warn-rwx-segments",
            "-Wl,-z,noexecstack",
            "-Wl,--build-id=none",
        ])
        .arg("-T")
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&out)
        .arg(src.join("start.S"))
        .arg(src.join(format!("{name}.c")))
        .status()
        .expect("gcc is needed to build the test guests (apt-get install gcc)");
    assert!(status.success(), "building test guest {name} failed");
    m.insert(name.to_string(), out.clone());
    out
}

/// Runs thinvm with a timeout (the test fails if the VM does not end by itself).
pub fn run_thinvm(args: &[&str], timeout_secs: u64) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("-s")
        .arg("KILL")
        .arg(timeout_secs.to_string())
        .arg(thinvm())
        .args(args)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(137),
        "thinvm {args:?} did not end within {timeout_secs}s\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A temporary directory (`tempfile`'s, named `thinvm-vmm-TAG-*`), removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("thinvm-vmm-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn join(&self, n: &str) -> PathBuf {
        self.0.path().join(n)
    }
}

/// A `qemu-nbd --fork` server holding an image open (writable unless `-r` is among the
/// arguments) until dropped: another process using the image, as QEMU locks it.
pub struct QemuNbd(i32);

impl QemuNbd {
    pub fn hold(dir: &TempDir, args: &[&str]) -> QemuNbd {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid_file = dir.join(&format!("nbd-{n}.pid"));
        let sock = dir.join(&format!("nbd-{n}.sock"));
        let out = Command::new("qemu-nbd")
            .arg("--fork")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("-k")
            .arg(&sock)
            .args(args)
            .output()
            .expect("qemu-nbd (install qemu-utils)");
        assert!(out.status.success(), "qemu-nbd: {}", text(&out.stderr));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        QemuNbd(pid.trim().parse().unwrap())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: signalling the qemu-nbd daemon the test started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

/// Runs a bash script where Linux can run; returns its stdout (asserting success).
pub fn linux(script: &str, timeout: u64) -> String {
    let out = guest_rig::run_linux_capable(script, timeout).unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

/// Runs in the rig a `script` that prints thinvm's log lines with a `VMM ` prefix. The rig's
/// emulated CPU (QEMU's TCG emulating AMD SVM, the rig kernel's KVM on it) now and then kills
/// a guest with 2 vCPUs under heavy I/O -- a triple fault with nothing on the console, or a
/// kernel panic in an interrupt handler -- or stalls it (RCU stalls until the watchdog of
/// [`linux`] stops thinvm), and QEMU microvm's guest too: the matrix workload under QEMU
/// microvm in the same rig session ended early at the NTFS cell in 1 of 2 runs (2026-12-06),
/// and QEMU's 2-vCPU fio guest stalled with RCU reports (2026-12-07). A run whose guest died
/// or hung that way (thinvm reports a triple fault or the guest's reset, or the watchdog
/// found it still running, and thinvm reported no error of its own) is shown and run again,
/// [`GUEST_RUNS`] runs in all; any other failure counts at once, and the last run counts
/// whatever happened. Every run again is also written to `rig-reruns.log` in the tests'
/// target directory, which `scripts/test` prints at its end, so a rerun that passed is
/// not hidden.
pub fn linux_guest_may_die(test: &str, script: &str, timeout: u64) -> String {
    let mut run = 1;
    loop {
        let out = linux(script, timeout);
        let died = out.contains("VMM thinvm: guest triple fault")
            || out.contains("VMM thinvm: guest requested a reset")
            || out.contains(guest_rig::HANG_MARKER);
        if !died || out.contains("THINVM-ERROR") || run == GUEST_RUNS {
            return out;
        }
        let why: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("VMM thinvm: guest") || l.starts_with(guest_rig::HANG_MARKER))
            .take(3)
            .collect();
        let note = format!(
            "{test}: run {run} of {GUEST_RUNS}: the guest died or hung (the rig's CPU, see \
             linux_guest_may_die); running it again. {}\n",
            why.join(" | ")
        );
        eprintln!("{note}What it printed:\n{out}");
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rig-reruns.log");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = std::io::Write::write_all(&mut f, note.as_bytes());
        }
        run += 1;
    }
}

/// Runs of a rig test whose guest may die of the rig's CPU, the first included (see
/// [`linux_guest_may_die`]).
pub const GUEST_RUNS: u32 = 3;

/// The fields (`key=value`) of every line starting with `prefix`.
pub fn fields(out: &str, prefix: &str) -> Vec<HashMap<String, String>> {
    out.lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The fields of the first line `KEY k=v ...` in `out`; panics with the whole output when
/// there is none.
pub fn first_line(out: &str, key: &str) -> HashMap<String, String> {
    fields(out, &format!("{key} "))
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {key} line: {out}"))
}

pub fn num(m: &HashMap<String, String>, k: &str) -> u64 {
    m.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {k} in {m:?}"))
}
