//! seccomp filters (seccompiler) for thinvm's threads, installed after setup: each thread
//! type gets only the system calls it needs. `--seccomp=off` disables them for debugging.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

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

/// The io_uring engine of the block worker (issue 13): setting up a ring, submitting and
/// reaping (io_uring_enter), registering its completion eventfd.
const BLOCK_IO_URING: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v = COMMON.to_vec();
    if kind == ThreadKind::Block {
        v.extend_from_slice(BLOCK_IO_URING);
    }
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

/// The compiled filter for a thread kind. Violations raise SIGSYS, reported by
/// [`install_violation_reporter`].
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().map(|s| (s, vec![])).collect();
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

    #[test]
    fn filters_compile() {
        for k in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Block] {
            assert!(!filter(k).unwrap().is_empty());
        }
    }
}
