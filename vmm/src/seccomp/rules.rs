//! The seccomp rules, as data: per thread kind, the system calls a thread may make once its
//! filter is installed, with the arguments it may pass, and for each one who needs it and why.
//! Anything else stops thinvm with SIGSYS (see `report.rs`).
//!
//! How to extend: add a [`Rule`] (or an [`Ioctl`]) to the table of the thread kind that makes
//! the call, with a `why` that names the code and the reason. Prefer argument conditions over
//! a bare call. The tests in `mod.rs` refuse duplicate or shadowed rules, an empty `why`, and
//! any rule for the calls in `mod.rs`'s never-allowed list (thread creation, exec, opening
//! files, sockets, ...). E.g. the io_uring block engine (`aio=io_uring`) sets its ring up
//! before the worker is confined (`io_uring_setup` stays forbidden: a new ring could submit
//! anything), restricts the ring to readv and writev entries, and [`BLOCK`] allows only
//! `io_uring_enter` on it.

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

/// `v`'s two's complement bits: what the kernel compares (a negative `int` such as
/// `AT_FDCWD` included; a 32-bit comparison looks at the low half only).
#[allow(clippy::cast_sign_loss)] // reinterpreting the bits is the point
const fn bits(v: i64) -> u64 {
    v as u64
}

/// A 32-bit argument equal to `value`.
const fn int(index: u8, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits32,
        test: Test::Eq(bits(value)),
    }
}

/// A 32-bit argument equal to `value` in the bits of `mask`.
const fn int_masked(index: u8, mask: u64, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits32,
        test: Test::Masked {
            mask,
            value: bits(value),
        },
    }
}

/// A 64-bit argument equal to `value`.
const fn ulong(index: u8, value: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits64,
        test: Test::Eq(bits(value)),
    }
}

