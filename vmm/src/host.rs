//! Host checks: /dev/kvm access and capabilities, and detection of software-nested KVM
//! hosts on which Linux user space cannot run (see the project's host notes).

use kvm_ioctls::{Cap, Kvm};

use crate::error::{Result, VmmError};

/// Opens /dev/kvm (or `$THINVM_KVM_DEVICE`, for tests) with an explanation of what to do
/// when that fails.
pub fn open_kvm() -> Result<Kvm> {
    let dev = std::env::var_os("THINVM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    let path = std::path::Path::new(&dev);
    if !path.exists() {
        return Err(VmmError::KvmMissing);
    }
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| VmmError::io("KVM device path", e.into()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| {
        if e.errno() == libc::EACCES || e.errno() == libc::EPERM {
            VmmError::KvmPermission(e)
        } else {
            VmmError::kvm("cannot open")(e)
        }
    })?;
    if kvm.get_api_version() != 12 {
        return Err(VmmError::KvmApiVersion(kvm.get_api_version()));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel IRQ chip"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCapability(name));
        }
    }
    Ok(kvm)
}

/// Why this host's KVM cannot run Linux user space, if it is a software-nested KVM.
pub fn software_nested_kvm() -> Option<&'static str> {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return Some("kvm_pvm (software-nested KVM)");
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    if modules.lines().any(|l| l.starts_with("kvm_pvm ")) {
        return Some("kvm_pvm (software-nested KVM)");
    }
    None
}

/// The one-line warning printed before booting Linux on such a host.
pub fn nested_warning(kind: &str) -> String {
    format!(
        "thinvm: warning: this host's /dev/kvm is {kind}: small guests run, but Linux user space does not (init dies at its first syscall); run Linux guests inside the test rig (guest-images/rig) or on a host with hardware virtualization"
    )
}

/// The host's CPU brand string and hypervisor vendor (CPUID 0x8000_0002-4 and 0x4000_0000).
fn host_cpu_names() -> (String, String) {
    use std::arch::x86_64::__cpuid;
    let text = |regs: &[u32]| -> String {
        let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    };
    let max_ext = __cpuid(0x8000_0000).eax;
    let brand = if max_ext >= 0x8000_0004 {
        let l: Vec<u32> = (0x8000_0002..=0x8000_0004u32)
            .flat_map(|leaf| {
                let r = __cpuid(leaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            })
            .collect();
        text(&l)
    } else {
        String::new()
    };
    let hypervisor = if __cpuid(1).ecx & (1 << 31) != 0 {
        let r = __cpuid(0x4000_0000);
        text(&[r.ebx, r.ecx, r.edx])
    } else {
        String::new()
    };
    (brand, hypervisor)
}

/// Whether this host's CPU is itself emulated by QEMU's TCG (KVM on an emulated AMD SVM or
/// Intel VMX, as in the project's test rig): its KVM runs guests, but through an emulated
/// MMU whose TLB handling differs from hardware's.
pub fn emulated_host_cpu() -> bool {
    let (brand, hypervisor) = host_cpu_names();
    is_tcg(&brand, &hypervisor)
}

fn is_tcg(brand: &str, hypervisor: &str) -> bool {
    hypervisor == "TCGTCGTCGTCG" || brand.contains("QEMU TCG CPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_hosts_are_told_by_their_cpu_names() {
        assert!(is_tcg("AMD QEMU TCG CPU version 2.5+", ""));
        assert!(is_tcg("", "TCGTCGTCGTCG"));
        assert!(!is_tcg("AMD EPYC 7B13 64-Core Processor", "KVMKVMKVM"));
        assert!(!is_tcg("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", ""));
        // Every x86_64 CPU this runs on names itself (CPUID 0x8000_0002-4).
        assert!(!host_cpu_names().0.is_empty());
    }
}
