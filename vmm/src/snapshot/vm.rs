//! The VM-wide KVM state: the in-kernel interrupt controllers (both PICs, the IOAPIC), the
//! PIT and kvmclock. Restored after the VM's IRQ chip and PIT exist, before the vCPUs.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};

/// What KVM keeps for the VM.
#[derive(Serialize, Deserialize)]
pub struct VmKvmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(VmmError::kvm(format!("KVM_GET_IRQCHIP {id}")))?;
    Ok(c)
}

/// Saves the VM's state (its vCPUs parked).
pub fn save(vm: &VmFd) -> Result<VmKvmState> {
    Ok(VmKvmState {
        pit: vm.get_pit2().map_err(VmmError::kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(VmmError::kvm("KVM_GET_CLOCK"))?,
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Restores it into a fresh VM (IRQ chip and PIT created).
pub fn restore(vm: &VmFd, s: &VmKvmState) -> Result<()> {
    vm.set_pit2(&s.pit).map_err(VmmError::kvm("KVM_SET_PIT2"))?;
    // The clock goes on from the saved value (flags: only what KVM_SET_CLOCK accepts).
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(VmmError::kvm("KVM_SET_CLOCK"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c)
            .map_err(VmmError::kvm(format!("KVM_SET_IRQCHIP {}", c.chip_id)))?;
    }
    Ok(())
}
