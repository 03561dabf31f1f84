//! Initial CPU state: GDT, identity page tables, segment and control registers, FPU, LAPIC.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::error::{Result, VmmError};

/// RFLAGS.IF: maskable interrupts enabled.
pub const X86_EFLAGS_IF: u64 = 1 << 9;
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// The GDT's limit: its four 8-byte entries, less one.
const GDT_LIMIT: u16 = 4 * 8 - 1;
const _: () = assert!(GDT_LIMIT as usize == std::mem::size_of::<[u64; 4]>() - 1);

/// How the boot CPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with identity paging; `rsi` = boot_params (Linux 64-bit boot
    /// protocol, and flat 64-bit test programs).
    Long64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
    Pvh32 { entry: u64 },
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    #[allow(clippy::cast_possible_truncation)] // both halves masked: 20 bits
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_mem<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, val: T, addr: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(VmmError::guest_memory(format!("write at {addr:#x}")))
}

/// Writes the GDT and identity page tables (first 4 GiB, 2 MiB pages) into guest memory.
pub fn setup_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<[u64; 4]> {
    let code = match mode {
        EntryMode::Long64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh32 { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    let gdt = [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        write_mem(mem, *e, GDT_ADDR + i as u64 * 8)?;
    }
    write_mem(mem, 0u64, IDT_ADDR)?;
    if let EntryMode::Long64 { .. } = mode {
        write_mem(mem, PDPT_ADDR | 0x03, PML4_ADDR)?;
        for i in 0..4u64 {
            write_mem(mem, (PD_ADDR + i * 0x1000) | 0x03, PDPT_ADDR + i * 8)?;
        }
        for i in 0..2048u64 {
            write_mem(mem, (i << 21) | 0x83, PD_ADDR + i * 8)?;
        }
    }
    Ok(gdt)
}

/// Sets segment, control and descriptor-table registers for the entry mode.
pub fn setup_sregs(vcpu: &VcpuFd, gdt: &[u64; 4], mode: EntryMode) -> Result<()> {
    let err = |e| VmmError::vcpu(0, "sregs")(e);
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(err)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Long64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh32 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(err)
}

/// Sets general registers: entry point, stack, boot information pointer.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<()> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 { entry } => {
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh32 { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
    }
    vcpu.set_regs(&regs).map_err(VmmError::vcpu(0, "regs"))
}

/// Default x87/SSE state.
pub fn setup_fpu(vcpu: &VcpuFd, id: u32) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmmError::vcpu(id, "fpu"))
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS would leave them.
pub fn setup_lapic(vcpu: &VcpuFd, id: u32) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let err = |e| VmmError::vcpu(id, "lapic")(e);
    let mut lapic = vcpu.get_lapic().map_err(err)?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        // `regs` is C `char`s (i8): the register's bytes, reinterpreted, not converted.
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i].to_ne_bytes()[0]);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = i8::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.present, 1);
        let d = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(d.db, 1);
        assert_eq!(d.type_, 3);
    }
}