/// A 64-bit argument with no bit outside `allowed` set.
const fn ulong_within(index: u8, allowed: i64) -> Arg {
    Arg {
        index,
        width: Width::Bits64,
        test: Test::Masked {
            mask: !bits(allowed),
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

/// `io_uring_enter`'s flag asking to wait for completions (linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u64 = 1;
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
    allow!(SYS_sched_yield, "Rust's channels (std mpsc) spin, yielding, before they sleep"),
    allow!(SYS_clock_gettime, "the time where the vDSO cannot read it (Instant::now, log time stamps)"),
    allow!(SYS_restart_syscall, "the kernel resumes an interrupted poll, sleep or futex wait with it"),
];

/// The main thread once the VM runs: the event loop, vCPU kicks, shutdown and clean-up.
pub const VMM: Table = Table {
    calls: &[
        allow!(SYS_read,
            "event loop: the signalfd (SIGINT, SIGTERM, SIGHUP, SIGUSR1), timerfds (halt ticks, statistics), exit and reset eventfds, console input"),
        allow!(SYS_pread64,
            "halt detection reads the vCPUs' KVM statistics (blocking, exits) from their stats file descriptors; with an API socket, a snapshot reads image headers and metadata (new overlay, its frozen layer)"),
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
            "qcow2 writes allocate the host range of new clusters ahead of their data, 8 MiB at a time (qcow2 planner.rs)"),
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
        allow!(SYS_io_uring_enter [int_masked(3, !IORING_ENTER_GETEVENTS & 0xffff_ffff, 0)],
            "aio=io_uring (block engine/uring.rs): the worker submits reads and writes to its disk's ring and waits for completions (flags: at most GETEVENTS); the ring was set up before the worker was confined and accepts only readv and writev entries (IORING_REGISTER_RESTRICTIONS), so it does nothing this filter forbids"),
    ],
    ioctls: &[],
};

/// `accept4` flags of a socket accepted by std (`UnixListener::accept`).
const ACCEPT_STD: i64 = libc::SOCK_CLOEXEC as i64;
/// `accept4` and `socket` flags of the vsock device's own sockets (`muxer.rs`).
const SOCK_NB_CLOEXEC: i64 = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as i64;

/// The main thread of a VM with `--api-socket` (`api.rs`, `vm_control.rs`, `snapshot/`), in
/// addition to [`VMM`]: serving requests, and writing a snapshot. A snapshot creates files in
/// the directory the request names (so `openat` is allowed here, and only here on the main
/// thread): guest RAM, the state, and for each disk a new overlay that the running VM goes on
/// with.
pub const VMM_API: Table = Table {
    calls: &[
        allow!(SYS_accept4 [int(3, ACCEPT_STD)], "api.rs: accepts a `thinvm ctl` connection"),
        allow!(SYS_setsockopt [int(1, libc::SOL_SOCKET as i64), int(2, libc::SO_RCVTIMEO as i64)],
            "api.rs: a request line must come within 5 s (SO_RCVTIMEO on the connection)"),
        allow!(SYS_recvfrom [int(3, 0)], "api.rs: reads the request line (std's socket read is recv)"),
        allow!(SYS_sendto [int(3, libc::MSG_NOSIGNAL as i64)],
            "api.rs: writes the reply (std's socket write is send with MSG_NOSIGNAL)"),
        allow!(SYS_fcntl [int(1, libc::F_DUPFD_CLOEXEC as i64)],
            "api.rs: a reader for the connection (UnixStream::try_clone)"),
        allow!(SYS_mkdir, "snapshot: creates the snapshot directory"),
        allow!(SYS_mkdirat, "snapshot: creates the snapshot directory (glibc's mkdir may use mkdirat)"),
        allow!(SYS_openat,
            "snapshot: creates DIR/memory, DIR/state.json and each disk's new overlay, opens the new overlay and its frozen layer, lists DIR (must be empty), reads a disk's header"),
        allow!(SYS_getdents64, "snapshot: is the snapshot directory empty; removing a failed one"),
        allow!(SYS_statx, "snapshot: file metadata (sizes, types) of images and the snapshot directory"),
        allow!(SYS_newfstatat, "snapshot: file metadata where glibc uses fstatat"),
        allow!(SYS_pwrite64, "snapshot: writes guest RAM (zero pages skipped) and the new overlay's metadata"),
        allow!(SYS_ftruncate, "snapshot: sets the memory file's length (zero pages at its end stay holes); qcow2 create"),
        allow!(SYS_fsync, "snapshot: memory file, state file and new overlays reach the disk before state.json names them"),
        allow!(SYS_fdatasync, "snapshot: the new overlay's metadata is synced as qcow2 create orders it"),
        allow!(SYS_lseek, "snapshot: file positions while std writes and copies files"),
        allow!(SYS_rename, "snapshot: the running overlay moves into DIR as its frozen layer; state.json lands atomically"),
        allow!(SYS_renameat, "snapshot: as rename (glibc may use renameat)"),
        allow!(SYS_renameat2, "snapshot: as rename (glibc may use renameat2)"),
        allow!(SYS_unlinkat, "snapshot: a failed snapshot's directory is removed (remove_dir_all)"),
        allow!(SYS_readlink, "snapshot: the frozen layer's absolute path for the overlay's backing name (realpath)"),
        allow!(SYS_getcwd, "snapshot: a relative snapshot path is made absolute"),
        allow!(SYS_copy_file_range, "snapshot: an overlay on another file system is copied into DIR"),
        allow!(SYS_sendfile, "snapshot: the copy's fallback where copy_file_range is refused"),
        allow!(SYS_fchmod, "snapshot: std's file copy gives the copy the original's permissions"),
        allow!(SYS_fcntl [int(1, libc::F_OFD_SETLK as i64)],
            "snapshot: the new overlay and its frozen layer are locked like every image (QEMU's lock bytes)"),
        allow!(SYS_fcntl [int(1, libc::F_OFD_GETLK as i64)], "snapshot: image locks: who holds a lock"),
        allow!(SYS_fcntl [int(1, libc::F_GETFL as i64)], "snapshot: image open flags (O_DIRECT)"),
        allow!(SYS_fcntl [int(1, libc::F_SETFL as i64)], "snapshot: image open flags (O_DIRECT)"),
        allow!(SYS_fallocate [int(1, 0)], "snapshot: qcow2 create allocates the new overlay's first clusters"),
    ],
    ioctls: &[
        ioctl!(FIONBIO, "api.rs: a request connection is read blocking (with a timeout)"),
        ioctl!(KVM_GET_IRQCHIP, "snapshot: the PICs and the IOAPIC"),
        ioctl!(KVM_GET_PIT2, "snapshot: the PIT"),
        ioctl!(KVM_GET_CLOCK, "snapshot: kvmclock"),
    ],
};

/// A vCPU thread of a VM with `--api-socket`, in addition to [`VCPU`]: parked for a
/// snapshot, it reads its own state (`snapshot/vcpu.rs`; read-only ioctls).
pub const VCPU_SNAPSHOT: Table = Table {
    calls: &[],
    ioctls: &[
        ioctl!(
            KVM_GET_SREGS,
            "snapshot: segment, control and table registers"
        ),
        ioctl!(KVM_GET_XSAVE, "snapshot: FPU and vector state"),
        ioctl!(KVM_GET_XCRS, "snapshot: XCR0"),
        ioctl!(KVM_GET_DEBUGREGS, "snapshot: debug registers"),
        ioctl!(KVM_GET_LAPIC, "snapshot: the local APIC"),
        ioctl!(
            KVM_GET_TSC_KHZ,
            "snapshot: the TSC frequency a clone must keep"
        ),
        ioctl!(KVM_GET_CPUID2, "snapshot: the CPUID the guest saw"),
        ioctl!(KVM_GET_MSRS, "snapshot: the MSRs KVM lists"),
        ioctl!(
            KVM_GET_VCPU_EVENTS,
            "snapshot: pending exceptions, interrupts and NMIs"
        ),
    ],
};

/// The virtio-vsock device's thread (`devices/src/virtio/vsock/`): an epoll loop over its
/// queue-notify eventfds, the VM's listening Unix socket, and one stream per connection.
pub const VSOCK: Table = Table {
    calls: &[
        allow!(SYS_read, "clears its eventfds (queue notify, wake)"),
        allow!(SYS_epoll_wait, "the device's event loop waits"),
        allow!(SYS_epoll_ctl, "watches and forgets connection streams as they come and go"),
        allow!(SYS_accept4 [int(3, SOCK_NB_CLOEXEC)],
            "muxer.rs: a host process connects to the VM's socket (to send CONNECT <port>)"),
        allow!(SYS_socket [int(0, libc::AF_UNIX as i64), int(1, (libc::SOCK_STREAM as i64) | SOCK_NB_CLOEXEC)],
            "muxer.rs: a guest connection to host port P opens a Unix stream to PATH_P (Firecracker's protocol); Unix sockets only"),
        allow!(SYS_connect,
            "muxer.rs: connects that stream to PATH_P (the path is the VM's --vsock uds plus _P, built by thinvm)"),
        allow!(SYS_recvfrom [int(3, 0)], "reads a connection's stream (std's socket read is recv)"),
        allow!(SYS_sendto [int(3, libc::MSG_NOSIGNAL as i64)],
            "writes a connection's stream (std's socket write is send with MSG_NOSIGNAL)"),
        allow!(SYS_recvfrom [int(3, (libc::MSG_PEEK | libc::MSG_DONTWAIT) as i64)],
            "connection.rs: peeks at a host connection's CONNECT line without taking more"),
        allow!(SYS_shutdown [int(1, libc::SHUT_WR as i64)],
            "the guest shut its sending side down: the host stream's write side follows"),
        allow!(SYS_unlink, "removes the VM's socket file when the device ends"),
    ],
    ioctls: &[ioctl!(FIONBIO, "streams are switched to non-blocking (set_nonblocking)")],
};

/// `--exec`'s agent client (`exec.rs`) and its stdin forwarder.
pub const EXEC: Table = Table {
    calls: &[
        allow!(
            SYS_read,
            "reads thinvm's standard input (forwarded to the command)"
        ),
        allow!(SYS_socket [int(0, libc::AF_UNIX as i64), int(1, (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as i64)],
            "connects to the VM's own vsock Unix socket (UnixStream::connect), again while the agent is not up; Unix sockets only"),
        allow!(
            SYS_connect,
            "connects to the VM's own vsock Unix socket (its --vsock uds path)"
        ),
        allow!(SYS_setsockopt [int(1, libc::SOL_SOCKET as i64), int(2, libc::SO_RCVTIMEO as i64)],
            "waits at most 2 s for the device's answer to CONNECT"),
        allow!(
            SYS_recvfrom[int(3, 0)],
            "reads the agent's frames (std's socket read is recv)"
        ),
        allow!(
            SYS_sendto[int(3, libc::MSG_NOSIGNAL as i64)],
            "sends CONNECT, the command and stdin (std's socket write is send with MSG_NOSIGNAL)"
        ),
        allow!(
            SYS_fcntl[int(1, libc::F_DUPFD_CLOEXEC as i64)],
            "one stream for reading, one for writing stdin (UnixStream::try_clone)"
        ),
        allow!(
            SYS_clock_nanosleep,
            "waits 50 ms between attempts to reach the agent"
        ),
    ],
    ioctls: &[],
};
