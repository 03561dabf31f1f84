//! Raw mode for an interactive serial console, restored on every exit path (the guard's
//! Drop runs on normal return, errors, and signal-initiated shutdown; a panic of the thread
//! that entered raw mode restores it too: other threads may not touch the terminal under
//! their seccomp filters, their panics leave it to the guard).

use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Restores the terminal when dropped.
pub struct RawModeGuard;

fn restore() {
    let saved = crate::sync::lock(&SAVED).take();
    if let Some(t) = saved {
        // SAFETY: tcsetattr only reads the termios struct we pass; fd 0 is stdin.
        unsafe {
            libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts stdin in raw mode if it is a terminal; `None` when it is not.
pub fn enter_raw_mode() -> Option<RawModeGuard> {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    // SAFETY: termios is plain old data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return None;
    }
    if let Ok(mut g) = SAVED.lock() {
        *g = Some(t);
    }
    let mut raw = t;
    // SAFETY: cfmakeraw only modifies the struct.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output post-processing so guest "\n" still returns the carriage.
    raw.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: tcsetattr reads `raw`.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
    let owner = std::thread::current().id();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        if std::thread::current().id() == owner {
            restore();
        }
    }));
    Some(RawModeGuard)
}
