//! A host file system that fills up under the guest (`werror=enospc`, QEMU's default): the
//! writes that find no space are held, not answered, and retried until space returns,
//! while reads are still served and a reset or shutdown still ends the device's work; with
//! `werror=report` they fail with IOERR. On a real (tiny tmpfs) file system, raw and qcow2:
//! the image stays valid for `qemu-img check` and every write lands once space is freed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use devices::virtio::block::{BlockConfig, WriteErrorPolicy};

const WAIT: Duration = Duration::from_secs(10);

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Writes `len` bytes of `byte` at `sector` through chain slots `3 * slot ..`; status at
/// `STATUS + slot`.
fn queue_write(vm: &Vm, ring: &Ring, slot: u16, sector: u64, byte: u8, len: u32) {
    fill(
        &vm.mem,
        DATA + 0x1_0000 * u64::from(slot),
        len as usize,
        byte,
    );
    queue_request(&vm.mem, ring, slot, slot, T_OUT, sector, len);
}

fn queue_read(vm: &Vm, ring: &Ring, slot: u16, sector: u64, len: u32) {
    queue_request(&vm.mem, ring, slot, slot, T_IN, sector, len);
}

#[test]
fn a_write_that_finds_the_host_full_waits_and_completes_when_space_returns() {
    let (mut vm, faults) = faulty_vm(block_config());
    let ring = Ring::at(0x1000, 64);
    driver_init(&mut vm, &ring, FEATURES);
    faults.no_space.store(true, Ordering::SeqCst);
    queue_write(&vm, &ring, 0, 8, 0x5a, 4096);
    kick(&mut vm);
    wait_for("the write to hit ENOSPC", || vm.stats.snapshot().held == 1);
    // Not answered, retried with backoff.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(ring.used_idx(&vm.mem), 0, "a held write was answered");
    let tries = faults.no_space_failures.load(Ordering::SeqCst);
    assert!((3..=10).contains(&tries), "{tries} attempts in 400 ms");
    // Reads go on meanwhile; a second write queues behind the first.
    queue_read(&vm, &ring, 1, 0, 512);
    queue_write(&vm, &ring, 2, 8, 0x6b, 512);
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, 1, WAIT), "the read was not served");
    assert_eq!(ring.used_elem(&vm.mem, 0), (3, 513));
    assert_eq!(read_mem(&vm.mem, DATA + 0x1_0000, 512), vec![0x22; 512]);
    assert_eq!(vm.stats.snapshot().held, 2);
    // Space returns: both writes complete, in order (the second one's byte wins).
    faults.no_space.store(false, Ordering::SeqCst);
    assert!(
        ring.wait_used(&vm.mem, 3, WAIT),
        "the held writes did not complete"
    );
    assert_eq!(
        (status_at(&vm.mem, STATUS), status_at(&vm.mem, STATUS + 2)),
        (0, 0)
    );
    let on_disk = disk_bytes(&vm.dir.join("disk.raw"), 8 * 512, 4096);
    assert_eq!(&on_disk[..512], &[0x6b; 512][..]);
    assert_eq!(&on_disk[512..], &[0x5a; 3584][..]);
    let s = vm.stats.snapshot();
    assert_eq!(
        (s.errors, s.held, s.no_space_pauses, s.writes),
        (0, 0, 1, 2)
    );
}

#[test]
fn with_werror_report_a_full_host_fails_the_write() {
    let cfg = BlockConfig {
        werror: WriteErrorPolicy::Report,
        ..block_config()
    };
    let (mut vm, faults) = faulty_vm(cfg);
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    faults.no_space.store(true, Ordering::SeqCst);
    queue_write(&vm, &ring, 0, 0, 0x5a, 4096);
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, 1, WAIT));
    assert_eq!(status_at(&vm.mem, STATUS), 1, "IOERR");
    assert_eq!(vm.stats.snapshot().errors, 1);
}

