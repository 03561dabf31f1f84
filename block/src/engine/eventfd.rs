//! The eventfd helpers engines signal completions with.

use std::io;
use std::os::unix::io::RawFd;

/// An eventfd (non-blocking, close-on-exec) for completion notices.
pub(crate) fn new_eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (wakes whoever polls it).
pub(crate) fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor the caller keeps open; an
    // error (the counter is saturated, which cannot happen here) only loses a wake-up that
    // is already pending.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter (so it polls readable only for new completions).
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking descriptor the caller keeps
    // open; EAGAIN (nothing pending) is fine.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}
