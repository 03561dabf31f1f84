//! The ioctl request numbers the seccomp rules name: KVM's, computed like the kernel's `_IOR`
//! / `_IO` macros from kvm-bindings' structure sizes (so they follow the bindings), and the
//! terminal's from libc.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// `_IO(KVMIO, nr)`.
const fn kvm_io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

/// `size_of::<T>()` as an ioctl's 14-bit size field; a larger `T` stops the build (every
/// caller defines a constant).
#[allow(clippy::cast_possible_truncation)] // below 1 << 14, asserted just before
const fn ioctl_size<T>() -> u32 {
    assert!(
        size_of::<T>() < 1 << 14,
        "an ioctl's size field has 14 bits"
    );
    size_of::<T>() as u32
}

/// `_IOR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, ioctl_size::<T>()) as u64
}

/// `_IOWR(KVMIO, nr, T)`.
const fn kvm_iowr<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, ioctl_size::<T>()) as u64
}

/// Runs the vCPU until its next exit.
pub const KVM_RUN: u64 = kvm_io(0x80);
/// Reads the general-purpose registers.
pub const KVM_GET_REGS: u64 = kvm_ior::<kvm_regs>(0x81);
/// Reads the multiprocessing state (running, halted, waiting for INIT/SIPI).
pub const KVM_GET_MP_STATE: u64 = kvm_ior::<kvm_mp_state>(0x98);

// What a snapshot reads (`snapshot/vm.rs`, `snapshot/vcpu.rs`).
/// Reads one interrupt controller (PIC master, PIC slave, IOAPIC).
pub const KVM_GET_IRQCHIP: u64 = kvm_iowr::<kvm_irqchip>(0x62);
/// Reads the PIT.
pub const KVM_GET_PIT2: u64 = kvm_ior::<kvm_pit_state2>(0x9f);
/// Reads kvmclock.
pub const KVM_GET_CLOCK: u64 = kvm_ior::<kvm_clock_data>(0x7c);
/// Reads the special registers.
pub const KVM_GET_SREGS: u64 = kvm_ior::<kvm_sregs>(0x83);
/// Reads the FPU / extended state.
pub const KVM_GET_XSAVE: u64 = kvm_ior::<kvm_xsave>(0xa4);
/// Reads the extended control registers.
pub const KVM_GET_XCRS: u64 = kvm_ior::<kvm_xcrs>(0xa6);
/// Reads the debug registers.
pub const KVM_GET_DEBUGREGS: u64 = kvm_ior::<kvm_debugregs>(0xa1);
/// Reads the local APIC.
pub const KVM_GET_LAPIC: u64 = kvm_ior::<kvm_lapic_state>(0x8e);
/// Reads the TSC frequency.
pub const KVM_GET_TSC_KHZ: u64 = kvm_io(0xa3);
/// Reads the CPUID the vCPU was given.
pub const KVM_GET_CPUID2: u64 = kvm_iowr::<kvm_cpuid2>(0x91);
/// Reads MSRs.
pub const KVM_GET_MSRS: u64 = kvm_iowr::<kvm_msrs>(0x88);
/// Reads pending exceptions, interrupts and NMIs.
pub const KVM_GET_VCPU_EVENTS: u64 = kvm_ior::<kvm_vcpu_events>(0x9f);
/// Switches a socket between blocking and non-blocking (`set_nonblocking`).
pub const FIONBIO: u64 = libc::FIONBIO;

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
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
        assert_eq!(KVM_GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_TSC_KHZ, 0xaea3);
        assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(FIONBIO, 0x5421);
        assert_eq!(TIOCSTI, 0x5412);
    }
}
