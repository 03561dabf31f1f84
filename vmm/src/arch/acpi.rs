//! ACPI tables: RSDP, XSDT, a hardware-reduced FADT, MADT (local APICs and the IOAPIC) and a
//! DSDT describing the serial port (PNP0501) and every virtio-mmio device (`LNRO0005`, the
//! `_HID` Linux's virtio-mmio driver matches, with a Memory32Fixed + Interrupt `_CRS`), as QEMU
//! microvm (`acpi=on`) and Firecracker describe them. Distribution kernels are built without
//! `VIRTIO_MMIO_CMDLINE_DEVICES`: this is how they find the disks.
//!
//! The tables are built with rust-vmm's `acpi_tables` crate and placed in the BIOS area
//! (`ACPI_START..ACPI_END`), the RSDP first: kernels find it through `boot_params.acpi_rsdp_addr`,
//! PVH's `rsdp_paddr`, or by scanning 0xe0000..0xfffff.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::error::{Result, VmmError};

const OEM_ID: [u8; 6] = *b"THINVM";
const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_ID: [u8; 8] = *b"THINVM\0\0";
/// DSDT revision 2 and up: integers are 64 bits.
const DSDT_REVISION: u8 = 6;
/// IA-PC boot architecture flags (FADT): no VGA, no CMOS RTC (thinvm emulates neither). The
/// 8042 flag stays clear: the kernel then does not probe a keyboard controller (the reset
/// line at port 0x64 works without the driver).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Tables start on 16-byte boundaries.
const TABLE_ALIGN: u64 = 16;

/// One virtio-mmio device as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The legacy serial port (COM1) the DSDT describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialPort {
    pub port: u16,
    pub irq: u32,
}

