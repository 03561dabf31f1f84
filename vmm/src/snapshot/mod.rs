//! Snapshots: what KVM keeps for the VM ([`vm`]) and each vCPU ([`vcpu`]), guest memory
//! ([`memory`]), disks frozen as qcow2 layers ([`disks`]), and the versioned state file that
//! ties them together ([`state`]). Taken by [`crate::vm_control`], restored by
//! [`crate::restore`].

pub mod cpu_model;
pub mod disks;
pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;
