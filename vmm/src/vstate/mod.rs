//! KVM state: the VM (memory, IRQ chip, PIT) and its vCPUs.

pub mod kick;
pub mod kvm_stats;
pub mod memory;
pub mod report;
pub mod vcpu;
pub mod vm;
