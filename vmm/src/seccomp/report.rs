//! What happens when a thread makes a call its filter forbids: the filter's action is
//! `SECCOMP_RET_TRAP`, so the kernel skips the call and sends SIGSYS to the thread. The
//! handler here prints one line naming the thread kind, the call and its arguments, then
//! makes thinvm die by SIGSYS (default action), so a parent sees the signal. Nothing runs
//! after the forbidden call in any thread.

use std::cell::Cell;
use std::fmt::Write as _;

use super::rules;
use super::thread_kind::ThreadKind;
use crate::error::{Result, VmmError};

thread_local! {
    /// The filter installed on this thread, for the report. Const-initialised and without a
    /// destructor: reading it is a plain thread-local load, safe in a signal handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records that the calling thread now runs under `kind`'s filter.
pub fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: i32 = 1;
/// Offset of `_sigsys._syscall` in the x86_64 `siginfo_t` (after signo, errno, code, padding
/// and the call address).
const SI_SYSCALL_OFFSET: usize = 24;

/// A line built on the stack: no allocation in the signal handler.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// A call's name followed by a space, or nothing.
struct Named(&'static str);

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}, ", self.0)
        }
    }
}

/// The name of call `nr` if a rule table mentions it.
fn call_name(nr: i64) -> &'static str {
    let tables = [rules::VMM, rules::VCPU, rules::BLOCK];
    rules::COMMON
        .iter()
        .chain(tables.iter().flat_map(|t| t.calls.iter()))
        .find(|r| r.call.nr == nr)
        .map(|r| r.call.name())
        .unwrap_or(if nr == libc::SYS_ioctl { "ioctl" } else { "" })
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut line = Line {
        buf: [0; 320],
        len: 0,
    };
    let kind = KIND
        .with(|k| k.get())
        .map_or("unconfined", ThreadKind::name);
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let from_filter = !info.is_null() && unsafe { (*info).si_code } == SYS_SECCOMP;
    if from_filter && !ctx.is_null() {
        // SAFETY: for a seccomp SIGSYS the kernel fills `_sigsys`, whose `_syscall` (an int)
        // is at this offset of the siginfo_t it passed.
        let nr = unsafe { *((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
        // SAFETY: `ctx` is the ucontext_t of the interrupted thread; its registers hold the
        // arguments of the system call that trapped (x86_64 calling convention).
        let gregs = unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        // A register's bits (greg_t is signed), 0 for an index gregs does not have.
        let arg = |r: libc::c_int| {
            usize::try_from(r)
                .ok()
                .and_then(|r| gregs.get(r))
                .map_or(0, |v| u64::from_ne_bytes(v.to_ne_bytes()))
        };
        let _ = writeln!(
            line,
            "thinvm: seccomp: the {kind} thread made a system call its filter forbids: {}system call {nr}, arguments {:#x} {:#x} {:#x} {:#x}; stopping (--seccomp off runs without filters, for debugging)",
            Named(call_name(i64::from(nr))),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
        );
    } else {
        let _ = writeln!(line, "thinvm: SIGSYS in the {kind} thread; stopping");
    }
    // SAFETY: only async-signal-safe system calls on valid buffers: write the line, restore
    // SIGSYS's default action, raise it on this thread and unblock it, which ends the process
    // by the signal before this thread runs on. _exit is the fallback if it does not.
    unsafe {
        libc::write(2, line.buf.as_ptr() as *const libc::c_void, line.len);
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::syscall(libc::SYS_getpid),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Installs the SIGSYS handler that reports a forbidden call and stops thinvm.
pub fn install() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(VmmError::SigsysHandler)
}