#[test]
fn held_writes_do_not_hold_up_a_reset_or_shutdown() {
    let (mut vm, faults) = faulty_vm(block_config());
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    faults.no_space.store(true, Ordering::SeqCst);
    queue_write(&vm, &ring, 0, 0, 0x5a, 4096);
    kick(&mut vm);
    wait_for("the write to be held", || vm.stats.snapshot().held == 1);
    let t0 = Instant::now();
    w(&mut vm.t, 0x70, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "reset took {:?}",
        t0.elapsed()
    );
    assert_eq!(vm.stats.snapshot().held, 0, "dropped with the activation");
    // A new activation works (reads; writes wait again while the host is full).
    assert_eq!(driver_init(&mut vm, &ring, FEATURES) & 0x40, 0);
    queue_read(&vm, &ring, 0, 0, 512);
    kick(&mut vm);
    assert!(ring.wait_used(&vm.mem, 1, WAIT));
    queue_write(&vm, &ring, 1, 0, 0x5a, 4096);
    kick(&mut vm);
    wait_for("the new write to be held", || vm.stats.snapshot().held == 1);
    let t0 = Instant::now();
    vm.t.shutdown();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t0.elapsed()
    );
    assert_eq!(ring.used_idx(&vm.mem), 1);
}

/// Runs the test `name` again in a private mount namespace with a tmpfs of `size` mounted
/// on a fresh directory, which the child gets in `THINVM_TEST_FS`. In the child: the
/// directory. In the parent: `None` after the child passed (or after a SKIPPED line where
/// namespaces or tmpfs mounts are not allowed).
fn on_small_fs(name: &str, size: &str) -> Option<PathBuf> {
    if let Ok(d) = std::env::var("THINVM_TEST_FS") {
        return Some(PathBuf::from(d));
    }
    let dir = TempDir::new("smallfs");
    let script = format!(
        "mount -t tmpfs -o size={size} thinvm-test '{}' || exit 77; exec \"$0\" --exact {name} --nocapture --test-threads=1",
        dir.path().display()
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .arg(std::env::current_exe().unwrap())
        .env("THINVM_TEST_FS", dir.path())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED {name}: cannot run unshare ({e})");
            return None;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => eprintln!("{text}"),
        Some(101) | None => panic!("{name} failed on a small file system:\n{text}"),
        _ => eprintln!("SKIPPED {name}: no private tmpfs here:\n{text}"),
    }
    None
}

/// Takes all but `leave` bytes of the file system at `dir` into `dir/filler`.
fn fill_fs(dir: &Path, leave: u64) -> PathBuf {
    // SAFETY: statvfs fills the struct it is given; the path is NUL-terminated.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let p = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(libc::statvfs(p.as_ptr(), &mut st), 0);
        st.f_bavail * st.f_frsize
    };
    let filler = dir.join("filler");
    std::fs::write(&filler, vec![0xf1u8; free.saturating_sub(leave) as usize]).unwrap();
    filler
}

