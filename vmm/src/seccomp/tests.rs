//! Tests of the filters: the tables are consistent, and in a child process (this test binary
//! run again for one case) an allowed call passes while a forbidden one kills the process by
//! SIGSYS after the report line.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::rules::{Rule, Test, COMMON};
use super::*;

const KINDS: [ThreadKind; 7] = [
    ThreadKind::Vmm,
    ThreadKind::Vcpu,
    ThreadKind::Block,
    ThreadKind::VmmApi,
    ThreadKind::VcpuApi,
    ThreadKind::Vsock,
    ThreadKind::Exec,
];

/// Calls no thread may make once confined, whatever a table says.
const NEVER: &[(i64, &str)] = &[
    (libc::SYS_clone, "creating threads or processes"),
    (libc::SYS_clone3, "creating threads or processes"),
    (libc::SYS_fork, "creating processes"),
    (libc::SYS_vfork, "creating processes"),
    (libc::SYS_execve, "running programs"),
    (libc::SYS_execveat, "running programs"),
    (libc::SYS_open, "opening files"),
    (libc::SYS_openat, "opening files"),
    (libc::SYS_openat2, "opening files"),
    (libc::SYS_socket, "network and local sockets"),
    (libc::SYS_connect, "network and local sockets"),
    (libc::SYS_ptrace, "debugging other processes"),
    (
        libc::SYS_process_vm_writev,
        "writing other processes' memory",
    ),
    (
        libc::SYS_pkey_mprotect,
        "changing memory protections around the PROT_EXEC rule",
    ),
    (
        libc::SYS_memfd_create,
        "anonymous files that could be mapped executable",
    ),
    (
        libc::SYS_io_uring_setup,
        "io_uring (bypasses the filter for the calls it submits)",
    ),
    (libc::SYS_mount, "mounting"),
    (libc::SYS_kill, "signalling other processes"),
];

/// The only exceptions to [`NEVER`], each for one thread kind that exists only when its
/// feature is asked for: a snapshot creates files (`--api-socket`); the vsock device opens a
/// Unix stream to PATH_P for a guest connection and the `--exec` client connects to the VM's
/// socket (sockets only of the Unix family: see [`socket_rules_are_unix_only`]).
const EXCEPTIONS: &[(ThreadKind, i64)] = &[
    (ThreadKind::VmmApi, libc::SYS_openat),
    (ThreadKind::Vsock, libc::SYS_socket),
    (ThreadKind::Vsock, libc::SYS_connect),
    (ThreadKind::Exec, libc::SYS_socket),
    (ThreadKind::Exec, libc::SYS_connect),
];

fn all_rules(kind: ThreadKind) -> Vec<&'static Rule> {
    COMMON
        .iter()
        .chain(kind.tables().iter().flat_map(|t| t.calls.iter()))
        .collect()
}

#[test]
fn tables_are_consistent() {
    for kind in KINDS {
        let rules = all_rules(kind);
        let mut seen = HashSet::new();
        for r in &rules {
            assert!(
                !r.why.trim().is_empty(),
                "{kind:?}: {} has no why",
                r.call.name()
            );
            assert!(
                seen.insert((r.call.nr, format!("{:?}", r.args))),
                "{kind:?}: duplicate rule for {}",
                r.call.name()
            );
            // An unconditional rule would shadow the conditional ones of the same call.
            let same: Vec<_> = rules.iter().filter(|o| o.call.nr == r.call.nr).collect();
            assert!(
                same.len() == 1 || same.iter().all(|o| !o.args.is_empty()),
                "{kind:?}: {} is allowed both outright and with conditions",
                r.call.name()
            );
            if let Some((_, what)) = NEVER
                .iter()
                .find(|(nr, _)| *nr == r.call.nr && !EXCEPTIONS.contains(&(kind, r.call.nr)))
            {
                panic!("{kind:?} allows {} ({what})", r.call.name());
            }
            assert_ne!(r.call.nr, libc::SYS_ioctl, "ioctls go in the ioctl lists");
        }
        let mut requests = HashSet::new();
        for i in kind.tables().iter().flat_map(|t| t.ioctls.iter()) {
            assert!(
                !i.why.trim().is_empty(),
                "{kind:?}: ioctl {} has no why",
                i.name
            );
            assert!(
                requests.insert(i.request),
                "{kind:?}: ioctl {} twice",
                i.name
            );
            assert_ne!(i.request, ioctls::TIOCSTI, "{kind:?} allows TIOCSTI");
        }
        // Every rule that can create or change a mapping forbids PROT_EXEC.
        for r in rules
            .iter()
            .filter(|r| [libc::SYS_mmap, libc::SYS_mprotect].contains(&r.call.nr))
        {
            assert!(
                r.args.iter().any(|a| a.index == 2
                    && matches!(a.test, Test::Masked { mask, value: 0 } if mask & libc::PROT_EXEC as u64 != 0)),
                "{kind:?}: a {} rule does not forbid PROT_EXEC",
                r.call.name()
            );
        }
    }
}

