//! The ioctl request numbers the seccomp rules name: KVM's, computed like the kernel's `_IOR`
//! / `_IO` macros from kvm-bindings' structure sizes (so they follow the bindings), and the
//! terminal's from libc.

use std::mem::size_of;

use kvm_bindings::{kvm_mp_state, kvm_regs, KVMIO};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ};

/// `_IO(KVMIO, nr)`.
const fn kvm_io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

/// `_IOR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32) as u64
}

/// Runs the vCPU until its next exit.
pub const KVM_RUN: u64 = kvm_io(0x80);
/// Reads the general-purpose registers.
pub const KVM_GET_REGS: u64 = kvm_ior::<kvm_regs>(0x81);
/// Reads the multiprocessing state (running, halted, waiting for INIT/SIPI).
pub const KVM_GET_MP_STATE: u64 = kvm_ior::<kvm_mp_state>(0x98);

/// Sets the terminal's attributes now (`tcsetattr(TCSANOW)`).
pub const TCSETS: u64 = libc::TCSETS;
/// Pushes a byte into the terminal's input queue, as if typed: never allowed.
#[cfg(test)]
pub const TIOCSTI: u64 = libc::TIOCSTI;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> and <asm-generic/ioctls.h> as compiled for x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(TCSETS, 0x5402);
        assert_eq!(TIOCSTI, 0x5412);
    }
}
