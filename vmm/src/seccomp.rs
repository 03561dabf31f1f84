//! seccomp filters (seccompiler) for thinvm's threads, installed after setup: each thread
//! type gets only the system calls it needs. `--seccomp=off` disables them for debugging.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Result, VmmError};

/// Thread kinds with their own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, shutdown, statistics, clean-up.
    Vmm,
    /// A vCPU thread: KVM_RUN and device emulation on exits.
    Vcpu,
    /// A block device worker: image I/O.
    Block,
}

/// System calls every thread needs (memory, synchronisation, signals, time, exit).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
];

fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v = COMMON.to_vec();
    match kind {
        ThreadKind::Vmm => v.extend_from_slice(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_ioctl,
            libc::SYS_timerfd_settime,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_openat,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ]),
        ThreadKind::Vcpu => v.extend_from_slice(&[libc::SYS_ioctl]),
        ThreadKind::Block => v.extend_from_slice(&[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ]),
    }
    v
}

/// `openat` for reading only (no write access, no creation, no truncation). glibc's `free()`
/// opens /proc/sys/vm/overcommit_memory (read-only, once) when it shrinks a thread's heap,
/// from whichever thread frees: seen on block threads after a stock Debian guest's heavy I/O,
/// and fixed the same way in Cloud Hypervisor (its PR 8646).
fn read_only_openat() -> Result<SeccompRule> {
    let forbidden = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    let cond = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(forbidden),
        libc::O_RDONLY as u64,
    )
    .map_err(|e| VmmError::Seccomp(format!("openat rule: {e}")))?;
    SeccompRule::new(vec![cond]).map_err(|e| VmmError::Seccomp(format!("openat rule: {e}")))
}

/// The compiled filter for a thread kind. Violations raise SIGSYS, reported by
/// [`install_violation_reporter`].
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().map(|s| (s, vec![])).collect();
    rules
        .entry(libc::SYS_openat)
        .or_insert(vec![read_only_openat()?]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| VmmError::Seccomp(format!("{kind:?} filter: {e}")))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| VmmError::Seccomp(format!("{kind:?} filter: {e}")))
}

/// Installs a filter on the calling thread.
pub fn apply(prog: &BpfProgram) -> Result<()> {
    seccompiler::apply_filter(prog).map_err(|e| VmmError::Seccomp(format!("{e}")))
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here: format the syscall number by hand.
    let mut nr: i64 = -1;
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall lives at offset
        // 24 (after signo, errno, code, padding, call address) in the x86_64 layout.
        nr = unsafe { *((info as *const u8).add(24) as *const i32) } as i64;
    }
    let mut msg = *b"thinvm: seccomp: blocked system call                    \n";
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = 37;
    for i in 0..len.min(18) {
        msg[start + i] = digits[len - 1 - i];
    }
    let end = start + len.min(18);
    msg[end] = b' ';
    let tail = b"(run with --seccomp=off to debug)\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buffers are valid.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, end + 1);
        libc::write(2, tail.as_ptr() as *const libc::c_void, tail.len());
        libc::_exit(159);
    }
}

/// Reports seccomp violations with the system call number instead of a bare SIGSYS.
pub fn install_violation_reporter() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| VmmError::Seccomp(format!("SIGSYS handler: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with `kind`'s filter applied; returns the child's exit
    /// status (as waitpid reports it).
    fn in_confined_child(kind: ThreadKind, f: fn() -> i32) -> i32 {
        let prog = filter(kind).unwrap();
        // SAFETY: the child only applies the filter and makes raw system calls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if seccompiler::apply_filter(&prog).is_ok() {
                f()
            } else {
                99
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn open_overcommit_read_only() -> i32 {
        let path = b"/proc/sys/vm/overcommit_memory\0";
        // SAFETY: a NUL-terminated path; the descriptor is closed right away.
        let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return 1;
        }
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
        0
    }

    fn open_for_writing() -> i32 {
        let path = b"/dev/null\0";
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_WRONLY) };
        i32::from(fd >= 0)
    }

    #[test]
    fn confined_threads_may_open_read_only_as_glibc_free_does_but_never_for_writing() {
        for kind in [ThreadKind::Block, ThreadKind::Vcpu, ThreadKind::Vmm] {
            let st = in_confined_child(kind, open_overcommit_read_only);
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "{kind:?}: {st:#x}"
            );
        }
        for kind in [ThreadKind::Block, ThreadKind::Vcpu] {
            let st = in_confined_child(kind, open_for_writing);
            assert!(
                libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGSYS,
                "{kind:?}: {st:#x}"
            );
        }
    }

    #[test]
    fn filters_compile() {
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Block] {
            assert!(!filter(k).unwrap().is_empty());
        }
    }
}
