//! CPUID for each vCPU: KVM's supported set, with APIC ids, topology and the hypervisor bit
//! filled in per vCPU, and (on software-nested hosts) the features that host's instruction
//! emulator cannot handle hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX / EDX bits.
const ECX_PCLMUL: u32 = 1 << 1;
const ECX_FMA: u32 = 1 << 12;
const ECX_CX16: u32 = 1 << 13;
const ECX_PCID: u32 = 1 << 17;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_AES: u32 = 1 << 25;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x4000_0001 EAX (KVM's paravirtual features): the TLB-flush hypercall path.
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
/// Leaf 0x8000_0001 ECX: ABM (LZCNT/POPCNT).
const EXT_ECX_ABM: u32 = 1 << 5;

/// Deterministic cache leaves (Intel leaf 4, AMD 0x8000_001D) EAX[25:14]: the logical
/// processors sharing the cache, minus one.
const CACHE_SHARING_MASK: u32 = 0xfff << 14;

/// Features hidden on software-nested hosts (see the host notes: the host's emulator fails
/// on cmpxchg16b, xrstor, popcnt, clac, ...).
const CONSERVATIVE_HIDE_LEAF1_ECX: u32 = ECX_PCLMUL
    | ECX_FMA
    | ECX_CX16
    | ECX_PCID
    | ECX_MOVBE
    | ECX_POPCNT
    | ECX_AES
    | ECX_XSAVE
    | ECX_OSXSAVE
    | ECX_AVX
    | ECX_F16C
    | ECX_RDRAND;

/// What the host offers beyond KVM's supported CPUID.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostFeatures {
    /// Hide what a software-nested host's instruction emulator cannot handle.
    pub conservative: bool,
    /// KVM emulates the local APIC's TSC-deadline timer mode (`KVM_CAP_TSC_DEADLINE_TIMER`);
    /// KVM's supported CPUID never sets the bit itself, VMMs do (QEMU, Firecracker and Cloud
    /// Hypervisor all do).
    pub tsc_deadline: bool,
    /// Hide KVM's paravirtual TLB flush (a host whose CPU QEMU's TCG emulates: see
    /// `host::emulated_host_cpu` and docs/design.md).
    pub hide_pv_tlb_flush: bool,
}

/// Adjusts `cpuid` for vCPU `id` of `cpus`.
pub fn filter(entries: &mut CpuId, id: u32, cpus: u32, host: HostFeatures) {
    let shift = 32 - (cpus.max(1) - 1).leading_zeros();
    for e in entries.as_mut_slice().iter_mut() {
        filter_entry(e, id, cpus, shift, host);
    }
}

fn filter_entry(e: &mut kvm_cpuid_entry2, id: u32, cpus: u32, shift: u32, host: HostFeatures) {
    let conservative = host.conservative;
    match e.function {
        1 => {
            // The guest programs its timer with one MSR write instead of the APIC's
            // initial-count register (an MMIO write KVM must decode and emulate).
            if host.tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !ECX_TSC_DEADLINE;
            }
            // Initial APIC id, logical processor count, CLFLUSH line size (64 bytes).
            e.ebx = (id << 24) | ((cpus.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if cpus > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
            if conservative {
                e.ecx &= !CONSERVATIVE_HIDE_LEAF1_ECX;
            }
        }
        4 => {
            // Cores per package - 1 in EAX[31:26]; one thread per core.
            e.eax = (e.eax & 0x03ff_ffff) | ((cpus.min(64) - 1) << 26);
            e.eax = cache_sharing(e.eax, cpus);
        }
        0x8000_001d => e.eax = cache_sharing(e.eax, cpus),
        7 if conservative => {
            // SMEP, SMAP, FSGSBASE, BMI, ERMS, INVPCID, AVX2, RDSEED, ADX (EBX); UMIP, RDPID
            // (ECX); FSRM (EDX) ...
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // x2APIC topology: level 0 = SMT (1 thread), level 1 = core (all CPUs).
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = shift;
                    e.ebx = cpus;
                    e.ecx = (2 << 8) | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n;
                }
            }
            e.edx = id;
        }
        0xd if conservative => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0x4000_0001 if host.hide_pv_tlb_flush => {
            e.eax &= !KVM_FEATURE_PV_TLB_FLUSH;
        }
        0x8000_0001 if conservative => {
            e.ecx &= !EXT_ECX_ABM;
        }
        _ => {}
    }
}

