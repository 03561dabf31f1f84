//! `thinvm run` with the project's tiny guest on the host's KVM (seconds): serial output,
//! a LAPIC timer interrupt, and every way a VM ends, with the documented exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn kernel() -> String {
    guest("hello").to_str().unwrap().to_string()
}

#[test]
fn prints_takes_an_interrupt_and_resets() {
    if !kvm_or_skip("prints_takes_an_interrupt_and_resets") {
        return;
    }
    let out = run_thinvm(&["run", "--kernel", &kernel()], 30);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        stdout.contains("thinvm-test-guest: hello"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("timer interrupt received"), "{stdout}");
    // KVM emulates the TSC-deadline timer mode: the guest is told (CPUID 1 ECX bit 24), as
    // QEMU, Firecracker and Cloud Hypervisor tell theirs.
    assert!(
        stdout.contains("thinvm-test-guest: tsc-deadline timer"),
        "{stdout}"
    );
    assert!(stdout.contains("requesting reset"), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("guest requested a reset"), "{stderr}");
}

#[test]
fn halted_vcpus_end_the_vm_as_poweroff() {
    if !kvm_or_skip("halted_vcpus_end_the_vm_as_poweroff") {
        return;
    }
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--cmdline",
            "mode=halt",
            "--cpus",
            "2",
        ],
        30,
    );
    assert!(text(&out.stdout).contains("halting"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("guest powered off"));
}

/// Halt detection leaves a running guest alone: no vCPU is kicked out of `KVM_RUN` while
/// one of them runs (2 s here, where kicking at every 250 ms tick made 8 or more kicks);
/// once every vCPU halts with interrupts off the VM still ends as a poweroff.
#[test]
fn halt_detection_does_not_interrupt_a_running_guest() {
    if !kvm_or_skip("halt_detection_does_not_interrupt_a_running_guest") {
        return;
    }
    let started = Instant::now();
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--cmdline",
            "mode=busy busyticks=200",
            "--cpus",
            "2",
            "--log-level",
            "debug",
        ],
        60,
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("thinvm-test-guest: busy"), "{stdout}");
    assert!(stdout.contains("halting"), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let kicks = stderr.matches("halt detection: kicking").count();
    // Seeing the halt takes three looks after the vCPUs stop: idle, kicked, halted twice.
    assert!(
        (1..=4).contains(&kicks),
        "{kicks} kicks for a guest that ran 2 s and then halted:\n{stderr}"
    );
}

