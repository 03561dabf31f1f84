//! The seccomp rules, as data: per thread kind, the system calls a thread may make once its
//! filter is installed, with the arguments it may pass, and for each one who needs it and why.
//! Anything else stops thinvm with SIGSYS (see `report.rs`).
//!
//! How to extend: add a [`Rule`] (or an [`Ioctl`]) to the table of the thread kind that makes
//! the call, with a `why` that names the code and the reason. Prefer argument conditions over
//! a bare call. The tests in `mod.rs` refuse duplicate or shadowed rules, an empty `why`, and
//! any rule for the calls in `mod.rs`'s never-allowed list (thread creation, exec, opening
//! files, sockets, ...). E.g. an io_uring block engine adds `io_uring_setup`, `io_uring_enter`
//! and `io_uring_register` (and the `MAP_SHARED | MAP_POPULATE` mapping of its rings, without
//! `PROT_EXEC`) to [`BLOCK`].

use super::ioctls;

/// A system call: its number and its name (for reports and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub nr: i64,
    name: &'static str,
}

impl Call {
    /// The name without libc's `SYS_` prefix.
    pub fn name(&self) -> &'static str {
        self.name.trim_start_matches("SYS_")
    }
}

/// `call!(SYS_x)`: the call `libc::SYS_x`, named.
macro_rules! call {
    ($sys:ident) => {
        Call {
            nr: libc::$sys,
            name: stringify!($sys),
        }
    };
}

/// How much of an argument is compared: the kernel reads `int` and `unsigned int` arguments
/// as 32 bits (the upper half of the register is ignored), `unsigned long` ones as 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    Bits32,
    Bits64,
}

/// What an argument must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// Equal to this value.
    Eq(u64),
    /// Equal to `value` in the bits of `mask`.
    Masked { mask: u64, value: u64 },
    /// The vCPU kick signal (a real-time signal, known only at run time).
    KickSignal,
}

/// A condition on one argument (0-based, as in the system call's prototype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    pub index: u8,
    pub width: Width,
    pub test: Test,
}

/// A 32-bit argument equal to `value`.
const fn int(index: u8, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits32,
        test: Test::Eq(value as u64),
    }
}

/// A 32-bit argument equal to `value` in the bits of `mask`.
const fn int_masked(index: u8, mask: u64, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits32,
        test: Test::Masked {
            mask,
            value: value as u64,
        },
    }
}

/// A 64-bit argument equal to `value`.
const fn ulong(index: u8, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits64,
        test: Test::Eq(value as u64),
    }
}

/// A 64-bit argument with no bit outside `allowed` set.
const fn ulong_within(index: u8, allowed: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits64,
        test: Test::Masked {
            mask: !(allowed as u64),
            value: 0,
        },
    }
}

/// A 32-bit argument equal to the vCPU kick signal.
const fn kick_signal(index: u8) -> Arg {
    Arg {
        index,
        width: Width::Bits32,
        test: Test::KickSignal,
    }
}

/// One allowed system call: the call, the conditions on its arguments (all must hold; none:
/// any arguments), and who makes it and why.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub call: Call,
    pub args: &'static [Arg],
    /// Documentation kept with the rule (the tests require it).
    #[allow(dead_code)]
    pub why: &'static str,
}

/// `allow!(SYS_x, "why")` or `allow!(SYS_x [conditions...], "why")`.
macro_rules! allow {
    ($sys:ident, $why:literal) => {
        Rule {
            call: call!($sys),
            args: &[],
            why: $why,
        }
    };
    ($sys:ident [$($arg:expr),+ $(,)?], $why:literal) => {
        Rule {
            call: call!($sys),
            args: &[$($arg),+],
            why: $why,
        }
    };
}

/// One allowed ioctl request (the `ioctl` system call with this request number).
#[derive(Clone, Copy, Debug)]
pub struct Ioctl {
    pub request: u64,
    pub name: &'static str,
    /// Documentation kept with the rule (the tests require it).
    #[allow(dead_code)]
    pub why: &'static str,
}

/// `ioctl!(REQUEST, "why")` for a request number in `ioctls.rs`.
macro_rules! ioctl {
    ($req:ident, $why:literal) => {
        Ioctl {
            request: ioctls::$req,
            name: stringify!($req),
            why: $why,
        }
    };
}

/// The rules of one thread kind (in addition to [`COMMON`]).
#[derive(Clone, Copy, Debug)]
pub struct Table {
    pub calls: &'static [Rule],
    pub ioctls: &'static [Ioctl],
}

