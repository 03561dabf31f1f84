//! The Intel MultiProcessor table, so a guest without ACPI finds its CPUs and the IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};
use crate::error::{Result, VmmError};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// The configuration table, right after the 16-byte floating pointer at the EBDA's start (a
/// 32-bit pointer in the floating pointer).
const TABLE_ADDR: u32 = 0x9fc10;
const _: () = assert!(TABLE_ADDR as u64 == EBDA_START + 16);

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// Builds the MP floating pointer and configuration table for `cpus` CPUs.
pub fn build(cpus: u32) -> Result<Vec<u8>> {
    // Local APIC ids are 0..cpus and the IOAPIC's id is `cpus`, all u8.
    let ioapic_id = u8::try_from(cpus)
        .ok()
        .filter(|c| (1..=254).contains(c))
        .ok_or(VmmError::VcpusForTable {
            cpus,
            table: "MP table",
        })?;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for i in 0..ioapic_id {
        let mut p = [0u8; 20];
        p[0] = 0; // processor
        p[1] = i;
        p[2] = APIC_VERSION;
        p[3] = CPU_ENABLED | if i == 0 { CPU_BOOT } else { 0 };
        p[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        p[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&p);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // IOAPIC.
    let mut io = [0u8; 8];
    io[0] = 2;
    io[1] = ioapic_id;
    io[2] = IOAPIC_VERSION;
    io[3] = 1; // enabled
    io[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // Every ISA IRQ to the same IOAPIC pin.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    let table_len = u16::try_from(table_len).map_err(|_| VmmError::MpTableTooLarge { cpus })?;
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"THINVM  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&TABLE_ADDR.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision
    mpf[10] = checksum(&mpf);
    let mut out = mpf.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    let bytes = build(cpus)?;
    if EBDA_START + bytes.len() as u64 > 0xa0000 {
        return Err(VmmError::MpTableTooLarge { cpus });
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(VmmError::guest_memory("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        assert!(build(0).is_err());
        assert!(build(255).is_err());
    }
}
