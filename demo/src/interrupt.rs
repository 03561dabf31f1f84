//! Ctrl-C: the demo notes it in a flag and stops at the next step boundary (or signals its
//! VMM child), leaving nothing behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT from now on (best effort: without the handler Ctrl-C kills the demo).
pub fn catch_sigint() {
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint);
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
