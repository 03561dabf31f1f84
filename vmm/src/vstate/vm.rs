//! The KVM VM: guest memory registration, in-kernel IRQ chip and PIT, irqfd / ioeventfd.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{ram_regions, TSS_ADDR};
use crate::error::{Result, VmmError};

/// A VM with its guest memory.
pub struct Vm {
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
}

impl Vm {
    /// The guest RAM ranges (guest address, length) of `mem_size` bytes (with the MMIO hole).
    pub fn ram_ranges(mem_size: u64) -> Result<Vec<(GuestAddress, usize)>> {
        ram_regions(mem_size)
            .into_iter()
            .map(|(a, l)| {
                let len = usize::try_from(l).map_err(|_| VmmError::MemorySize { mem_size })?;
                Ok((GuestAddress(a), len))
            })
            .collect()
    }

    /// Creates the VM, its memory (with the MMIO hole), IRQ chip and PIT.
    pub fn new(kvm: &Kvm, mem_size: u64) -> Result<Vm> {
        let memory = super::memory::create(&Self::ram_ranges(mem_size)?)?;
        Self::with_memory(kvm, memory)
    }

    /// Creates the VM on existing guest memory (a snapshot's, mapped), its IRQ chip and PIT.
    pub fn with_memory(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm> {
        let fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        for (slot, region) in (0u32..).zip(memory.iter()) {
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region's host mapping stays alive as long as `memory`, which the
            // Vm owns and outlives the VM fd's use of it (vCPUs are joined before drop).
            unsafe { fd.set_user_memory_region(r) }
                .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(TSS_ADDR)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;
        Ok(Vm { fd, memory })
    }

    /// Routes writes to `evt` to guest interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(VmmError::kvm(format!("KVM_IRQFD (gsi {gsi})")))
    }

    /// Turns guest writes of `datamatch` to MMIO address `addr` into `evt` signals.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(VmmError::kvm(format!("KVM_IOEVENTFD at {addr:#x}")))
    }
}