fn qemu(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// 16 writes of 64 KiB (cluster i gets byte 0x40 + i) into an image on a nearly full file
/// system: held, then completed once the filler goes; a read is served meanwhile.
fn fill_up_and_free(image_path: &Path, fs: &Path) {
    // The test's own image: its format is given, as a trusting user gives it.
    let format = Some(block::probe_format(image_path).unwrap());
    let opts = block::OpenOptions {
        format,
        ..Default::default()
    };
    let image = block::open(image_path, &opts).unwrap();
    let mut vm = vm_with(image, block_config(), TempDir::new("enospc-vm"));
    let ring = Ring::at(0x1000, 64);
    driver_init(&mut vm, &ring, FEATURES);
    let filler = fill_fs(fs, 384 << 10);
    // One at a time, as a guest that waits for each write: the first ones complete (and
    // must not be lost later), then one is held; the rest queue behind it.
    let mut i = 0u16;
    while i < 16 {
        queue_write(&vm, &ring, i, 128 * u64::from(i), 0x40 + i as u8, 65536);
        kick(&mut vm);
        i += 1;
        wait_for("the write to complete or be held", || {
            ring.used_idx(&vm.mem) == i || vm.stats.snapshot().held > 0
        });
        if vm.stats.snapshot().held > 0 {
            break;
        }
    }
    assert!(i > 1 && i < 16, "held at write {i}");
    while i < 16 {
        queue_write(&vm, &ring, i, 128 * u64::from(i), 0x40 + i as u8, 65536);
        i += 1;
    }
    kick(&mut vm);
    std::thread::sleep(Duration::from_millis(300));
    let answered = ring.used_idx(&vm.mem);
    assert!(answered < 16, "all writes completed on a full file system");
    assert_eq!(vm.stats.snapshot().errors, 0, "the guest saw an error");
    queue_read(&vm, &ring, 20, 0, 4096);
    kick(&mut vm);
    assert!(
        ring.wait_used(&vm.mem, answered + 1, WAIT),
        "no read while held"
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(
        ring.wait_used(&vm.mem, 17, WAIT),
        "the held writes did not complete"
    );
    for i in 0..16u64 {
        assert_eq!(status_at(&vm.mem, STATUS + i), 0, "write {i}");
    }
    let s = vm.stats.snapshot();
    assert_eq!((s.errors, s.held, s.writes), (0, 0, 16), "{s:?}");
    assert!(s.no_space_pauses >= 1);
    drop(vm);
    let p = image_path.display().to_string();
    if p.ends_with(".qcow2") {
        let (code, out) = qemu(&["qemu-img", "check", &p]);
        // 0: clean; 3: leaked clusters only (what an update cut short leaves, like a crash).
        assert_eq!(code, 0, "qemu-img check (leaks or worse):\n{out}");
        eprintln!("qemu-img check after the full file system: exit {code}\n{out}");
    }
    let mut cmds = vec!["qemu-io".to_string()];
    for i in 0..16u64 {
        cmds.push("-c".into());
        cmds.push(format!("read -P {:#x} {} 64k", 0x40 + i, i * 65536));
    }
    cmds.push(p);
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (code, out) = qemu(&refs);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn a_full_host_file_system_pauses_qcow2_writes_until_space_returns() {
    let Some(fs) = on_small_fs(
        "a_full_host_file_system_pauses_qcow2_writes_until_space_returns",
        "4M",
    ) else {
        return;
    };
    let dir = TempDir::new("enospc-qcow2");
    let base = dir.join("base.raw").display().to_string();
    let ov = fs.join("ov.qcow2");
    let o = ov.display().to_string();
    assert_eq!(
        qemu(&["qemu-img", "create", "-q", "-f", "raw", &base, "4M"]).0,
        0
    );
    assert_eq!(
        qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", &base]).0,
        0
    );
    let (code, out) = qemu(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &o,
    ]);
    assert_eq!(code, 0, "{out}");
    fill_up_and_free(&ov, &fs);
    drop(dir);
}

#[test]
fn a_full_host_file_system_pauses_raw_writes_until_space_returns() {
    let Some(fs) = on_small_fs(
        "a_full_host_file_system_pauses_raw_writes_until_space_returns",
        "4M",
    ) else {
        return;
    };
    let img = fs.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    fill_up_and_free(&img, &fs);
}

#[test]
fn a_queue_full_of_held_writes_drains_when_space_returns() {
    let (mut vm, faults) = faulty_vm(block_config());
    let ring = Ring::at(0x1000, 16);
    driver_init(&mut vm, &ring, FEATURES);
    faults.no_space.store(true, Ordering::SeqCst);
    // The whole queue: the same write 16 times.
    queue_write(&vm, &ring, 0, 0, 0x5a, 4096);
    for _ in 1..16 {
        ring.publish(&vm.mem, 0);
    }
    kick(&mut vm);
    wait_for("the queue to be held", || vm.stats.snapshot().held == 16);
    // 16 more, without a notification (the device has turned them off while it cannot take
    // any more chains); then space returns.
    for _ in 0..16 {
        ring.publish(&vm.mem, 0);
    }
    faults.no_space.store(false, Ordering::SeqCst);
    assert!(
        ring.wait_used(&vm.mem, 32, WAIT),
        "{} of 32 answered",
        ring.used_idx(&vm.mem)
    );
    assert_eq!(vm.stats.snapshot().writes, 32);
}
