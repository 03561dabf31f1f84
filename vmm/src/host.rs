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
