//! The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing: KVM_RUN
//! returns EINTR), kept apart from the vCPU so that the seccomp rules can name it.

use crate::error::{Result, VmmError};

/// The signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; KVM_RUN returns EINTR when it arrives.
pub fn install_kick_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(VmmError::kvm("cannot install the vCPU kick handler"))
}