#[test]
fn socket_rules_are_unix_only() {
    for kind in KINDS {
        for r in all_rules(kind)
            .iter()
            .filter(|r| r.call.nr == libc::SYS_socket)
        {
            assert!(
                r.args
                    .iter()
                    .any(|a| a.index == 0 && a.test == Test::Eq(libc::AF_UNIX as u64)),
                "{kind:?}: a socket rule allows more than AF_UNIX"
            );
        }
    }
}

#[test]
fn filters_compile_within_the_kernel_limit() {
    for kind in KINDS {
        let prog = filter(kind).unwrap();
        // BPF_MAXINSNS: the kernel refuses longer programs.
        assert!(
            !prog.is_empty() && prog.len() <= 4096,
            "{kind:?}: {}",
            prog.len()
        );
    }
}

/// The cached program of a kind is the one compiling it gives, and kinds do not mix.
#[test]
fn a_kind_is_compiled_once_and_kept_apart() {
    for kind in KINDS {
        let cached = filter(kind).unwrap();
        assert_eq!(filter(kind).unwrap(), cached, "{kind:?}");
        assert_eq!(super::compile(kind).unwrap(), cached, "{kind:?}");
    }
    let differ = KINDS
        .iter()
        .any(|&k| filter(k).unwrap() != filter(KINDS[0]).unwrap());
    assert!(differ);
}

/// Environment variable naming the case the child process runs.
const CASE_VAR: &str = "THINVM_SECCOMP_TEST_CASE";

/// What a case does once its thread is confined. Arguments are chosen so that an allowed call
/// fails harmlessly (a bad descriptor) instead of doing anything.
fn run_case(case: &str) {
    let byte = b'x';
    let page = 4096;
    // SAFETY: raw system calls on invalid descriptors, fresh anonymous mappings or null
    // pointers the kernel checks; none touches memory the test relies on.
    let rc: i64 = unsafe {
        match case {
            "tiocsti" => i64::from(libc::ioctl(-1, libc::TIOCSTI, &byte)),
            "tcsets" => i64::from(libc::ioctl(-1, libc::TCSETS, std::ptr::null::<u8>())),
            "kvm-run" => i64::from(libc::ioctl(-1, ioctls::KVM_RUN as libc::c_ulong, 0)),
            // KVM_SET_REGS: a vCPU never needs it once running.
            "kvm-set-regs" => i64::from(libc::ioctl(-1, 0x4090_ae82, 0)),
            "mmap-rw" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                i64::from(libc::munmap(p, page))
            }
            "mmap-exec" => libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "mprotect-exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                i64::from(libc::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC))
            }
            "open" => i64::from(libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY)),
            "spawn" => {
                let _ = std::thread::spawn(|| ()).join();
                0
            }
            "punch-hole" => i64::from(libc::fallocate(
                -1,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            )),
            // Collapsing a range shifts the rest of the file: no thinvm thread needs it.
            "collapse-range" => {
                i64::from(libc::fallocate(-1, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096))
            }
            "futex-requeue" => libc::syscall(
                libc::SYS_futex,
                std::ptr::null::<u32>(),
                libc::FUTEX_CMP_REQUEUE,
                1,
                0,
                std::ptr::null::<u32>(),
                0,
            ),
            "fcntl-dupfd" => i64::from(libc::fcntl(-1, libc::F_DUPFD_CLOEXEC, 3)),
            "alloc" => {
                allocation_churn();
                0
            }
            other => panic!("unknown case {other}"),
        }
    };
    println!("SURVIVED rc={rc}");
}

