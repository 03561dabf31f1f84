//! ACPI tables as a guest finds them, on the host's KVM with the tiny guest tests/guest/acpi.c:
//! the RSDP through boot_params and the BIOS-area scan, every table reachable from it with a
//! valid checksum, one MADT local APIC per vCPU, and the DSDT's virtio-mmio devices at the
//! addresses and interrupts thinvm gave the disks — decoded by ACPICA's `iasl -d` (the same
//! interpreter family Linux uses) as the outside oracle. `--acpi off` leaves no tables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

/// Tables dumped by the guest: signature -> (address, bytes); plus the RSDP addresses seen.
struct Dump {
    rsdp_from_params: u64,
    rsdp_scanned: u64,
    tables: BTreeMap<String, (u64, Vec<u8>)>,
}

fn hex_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn parse(stdout: &str) -> Dump {
    let mut d = Dump {
        rsdp_from_params: 0,
        rsdp_scanned: 0,
        tables: BTreeMap::new(),
    };
    let mut current: Option<String> = None;
    for line in stdout.lines().map(str::trim_end) {
        if let Some(rest) = line.strip_prefix("RSDP ") {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("boot_params", v)) => d.rsdp_from_params = hex_u64(v),
                    Some(("scan", v)) => d.rsdp_scanned = hex_u64(v),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("TABLE ") {
            let mut it = rest.split_whitespace();
            let sig = it.next().unwrap().to_string();
            let addr = hex_u64(it.next().unwrap().trim_start_matches("addr="));
            d.tables.insert(sig.clone(), (addr, Vec::new()));
            current = Some(sig);
        } else if let Some(hex) = line.strip_prefix("HEX ") {
            let t = &mut d.tables.get_mut(current.as_ref().unwrap()).unwrap().1;
            for i in (0..hex.len()).step_by(2) {
                t.push(u8::from_str_radix(&hex[i..i + 2], 16).unwrap());
            }
        }
    }
    d
}

fn boot(dir: &TempDir, cpus: &str, disks: usize, acpi: &str) -> String {
    let kernel = guest("acpi");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--cpus".into(),
        cpus.into(),
        "--acpi".into(),
        acpi.into(),
    ];
    for i in 0..disks {
        let p = dir.join(&format!("d{i}.raw"));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        args.push("--disk".into());
        args.push(format!("path={},format=raw", p.display()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_thinvm(&refs, 60);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ACPI-DONE"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    stdout
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// Disassembles an AML table with ACPICA's iasl; returns the ASL text.
fn iasl_disassemble(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let dat = dir.join(&format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out =
        Command::new("iasl").arg("-d").arg(&dat).output().expect(
            "iasl (acpica-tools) is needed for this test: scripts/install-deps installs it",
        );
    assert!(
        out.status.success(),
        "iasl -d failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Whitespace normalised: one space between words.
    let dsl = std::fs::read_to_string(dir.join(&format!("{name}.dsl"))).unwrap();
    dsl.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn a_guest_finds_the_tables_and_the_dsdt_lists_every_disk() {
    if !kvm_or_skip("a_guest_finds_the_tables_and_the_dsdt_lists_every_disk") {
        return;
    }
    let dir = TempDir::new("acpi");
    let d = parse(&boot(&dir, "3", 2, "on"));
    assert_ne!(d.rsdp_scanned, 0, "no RSDP in the BIOS area");
    assert_eq!(
        d.rsdp_from_params, d.rsdp_scanned,
        "boot_params.acpi_rsdp_addr"
    );
    let sigs: Vec<&str> = d.tables.keys().map(String::as_str).collect();
    assert_eq!(sigs, ["APIC", "DSDT", "FACP", "RSDP", "XSDT"]);
    for (sig, (_, bytes)) in &d.tables {
        if sig == "RSDP" {
            assert_eq!(sum(&bytes[..20]), 0);
            assert_eq!(sum(bytes), 0);
        } else {
            assert_eq!(sum(bytes), 0, "checksum of {sig}");
        }
    }

    // The outside oracle: ACPICA decodes each table.
    let madt = iasl_disassemble(&dir, "apic", &d.tables["APIC"].1);
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        3,
        "{madt}"
    );
    assert!(madt.contains("Subtable Type : 01 [I/O APIC]"), "{madt}");
    let fadt = iasl_disassemble(&dir, "facp", &d.tables["FACP"].1);
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(
        fadt.contains("8042 Present on ports 60/64 (V2) : 0"),
        "{fadt}"
    );
    let dsdt = iasl_disassemble(&dir, "dsdt", &d.tables["DSDT"].1);
    assert_eq!(dsdt.matches("\"LNRO0005\"").count(), 2, "{dsdt}");
    for (i, (base, gsi)) in [("0xD0000000", 5), ("0xD0001000", 6)].iter().enumerate() {
        let device = format!(
            "Device (VR{i:02}) {{ Name (_HID, \"LNRO0005\") // _HID: Hardware ID \
             Name (_UID, {uid}) // _UID: Unique ID Name (_CCA, One) // _CCA: Cache Coherency Attribute \
             Name (_CRS, ResourceTemplate () // _CRS: Current Resource Settings {{ \
             Memory32Fixed (ReadWrite, {base}, // Address Base 0x00001000, // Address Length ) \
             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{gsi:08X}, }} }}) }}",
            uid = if i == 0 { "Zero" } else { "One" },
        );
        assert!(dsdt.contains(&device), "no {device}\nin {dsdt}");
    }
    assert!(
        dsdt.contains(
            "IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment \
             0x08, // Length ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) \
             { 0x00000004, }"
        ),
        "{dsdt}"
    );
    assert!(dsdt.contains("Name (_HID, EisaId (\"PNP0501\")"), "{dsdt}");
}

#[test]
fn acpi_off_leaves_no_tables() {
    if !kvm_or_skip("acpi_off_leaves_no_tables") {
        return;
    }
    let dir = TempDir::new("acpi-off");
    let d = parse(&boot(&dir, "1", 1, "off"));
    assert_eq!(d.rsdp_from_params, 0);
    assert_eq!(d.rsdp_scanned, 0);
    assert!(d.tables.is_empty());
}