/// The built tables and where each goes in guest memory.
#[derive(Debug)]
pub struct Tables {
    /// Guest-physical address of the RSDP.
    pub rsdp_addr: u64,
    /// (address, bytes) of every table, the RSDP included.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The tables overflowed their area of guest memory.
fn no_space() -> VmmError {
    VmmError::AcpiSpace {
        start: ACPI_START,
        end: ACPI_END,
    }
}

/// AML already serialized (a `Device` borrows its children; serializing each device on its
/// own keeps the borrows local).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device(NAME) { _HID, _UID, [_CCA,] _CRS }`, serialized.
fn device_aml(name: &str, hid: &dyn Aml, uid: u32, coherent: bool, crs: &[&dyn Aml]) -> Vec<u8> {
    let crs = aml::ResourceTemplate::new(crs.to_vec());
    let hid = aml::Name::new("_HID".into(), hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    // Cache-coherent DMA.
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid];
    if coherent {
        children.push(&cca);
    }
    children.push(&crs);
    bytes_of(&aml::Device::new(name.into(), children))
}

/// The DSDT body (AML): `\_SB_.COM1` and `\_SB_.VRnn` for each virtio-mmio device.
fn dsdt_aml(serial: SerialPort, devices: &[VirtioMmioSlot]) -> Result<Vec<u8>> {
    if devices.len() > 100 {
        return Err(VmmError::AcpiTooManyDevices {
            count: devices.len(),
        });
    }
    let mut body = device_aml(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        false,
        &[
            &aml::IO::new(serial.port, serial.port, 1, 8),
            &aml::Interrupt::new(true, true, false, false, serial.irq),
        ],
    );
    let hid: &'static str = "LNRO0005";
    for (i, d) in (0u32..).zip(devices) {
        let above_4g = || VmmError::AcpiDeviceAbove4G {
            index: i,
            base: d.base,
            size: d.size,
        };
        let end = d.base.checked_add(d.size).ok_or_else(above_4g)?;
        if end > 1 << 32 {
            return Err(above_4g());
        }
        let base = u32::try_from(d.base).map_err(|_| above_4g())?;
        let size = u32::try_from(d.size).map_err(|_| above_4g())?;
        body.extend(device_aml(
            &format!("VR{i:02}"),
            &hid,
            i,
            true,
            &[
                &aml::Memory32Fixed::new(true, base, size),
                &aml::Interrupt::new(true, true, false, false, d.gsi),
            ],
        ));
    }
    let body = RawAml(body);
    Ok(bytes_of(&aml::Scope::new("\\_SB_".into(), vec![&body])))
}

/// Rounds `addr` up to the table alignment.
fn align(addr: u64) -> Result<u64> {
    addr.checked_add(TABLE_ALIGN - 1)
        .map(|a| a & !(TABLE_ALIGN - 1))
        .ok_or_else(no_space)
}

/// Places tables one after the other from `next`.
struct Placer {
    next: u64,
    blobs: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> Result<u64> {
        let addr = align(self.next)?;
        let end = addr
            .checked_add(bytes.len() as u64)
            .filter(|&e| e <= ACPI_END)
            .ok_or_else(no_space)?;
        self.next = end;
        self.blobs.push((addr, bytes));
        Ok(addr)
    }
}

/// Builds the tables for `cpus` vCPUs, the serial port and the virtio-mmio devices.
pub fn build(cpus: u32, serial: SerialPort, devices: &[VirtioMmioSlot]) -> Result<Tables> {
    // Local APIC ids are 0..cpus and the IOAPIC's id is `cpus` (as in the MP table), all u8.
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|c| (1..=254).contains(c))
        .ok_or(VmmError::VcpusForTable {
            cpus,
            table: "MADT",
        })?;
    let rsdp_addr = ACPI_START;
    let mut placer = Placer {
        next: rsdp_addr
            .checked_add(Rsdp::len() as u64)
            .ok_or_else(no_space)?,
        blobs: Vec::new(),
    };

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"THINVMDS",
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_aml(serial, devices)?);
    let dsdt_addr = placer.place(dsdt.as_slice().to_vec())?;

    let mut fadt = FADTBuilder::new(OEM_ID, *b"THINVMFA", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    let fadt_addr = placer.place(bytes_of(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        *b"THINVMAP",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    let madt_addr = placer.place(bytes_of(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, *b"THINVMXS", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = placer.place(bytes_of(&xsdt))?;

    let mut blobs = vec![(rsdp_addr, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)))];
    blobs.extend(placer.blobs);
    Ok(Tables { rsdp_addr, blobs })
}

/// Builds the tables and writes them into guest memory; returns the RSDP's address.
pub fn setup(
    mem: &GuestMemoryMmap,
    cpus: u32,
    serial: SerialPort,
    devices: &[VirtioMmioSlot],
) -> Result<u64> {
    let tables = build(cpus, serial, devices)?;
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(VmmError::guest_memory(format!("ACPI table at {addr:#x}")))?;
    }
    Ok(tables.rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COM1: SerialPort = SerialPort {
        port: 0x3f8,
        irq: 4,
    };

    fn slots(n: u32) -> Vec<VirtioMmioSlot> {
        (0..n)
            .map(|i| VirtioMmioSlot {
                base: 0xd000_0000 + u64::from(i) * 0x1000,
                size: 0x1000,
                gsi: 5 + i,
            })
            .collect()
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`.
    fn table_at(t: &Tables, addr: u64) -> &[u8] {
        &t.blobs.iter().find(|(a, _)| *a == addr).unwrap().1
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn rsdp_leads_to_every_table_with_valid_checksums_and_lengths() {
        let t = build(2, COM1, &slots(3)).unwrap();
        assert_eq!(t.rsdp_addr, ACPI_START);
        let rsdp = table_at(&t, t.rsdp_addr);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2: XSDT");
        let xsdt = table_at(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let mut sigs = Vec::new();
        for e in 0..(xsdt.len() - 36) / 8 {
            let addr = u64_at(xsdt, 36 + e * 8);
            let table = table_at(&t, addr);
            assert_eq!(u32_at(table, 4) as usize, table.len(), "length field");
            assert_eq!(sum(table), 0, "checksum of {:?}", &table[0..4]);
            sigs.push(table[0..4].to_vec());
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        for (addr, bytes) in &t.blobs {
            assert!(*addr >= ACPI_START && addr + bytes.len() as u64 <= ACPI_END);
            assert_eq!(addr % 16, 0);
        }
        // No two tables overlap.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let t = build(1, COM1, &slots(1)).unwrap();
        let xsdt = table_at(&t, u64_at(table_at(&t, t.rsdp_addr), 24));
        let fadt = table_at(&t, u64_at(xsdt, 36));
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch & 0b10, 0, "no 8042 announced");
        assert_ne!(boot_arch & (1 << 5), 0, "no CMOS RTC");
        let dsdt = table_at(&t, u64_at(fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let t = build(4, COM1, &[]).unwrap();
        let xsdt = table_at(&t, u64_at(table_at(&t, t.rsdp_addr), 24));
        let madt = table_at(&t, u64_at(xsdt, 44));
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        let mut off = 44;
        let (mut lapics, mut ioapics) = (Vec::new(), Vec::new());
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                    lapics.push((madt[off + 2], madt[off + 3]));
                }
                1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(ioapics, vec![(4, IOAPIC_ADDR, 0)]);
        assert!(build(0, COM1, &[]).is_err());
        assert!(build(255, COM1, &[]).is_err());
        assert!(build(254, COM1, &slots(19)).is_ok());
    }

    #[test]
    fn dsdt_describes_each_virtio_mmio_device_and_the_serial_port() {
        let devices = slots(3);
        let t = build(1, COM1, &devices).unwrap();
        let xsdt = table_at(&t, u64_at(table_at(&t, t.rsdp_addr), 24));
        let dsdt = table_at(&t, u64_at(table_at(&t, u64_at(xsdt, 36)), 140));
        assert_eq!(count(dsdt, b"LNRO0005"), 3);
        for (i, d) in devices.iter().enumerate() {
            assert_eq!(count(dsdt, format!("VR{i:02}").as_bytes()), 1);
            // Memory32Fixed: 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&u32::try_from(d.base).unwrap().to_le_bytes());
            m.extend_from_slice(&u32::try_from(d.size).unwrap().to_le_bytes());
            assert_eq!(count(dsdt, &m), 1, "Memory32Fixed of device {i}");
            // Extended interrupt: 0x89, length 6, consumer + edge, one interrupt, the GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&d.gsi.to_le_bytes());
            assert_eq!(count(dsdt, &irq), 1, "Interrupt of device {i}");
        }
        // COM1: EISA id PNP0501 (compressed: 0x41d00501), I/O 0x3f8..0x3ff, IRQ 4.
        assert_eq!(count(dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        let mut irq4 = vec![0x89, 6, 0, 0b11, 1];
        irq4.extend_from_slice(&4u32.to_le_bytes());
        assert_eq!(count(dsdt, &irq4), 1);
        assert_eq!(count(dsdt, b"_SB_"), 1);
    }

    #[test]
    fn devices_above_4_gib_or_too_many_are_refused() {
        let high = [VirtioMmioSlot {
            base: 0xffff_f000,
            size: 0x2000,
            gsi: 5,
        }];
        assert!(build(1, COM1, &high).is_err());
        let wrap = [VirtioMmioSlot {
            base: u64::MAX,
            size: 2,
            gsi: 5,
        }];
        assert!(build(1, COM1, &wrap).is_err());
        // Ends exactly at 4 GiB, but a 4 GiB length has no Memory32Fixed encoding (it
        // would have been written as length 0).
        let whole = [VirtioMmioSlot {
            base: 0,
            size: 1 << 32,
            gsi: 5,
        }];
        assert!(build(1, COM1, &whole).is_err());
        assert!(build(1, COM1, &slots(101)).is_err());
    }
}