#[test]
fn triple_fault_exits_with_code_2() {
    if !kvm_or_skip("triple_fault_exits_with_code_2") {
        return;
    }
    let out = run_thinvm(
        &["run", "--kernel", &kernel(), "--cmdline", "mode=triple"],
        30,
    );
    let stderr = text(&out.stderr);
    // On this kind of host the page fault may be hit inside the host's emulator instead.
    match out.status.code() {
        Some(2) => assert!(stderr.contains("triple fault"), "{stderr}"),
        Some(3) => assert!(stderr.contains("emulation failure"), "{stderr}"),
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
}

#[test]
fn emulation_failures_report_rip_and_instruction_bytes() {
    if !kvm_or_skip("emulation_failures_report_rip_and_instruction_bytes") {
        return;
    }
    let out = run_thinvm(
        &["run", "--kernel", &kernel(), "--cmdline", "mode=cx16"],
        30,
    );
    let stderr = text(&out.stderr);
    match out.status.code() {
        // Software-nested host: the emulator cannot run cmpxchg16b.
        Some(3) => {
            assert!(
                stderr.contains("emulation failure on vCPU 0 at RIP 0x"),
                "{stderr}"
            );
            assert!(stderr.contains("f0 48 0f c7"), "{stderr}");
        }
        // Hardware KVM: the instruction simply runs.
        Some(0) => assert!(text(&out.stdout).contains("cmpxchg16b ok 3"), "{stderr}"),
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
}

fn stop_with_signal(sig: i32, expect: i32, seccomp: &str) {
    let dir = TempDir::new("signal");
    let log = dir.join("console.txt");
    let mut child = Command::new(thinvm())
        .args([
            "run",
            "--kernel",
            &kernel(),
            "--cmdline",
            "mode=spin",
            "--cpus",
            "2",
            "--seccomp",
            seccomp,
            "--serial",
        ])
        .arg(format!("file={}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("idling")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sending a signal to our child process.
    unsafe { libc::kill(child.id() as i32, sig) };
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "thinvm did not stop promptly"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(expect), "{err}");
    assert!(err.contains("stopped by signal"), "{err}");
}

#[test]
fn sigterm_and_sigint_stop_the_vm_promptly() {
    if !kvm_or_skip("sigterm_and_sigint_stop_the_vm_promptly") {
        return;
    }
    stop_with_signal(libc::SIGTERM, 143, "on");
    stop_with_signal(libc::SIGINT, 130, "off");
}

/// (thread name, seccomp mode, number of filters) of every thread of process `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let (Ok(status), Ok(comm)) = (
            std::fs::read_to_string(dir.join("status")),
            std::fs::read_to_string(dir.join("comm")),
        ) else {
            continue; // the thread just ended
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().parse::<u32>().unwrap())
                .unwrap_or_else(|| panic!("no {k} in {status}"))
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

/// Every thread of a running thinvm -- main, vCPUs, the disk's worker and the image crate's
/// I/O threads -- runs under exactly one seccomp filter (mode 2); with --seccomp off, none.
fn threads_confined(seccomp: &str, aio: &str) -> Vec<(String, u32, u32)> {
    let dir = TempDir::new("confined");
    let log = dir.join("console.txt");
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut child = Command::new(thinvm())
        .args([
            "run",
            "--kernel",
            &kernel(),
            "--cmdline",
            "mode=spin",
            "--cpus",
            "2",
            "--seccomp",
            seccomp,
            "--disk",
        ])
        .arg(format!("path={},format=raw,aio={aio}", disk.display()))
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let want = if seccomp == "on" { 2 } else { 0 };
    let threads = loop {
        // The main thread confines itself once set up, the vCPUs as they start.
        let ready = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("idling");
        let threads = thread_seccomp(child.id());
        if ready && threads.iter().all(|t| t.1 == want) {
            break threads;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not every thread is confined: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: signalling our child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(!err.contains("seccomp"), "{err}");
    threads
}

#[test]
fn every_thread_runs_under_its_seccomp_filter() {
    if !kvm_or_skip("every_thread_runs_under_its_seccomp_filter") {
        return;
    }
    // aio=threads: the I/O thread pool runs too, every thread of it confined.
    let threads = threads_confined("on", "threads");
    let count = |threads: &[(String, u32, u32)], prefix: &str| {
        threads.iter().filter(|t| t.0.starts_with(prefix)).count()
    };
    assert_eq!(count(&threads, "vcpu"), 2, "{threads:?}");
    assert_eq!(count(&threads, "virtio-blk"), 1, "{threads:?}");
    assert!(count(&threads, "block-io-") >= 1, "{threads:?}");
    assert!(threads.iter().any(|t| t.0 == "thinvm"), "{threads:?}");
    assert!(threads.iter().all(|t| t.1 == 2 && t.2 == 1), "{threads:?}");
    let threads = threads_confined("off", "threads");
    assert!(threads.iter().all(|t| t.1 == 0 && t.2 == 0), "{threads:?}");
    // aio=sync (and io_uring): no I/O thread pool is started at all.
    let threads = threads_confined("on", "sync");
    assert_eq!(count(&threads, "block-io-"), 0, "{threads:?}");
    assert_eq!(count(&threads, "virtio-blk"), 1, "{threads:?}");
    assert!(threads.iter().all(|t| t.1 == 2 && t.2 == 1), "{threads:?}");
}

#[test]
fn serial_to_file_and_none() {
    if !kvm_or_skip("serial_to_file_and_none") {
        return;
    }
    let dir = TempDir::new("serial");
    let log = dir.join("out.txt");
    let out = run_thinvm(
        &[
            "run",
            "--kernel",
            &kernel(),
            "--serial",
            &format!("file={}", log.display()),
        ],
        30,
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).is_empty());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("timer interrupt received"));
    let out = run_thinvm(&["run", "--kernel", &kernel(), "--serial", "none"], 30);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("hello"));
}

#[test]
fn validation_errors_are_one_clear_line() {
    let dir = TempDir::new("errors");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let k = kernel();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "cannot read",
        ),
        (
            vec!["--kernel".into(), dir.path().display().to_string()],
            "not a regular file",
        ),
        (
            vec!["--kernel".into(), junk.display().to_string()],
            "neither a bzImage",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--memory".into(),
                "lots".into(),
            ],
            "not a size",
        ),
        (
            vec!["--kernel".into(), k.clone(), "--memory".into(), "1M".into()],
            "too small",
        ),
        (
            vec!["--kernel".into(), k.clone(), "--cpus".into(), "0".into()],
            "at least one",
        ),
        (
            vec!["--kernel".into(), k.clone(), "--cpus".into(), "300".into()],
            "too many",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--initrd".into(),
                "/nonexistent".into(),
            ],
            "initrd",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--disk".into(),
                "path=/nonexistent.qcow2".into(),
            ],
            "disk",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--disk".into(),
                "path=x,frob=1".into(),
            ],
            "unknown option",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--serial".into(),
                "tcp:1".into(),
            ],
            "--serial",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--log-level".into(),
                "loud".into(),
            ],
            "--log-level",
        ),
    ];
    for (args, needle) in cases {
        let mut a = vec!["run".to_string()];
        a.extend(args.clone());
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let out = run_thinvm(&refs, 30);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: '{err}' lacks '{needle}'");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn missing_or_unusable_kvm_device_says_what_to_do() {
    let k = kernel();
    let out = Command::new(thinvm())
        .args(["run", "--kernel", &k])
        .env("THINVM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not exist") && err.contains("virtualization"),
        "{err}"
    );
    let out = Command::new(thinvm())
        .args(["run", "--kernel", &k])
        .env("THINVM_KVM_DEVICE", "/dev/null")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/kvm"), "{err}");
}