/// `eax` of a deterministic cache leaf with the vCPUs sharing that cache: each vCPU is a
/// core of one thread, so its L1 and L2 are its own, and the last level (L3 and beyond) is
/// shared by every vCPU, as in one package. The guest's scheduler and block layer go by
/// this: CPUs that share a last-level cache wake each other's tasks and complete each
/// other's I/O directly, other CPUs by an inter-processor interrupt (a private L3 per vCPU,
/// as the host's values or a zeroed field would say, costs the guest IPIs and exits).
fn cache_sharing(eax: u32, cpus: u32) -> u32 {
    let level = (eax >> 5) & 0x7;
    let sharing = if level >= 3 {
        cpus.clamp(1, 0x1000) - 1
    } else {
        0
    };
    (eax & !CACHE_SHARING_MASK) | (sharing << 14)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx: u32::MAX,
            ebx: 0xffff_ffff,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(0xb, 1), entry(7, 0)]).unwrap();
        filter(&mut cpuid, 3, 4, HostFeatures::default());
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert!(s[0].ecx & ECX_HYPERVISOR != 0);
        assert!(s[0].ecx & ECX_CX16 != 0, "not hidden unless conservative");
        assert_eq!(s[0].ecx & ECX_TSC_DEADLINE, 0, "only where KVM emulates it");
        assert_eq!(s[1].ebx, 4);
        assert_eq!(s[1].eax, 2);
        assert_eq!(s[1].edx, 3);
        assert_ne!(s[2].ebx, 0);
        let mut fresh = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        fresh.as_mut_slice()[0].ecx = 0;
        let with_deadline = HostFeatures {
            tsc_deadline: true,
            ..Default::default()
        };
        filter(&mut fresh, 0, 1, with_deadline);
        assert_ne!(fresh.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
        let conservative = HostFeatures {
            conservative: true,
            ..Default::default()
        };
        filter(&mut cpuid, 0, 1, conservative);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ecx & (ECX_CX16 | ECX_POPCNT | ECX_XSAVE), 0);
        assert_eq!(s[2].ebx, 0);
    }

    /// L1 and L2 are each vCPU's own, the L3 is shared by all of them, on Intel's leaf 4
    /// and AMD's 0x8000_001D, whatever the host said.
    #[test]
    fn the_last_level_cache_is_shared_by_every_vcpu() {
        // EAX: cache type 1-3 in bits 4:0, level in bits 7:5, host's sharing count all ones.
        let leaf = |function, index, level: u32| {
            let mut e = entry(function, index);
            e.eax = CACHE_SHARING_MASK | (level << 5) | 1;
            e
        };
        for function in [4, 0x8000_001d] {
            let mut cpuid = CpuId::from_entries(&[
                leaf(function, 0, 1),
                leaf(function, 1, 2),
                leaf(function, 2, 3),
            ])
            .unwrap();
            filter(&mut cpuid, 1, 6, HostFeatures::default());
            let sharing: Vec<u32> = cpuid
                .as_slice()
                .iter()
                .map(|e| (e.eax & CACHE_SHARING_MASK) >> 14)
                .collect();
            assert_eq!(sharing, [0, 0, 5], "leaf {function:#x}");
            assert!(cpuid
                .as_slice()
                .iter()
                .all(|e| e.eax & 0xff == (e.eax & 0xe0) | 1));
        }
    }

    #[test]
    fn the_pv_tlb_flush_is_hidden_only_when_asked() {
        let kvm_features = |hide| {
            let mut e = entry(0x4000_0001, 0);
            e.eax = 0x01ff_ffff;
            let mut cpuid = CpuId::from_entries(&[e]).unwrap();
            let host = HostFeatures {
                hide_pv_tlb_flush: hide,
                ..Default::default()
            };
            filter(&mut cpuid, 0, 2, host);
            cpuid.as_slice()[0].eax
        };
        assert_eq!(kvm_features(false), 0x01ff_ffff);
        assert_eq!(kvm_features(true), 0x01ff_ffff & !KVM_FEATURE_PV_TLB_FLUSH);
    }
}
