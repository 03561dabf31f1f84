//! The VMMs the demo runs its guest under: thinvm itself, and (with `--compare-qemu`) QEMU
//! microvm with the same kernel, initramfs, memory, vCPUs, command line and disk settings
//! (`detect-zeroes=unmap,discard=unmap`, thinvm's defaults).

use std::path::Path;
use std::process::Command;

use crate::error::{DemoError, Result};

/// The QEMU binary.
const QEMU: &str = "qemu-system-x86_64";

/// A VMM to boot the demo's guest with.
pub enum Vmm<'a> {
    /// This thinvm binary.
    Thinvm(&'a Path),
    /// QEMU microvm.
    Qemu,
}

/// Fails with a clear message when QEMU is not installed.
pub fn require_qemu() -> Result<()> {
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(DemoError::Step(format!(
            "--compare-qemu needs {QEMU} (Debian: apt-get install qemu-system-x86; scripts/install-deps installs it)"
        ))),
    }
}

impl Vmm<'_> {
    /// Its name in tables and the chart.
    pub fn name(&self) -> &'static str {
        match self {
            Vmm::Thinvm(_) => "thinvm",
            Vmm::Qemu => "QEMU",
        }
    }

    /// Whether it must be stopped once the guest printed THINVM-DONE: QEMU microvm does not
    /// end by itself when its guest resets (inside the rig it waits forever).
    pub fn stop_after_done(&self) -> bool {
        matches!(self, Vmm::Qemu)
    }

    /// The command that boots `guest` with `overlay` as its disk.
    pub fn command(&self, guest: &guest_rig::Guest, overlay: &Path, cmdline: &str) -> Command {
        match self {
            Vmm::Thinvm(exe) => {
                let mut c = Command::new(exe);
                c.arg("run")
                    .arg("--kernel")
                    .arg(&guest.bzimage)
                    .arg("--initrd")
                    .arg(&guest.initrd)
                    .args(["--memory", "256M", "--cpus", "2", "--disk"])
                    .arg(format!("path={},format=qcow2", overlay.display()))
                    .arg("--cmdline")
                    .arg(cmdline);
                c
            }
            Vmm::Qemu => {
                let mut c = Command::new(QEMU);
                // acpi=off: the default guest's kernel has no ACPI; without ACPI microvm
                // announces its virtio-mmio devices on the kernel command line, as thinvm.
                c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
                    .args(["-m", "256M", "-smp", "2", "-nodefaults", "-no-user-config"])
                    .args(["-nographic", "-serial", "stdio", "-kernel"])
                    .arg(&guest.bzimage)
                    .arg("-initrd")
                    .arg(&guest.initrd)
                    .arg("-append")
                    .arg(cmdline)
                    .arg("-drive")
                    .arg(format!(
                        "id=d0,file={},format=qcow2,if=none,discard=unmap,detect-zeroes=unmap",
                        qemu_escape(&overlay.display().to_string())
                    ))
                    .args(["-device", "virtio-blk-device,drive=d0"]);
                c
            }
        }
    }
}

/// QEMU's option syntax doubles commas inside a value.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_in_paths_are_doubled_for_qemu() {
        assert_eq!(qemu_escape("/tmp/a,b/ov.qcow2"), "/tmp/a,,b/ov.qcow2");
    }
}
