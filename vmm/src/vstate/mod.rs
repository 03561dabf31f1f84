//! KVM state: the VM (memory, IRQ chip, PIT) and its vCPUs.

pub mod vcpu;
pub mod vm;