/// What glibc's malloc does under load in a thread: a per-thread arena that grows and
/// shrinks, large blocks mapped and unmapped, reallocs that move them.
fn allocation_churn() {
    for _ in 0..4 {
        let blocks: Vec<Vec<u8>> = (0..=u8::MAX)
            .cycle()
            .take(400)
            .map(|b| vec![b; 100 << 10])
            .collect();
        drop(blocks);
        let mut big = vec![1u8; 1 << 20];
        for _ in 0..5 {
            big.resize(big.len() * 2, 2);
        }
        drop(big);
        let small: Vec<Box<[u8; 64]>> = (0..20_000).map(|_| Box::new([3u8; 64])).collect();
        drop(small);
    }
    let map: std::collections::HashMap<u32, u32> = (0..1000).map(|i| (i, i)).collect();
    assert_eq!(map.len(), 1000);
}

/// The child side: when this test process was started for one case, confine a fresh thread
/// (glibc gives it its own malloc arena, as thinvm's threads have) and run the case there.
#[test]
fn child_process() {
    let Ok(spec) = std::env::var(CASE_VAR) else {
        return;
    };
    let (kind, case) = spec.split_once(':').unwrap();
    let kind = match kind {
        "vmm" => ThreadKind::Vmm,
        "vcpu" => ThreadKind::Vcpu,
        "block" => ThreadKind::Block,
        other => panic!("unknown kind {other}"),
    };
    let case = case.to_string();
    prepare_process().unwrap();
    let prog = filter(kind).unwrap();
    std::thread::spawn(move || {
        apply(kind, &prog).unwrap();
        run_case(&case);
    })
    .join()
    .unwrap();
}

/// Runs `case` in a child process under `kind`'s filter; returns (killed by SIGSYS, output).
fn in_child(kind: &str, case: &str) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "seccomp::tests::child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_VAR, format!("{kind}:{case}"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let killed = out.status.signal() == Some(libc::SIGSYS);
    assert!(
        killed || (out.status.success() && text.contains("SURVIVED")),
        "{kind}:{case}: neither killed by SIGSYS nor survived ({}):\n{text}",
        out.status
    );
    (killed, text)
}

#[test]
fn a_forbidden_call_kills_thinvm_by_sigsys_with_a_report() {
    let (killed, out) = in_child("vcpu", "tiocsti");
    assert!(killed, "TIOCSTI passed the vCPU filter:\n{out}");
    assert!(
        out.contains("the vCPU thread made a system call its filter forbids: ioctl, system call 16, arguments 0xffffffff 0x5412"),
        "{out}"
    );
    assert!(!out.contains("SURVIVED"), "{out}");
}

#[test]
fn each_thread_kind_allows_only_its_calls_and_arguments() {
    // (kind, case, killed)
    let cases = [
        ("vmm", "tiocsti", true),
        ("vmm", "tcsets", false),
        ("vmm", "kvm-run", true),
        ("vmm", "open", true),
        ("vcpu", "kvm-run", false),
        ("vcpu", "kvm-set-regs", true),
        ("vcpu", "tcsets", true),
        ("vcpu", "fcntl-dupfd", false),
        ("vcpu", "punch-hole", true),
        ("vcpu", "mmap-rw", false),
        ("vcpu", "mmap-exec", true),
        ("vcpu", "mprotect-exec", true),
        ("block", "punch-hole", false),
        ("block", "collapse-range", true),
        ("block", "mmap-exec", true),
        ("block", "mprotect-exec", true),
        ("block", "kvm-run", true),
        ("block", "open", true),
        ("block", "spawn", true),
        ("block", "futex-requeue", true),
        ("block", "alloc", false),
        ("vcpu", "alloc", false),
    ];
    let mut wrong = Vec::new();
    for (kind, case, expect_killed) in cases {
        let (killed, out) = in_child(kind, case);
        if killed != expect_killed {
            wrong.push(format!(
                "{kind}:{case}: {} (expected {})\n{out}",
                if killed { "killed" } else { "allowed" },
                if expect_killed { "killed" } else { "allowed" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
