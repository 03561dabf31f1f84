//! Guest physical memory layout (x86_64), in the style of Firecracker's.

/// GDT and IDT for the boot CPU state.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH start info, its memory map and module list.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, then 4 page directories (4 GiB with 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Extended BIOS data area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS area, which the kernel scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Kernel command line (a 32-bit pointer in the zero page).
pub const CMDLINE_ADDR: u32 = 0x20000;
pub const CMDLINE_MAX: usize = 2048;
/// Start of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB: device registers, IOAPIC, LAPIC.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// virtio-mmio devices: one 4 KiB window each from here.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_HOLE_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's and local APICs' registers: 32-bit addresses (MP table, MADT), so `u32`.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (three pages below the BIOS area; KVM_SET_TSS_ADDR takes a `usize`).
pub const TSS_ADDR: usize = 0xfffb_d000;
/// First IRQ for virtio-mmio devices (4 is the serial port).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IRQs the IOAPIC routes (0..=23); an IRQ is a byte in the MP table.
pub const IOAPIC_PINS: u8 = 24;
/// virtio-mmio devices a VM can have: one IOAPIC pin each, from VIRTIO_IRQ_BASE to the last.
pub const VIRTIO_MMIO_SLOTS: usize = IOAPIC_PINS as usize - VIRTIO_IRQ_BASE as usize;
/// Smallest and largest guest RAM accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;

/// The MMIO window and GSI of virtio-mmio device `index`; `None` past the IOAPIC's last pin.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let i = u32::try_from(index).ok()?;
    let gsi = VIRTIO_IRQ_BASE
        .checked_add(i)
        .filter(|&g| g < u32::from(IOAPIC_PINS))?;
    Some((VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE, gsi))
}

/// Guest RAM regions for `mem` bytes: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_HOLE_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_slots_end_at_the_last_ioapic_pin() {
        assert_eq!(
            virtio_mmio_slot(0),
            Some((VIRTIO_MMIO_BASE, VIRTIO_IRQ_BASE))
        );
        assert_eq!(
            virtio_mmio_slot(18),
            Some((VIRTIO_MMIO_BASE + 18 * VIRTIO_MMIO_SIZE, 23))
        );
        assert_eq!(virtio_mmio_slot(19), None);
        assert_eq!(virtio_mmio_slot(usize::MAX), None);
    }

    #[test]
    fn regions_skip_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
    }
}
