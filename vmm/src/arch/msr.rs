//! Model-specific registers set at boot (only those KVM reports as supported).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Result, VmmError};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSR values.
fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Sets the boot MSRs KVM supports; a refused one is a warning, not an error.
pub fn setup_msrs(kvm: &Kvm, vcpu: &VcpuFd, id: u32) -> Result<()> {
    let supported = kvm
        .get_msr_index_list()
        .map_err(VmmError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let list = supported.as_slice();
    let wanted: Vec<(u32, u64)> = boot_msrs()
        .into_iter()
        .filter(|(i, _)| list.contains(i))
        .collect();
    for (index, data) in wanted {
        let entries = [kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }];
        let msrs = Msrs::from_entries(&entries).map_err(|source| VmmError::VcpuList {
            id,
            what: "MSRs",
            source,
        })?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => {}
            Ok(_) | Err(_) => {
                tracing::warn!("vCPU {id}: KVM refused MSR {index:#x}; continuing without it")
            }
        }
    }
    Ok(())
}