/// `futex` operations without the PRIVATE and CLOCK_REALTIME flags.
const FUTEX_CMD_MASK: u64 = !((libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u64);
/// Memory protections a mapping may have: never `PROT_EXEC` (nor any other bit).
const PROT_RW: i64 = (libc::PROT_READ | libc::PROT_WRITE) as i64;
/// The only kind of mapping made after start: private anonymous memory.
const MAP_ANON: i64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as i64;

/// Calls every thread makes: the Rust runtime, glibc (malloc, locks, thread exit, abort) and
/// the SIGSYS reporter.
pub const COMMON: &[Rule] = &[
    allow!(SYS_futex [int_masked(1, FUTEX_CMD_MASK, libc::FUTEX_WAIT as i64)],
        "glibc's internal locks (malloc arenas, stdio) wait"),
    allow!(SYS_futex [int_masked(1, FUTEX_CMD_MASK, libc::FUTEX_WAKE as i64)],
        "wakes waiters of Rust's locks, channels and thread parking, and of glibc's locks"),
    allow!(SYS_futex [int_masked(1, FUTEX_CMD_MASK, libc::FUTEX_WAIT_BITSET as i64)],
        "Rust's locks, channels and thread parking wait (timeouts on CLOCK_MONOTONIC); glibc's pthread_join waits for a thread's end"),
    allow!(SYS_write,
        "log lines to stderr; eventfd signals (interrupts, exit and reset events); guest console output"),
    allow!(SYS_close, "drops descriptors: duplicated eventfds, a vCPU's fd when its thread ends, images at shutdown"),
    allow!(SYS_exit, "a thread ends"),
    allow!(SYS_exit_group, "the process ends (main returns; glibc's abort as a last resort)"),
    allow!(SYS_rt_sigreturn, "returns from a signal handler (the vCPU kick, the SIGSYS reporter)"),
    allow!(SYS_rt_sigprocmask,
        "glibc blocks signals around pthread_kill and raise and while a thread ends; the SIGSYS reporter unblocks SIGSYS"),
    allow!(SYS_sigaltstack, "Rust's runtime removes a thread's alternate signal stack when the thread ends"),
    allow!(SYS_rt_sigaction [int(0, libc::SIGABRT as i64)],
        "abort() (a panic that aborts) restores SIGABRT's default action"),
    allow!(SYS_rt_sigaction [int(0, libc::SIGSYS as i64)],
        "the SIGSYS reporter restores SIGSYS's default action, so that thinvm dies by the signal"),
    allow!(SYS_tgkill [int(2, libc::SIGABRT as i64)], "abort() raises SIGABRT"),
    allow!(SYS_tgkill [int(2, libc::SIGSYS as i64)], "the SIGSYS reporter raises SIGSYS again, with the default action"),
    allow!(SYS_getpid, "glibc's raise and pthread_kill, and the SIGSYS reporter, address tgkill"),
    allow!(SYS_gettid, "glibc's raise and the SIGSYS reporter address tgkill to the calling thread"),
    allow!(SYS_mmap [ulong(3, MAP_ANON), ulong_within(2, PROT_RW)],
        "glibc malloc: large blocks, read/write (never executable)"),
    allow!(SYS_mmap [ulong(3, MAP_ANON | libc::MAP_NORESERVE as i64), ulong_within(2, PROT_RW)],
        "glibc malloc reserves a new per-thread arena (PROT_NONE, MAP_NORESERVE)"),
    allow!(SYS_mprotect [ulong_within(2, PROT_RW)],
        "glibc malloc grows a per-thread arena inside its reservation: read/write, never executable"),
    allow!(SYS_munmap,
        "glibc frees large blocks and trims arena reservations; a vCPU's kvm_run mapping and a thread's signal stack go when it ends"),
    allow!(SYS_mremap [ulong(3, libc::MREMAP_MAYMOVE as i64)],
        "glibc realloc of a large block (the mapping keeps its protection: never executable)"),
    allow!(SYS_madvise [int(2, libc::MADV_DONTNEED as i64)],
        "glibc gives back the unused stack of a thread that ends"),
    allow!(SYS_brk, "glibc malloc grows the main heap"),
    allow!(SYS_getrandom, "Rust's HashMap seeds its hasher (RandomState), once per thread"),
    allow!(SYS_sched_getaffinity,
        "glibc malloc sizes its arena limit from the usable CPUs, once, when a thread first needs an arena"),
    allow!(SYS_sched_yield, "rayon's idle I/O threads and Rust's channels spin before they sleep"),
    allow!(SYS_clock_gettime, "the time where the vDSO cannot read it (Instant::now, log time stamps)"),
    allow!(SYS_restart_syscall, "the kernel resumes an interrupted poll, sleep or futex wait with it"),
];

/// The main thread once the VM runs: the event loop, vCPU kicks, shutdown and clean-up.
pub const VMM: Table = Table {
    calls: &[
        allow!(SYS_read,
            "event loop: the signalfd (SIGINT, SIGTERM, SIGHUP, SIGUSR1), timerfds (halt ticks, statistics), exit and reset eventfds, console input"),
        allow!(SYS_epoll_wait, "event loop (event-manager) waits"),
        allow!(SYS_epoll_ctl, "event loop stops watching stdin at its end or hang-up"),
        allow!(SYS_tgkill [kick_signal(2)],
            "pthread_kill kicks vCPUs out of KVM_RUN (halt detection, shutdown)"),
        allow!(SYS_clock_nanosleep, "shutdown waits between kicks until every vCPU thread has stopped"),
        allow!(SYS_unlink, "--ephemeral overlays are deleted when the VM ends"),
    ],
    ioctls: &[ioctl!(
        TCSETS,
        "terminal.rs restores the console's attributes when the VM ends (stdio was in raw mode)"
    )],
};

/// A vCPU thread: KVM_RUN and the device emulation of its exits (serial, i8042, virtio-mmio
/// registers).
pub const VCPU: Table = Table {
    calls: &[allow!(SYS_fcntl [int(1, libc::F_DUPFD_CLOEXEC as i64)],
        "virtio-mmio: the guest's DRIVER_OK write activates the device, which hands duplicates of its queue-notify eventfds to the worker")],
    ioctls: &[
        ioctl!(KVM_RUN, "runs the guest until its next exit"),
        ioctl!(
            KVM_GET_MP_STATE,
            "after a kick: is the vCPU halted, or an AP the guest never started (halt detection)"
        ),
        ioctl!(
            KVM_GET_REGS,
            "after a kick: are interrupts off (halt detection); the RIP of an emulation failure"
        ),
    ],
};

/// A virtio-blk worker and the image crate's parallel I/O threads: image I/O only.
pub const BLOCK: Table = Table {
    calls: &[
        allow!(SYS_read, "worker: clears the queue-notify and wake eventfds"),
        allow!(SYS_poll, "worker: sleeps on the queue's notify and the device's wake eventfds, with the retry or idle timeout"),
        allow!(SYS_pread64, "reads image data and metadata"),
        allow!(SYS_preadv, "reads guest data into several buffers (read_vectored_at)"),
        allow!(SYS_pwrite64, "writes image data and metadata"),
        allow!(SYS_pwritev, "writes guest data from several buffers (write_vectored_at)"),
        allow!(SYS_fdatasync,
            "guest flushes; crash-safe ordering: refcounts reach the disk before the L2 entries that use them"),
        allow!(SYS_fallocate [int(1, (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as i64)],
            "frees the host range of released clusters (discard, zero writes, tail relocation) and of raw images"),
        allow!(SYS_fallocate [int(1, 0)],
            "batched writes allocate the host range of new clusters before writing their data (qcow2 batch.rs)"),
        allow!(SYS_fallocate [int(1, libc::FALLOC_FL_ZERO_RANGE as i64)],
            "raw images: write-zeroes that keep the range allocated"),
        allow!(SYS_ftruncate, "shrinks the image to its last used cluster; grows a file written past its end"),
        allow!(SYS_lseek [int(2, libc::SEEK_DATA as i64)],
            "raw backing files: does a zeroed cluster's backing range hold data"),
        allow!(SYS_lseek [int(2, libc::SEEK_HOLE as i64)],
            "raw backing files: where the data before a hole ends"),
        allow!(SYS_statx [int(2, libc::AT_EMPTY_PATH as i64)],
            "the image's size and allocated blocks (File::metadata on the open descriptor): statistics, shrinking"),
        allow!(SYS_fcntl [int(1, libc::F_OFD_SETLK as i64)],
            "image locks (open file description locks): taken, changed or released by the image's owner"),
        allow!(SYS_fcntl [int(1, libc::F_OFD_GETLK as i64)], "image locks: who holds a lock"),
        allow!(SYS_fcntl [int(1, libc::F_GETFL as i64)], "image files: reads the open flags (O_DIRECT)"),
        allow!(SYS_fcntl [int(1, libc::F_SETFL as i64)], "image files: switches O_DIRECT"),
    ],
    ioctls: &[],
};
