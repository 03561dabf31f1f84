//! x86_64 specifics: memory layout, boot protocols, CPU registers, CPUID, MSRs, MP table,
//! ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
