//! A vCPU's KVM state: saved from a parked vCPU (on its own thread, after a `KVM_RUN` with
//! `immediate_exit` completed any pending I/O), restored into a fresh one, each in the order
//! KVM needs (as Firecracker learned it):
//! * save: `MP_STATE` first (it may update the LAPIC), `VCPU_EVENTS` last;
//! * restore: CPUID before everything (MSRs and the LAPIC depend on it), `REGS` before
//!   `VCPU_EVENTS` (it clears pending exceptions), `SREGS` before `LAPIC` (the APIC base MSR),
//!   `LAPIC` before the MSRs (the TSC deadline is only accepted with the LAPIC set up), the
//!   TSC before the TSC deadline, and `VCPU_EVENTS` last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{Result, VmmError};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Listed by KVM but not readable back (Linux does not export it either).
const MSR_IA32_MCG_CTL: u32 = 0x17b;
/// KVM takes at most this many MSRs per call.
const MSR_CHUNK: usize = 64;

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// `entries` as KVM's MSR list of vCPU `id`.
fn msrs(id: u32, entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|source| VmmError::VcpuList {
        id,
        what: "MSRs",
        source,
    })
}

/// `KVM_GET_MSRS` of `indices` (at most [`MSR_CHUNK`]) on vCPU `id`: the entries and how
/// many KVM read (it stops at the first it cannot read).
fn read_msrs(vcpu: &VcpuFd, id: u32, indices: &[u32]) -> Result<(Msrs, usize)> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut m = msrs(id, &entries)?;
    let read = vcpu
        .get_msrs(&mut m)
        .map_err(VmmError::vcpu(id, "KVM_GET_MSRS"))?;
    Ok((m, read))
}

/// The MSRs worth saving: KVM's list, minus the ones it cannot read back on this vCPU
/// vCPU `id` (found by reading: `KVM_GET_MSRS` stops at the first it cannot read).
pub fn msrs_to_save(kvm: &Kvm, vcpu: &VcpuFd, id: u32) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VmmError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut wanted: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_MCG_CTL)
        .collect();
    let mut ok = Vec::with_capacity(wanted.len());
    while !wanted.is_empty() {
        let n = wanted.len().min(MSR_CHUNK);
        let (_, read) = read_msrs(vcpu, id, &wanted[..n])?;
        ok.extend_from_slice(&wanted[..read.min(n)]);
        // Skip the one that failed (if any) and go on after it.
        let next = if read < n { read + 1 } else { n };
        wanted.drain(..next);
    }
    Ok(ok)
}

fn get_msrs(vcpu: &VcpuFd, id: u32, which: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(which.len());
    for chunk in which.chunks(MSR_CHUNK) {
        let (m, read) = read_msrs(vcpu, id, chunk)?;
        if read != chunk.len() {
            return Err(VmmError::VcpuMsrRefused {
                id,
                op: "KVM_GET_MSRS",
                done: read,
                total: chunk.len(),
                index: chunk.get(read).copied().unwrap_or(0),
            });
        }
        out.extend_from_slice(m.as_slice());
    }
    // A TSC deadline of 0 can leave a timer interrupt that never comes after a restore
    // (Firecracker saw it): restart it from the saved TSC.
    if let Some(tsc) = out.iter().find(|e| e.index == MSR_IA32_TSC).map(|e| e.data) {
        for e in out.iter_mut() {
            if e.index == MSR_IA32_TSC_DEADLINE && e.data == 0 {
                e.data = tsc;
            }
        }
    }
    Ok(out)
}

/// Saves vCPU `id` (parked: out of `KVM_RUN`, pending I/O completed).
pub fn save(vcpu: &VcpuFd, id: u32, msr_list: &[u32]) -> Result<VcpuState> {
    let e = |op: &'static str| VmmError::vcpu(id, op);
    let mp_state = vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().ok();
    let debug_regs = vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(vcpu, id, msr_list)?;
    let events = vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// A 64-bit TSS descriptor type: available and busy.
const TSS64_AVAILABLE: u8 = 9;
const TSS64_BUSY: u8 = 11;

/// The task register as it is restored. KVM on AMD reports TR as busy (type 11, what a CPU's
/// `ltr` leaves in the descriptor); an AMD CPU ignores the type once TR is loaded (VMRUN does
/// not check it, 64-bit mode has no task switches), but an emulated SVM CPU (QEMU's TCG, the
/// test rig) keeps `ltr`'s type 9 and refuses user-space port I/O through the TSS I/O bitmap
/// (`ioperm`) when TR says 11, so a restored guest's `ioperm` users would fault. On AMD, TR
/// goes back as type 9; on Intel it stays 11 (VM entry requires a busy TSS there).
fn restored_tr(tr: kvm_segment, amd: bool) -> kvm_segment {
    if amd && tr.type_ == TSS64_BUSY {
        kvm_segment {
            type_: TSS64_AVAILABLE,
            ..tr
        }
    } else {
        tr
    }
}

/// Restores a saved state into fresh vCPU `id` (created, nothing set yet).
pub fn restore(vcpu: &VcpuFd, id: u32, s: &VcpuState) -> Result<()> {
    let e = |op: &'static str| VmmError::vcpu(id, op);
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|source| VmmError::VcpuList {
        id,
        what: "CPUID entries",
        source,
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz)
                .map_err(e("KVM_SET_TSC_KHZ (the snapshot's TSC frequency)"))?;
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    let amd = super::cpu_model::CpuModel::host().vendor == "AuthenticAMD";
    let sregs = kvm_sregs {
        tr: restored_tr(s.sregs.tr, amd),
        ..s.sregs
    };
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    // SAFETY: the xsave area comes from KVM_GET_XSAVE of the same CPU model (checked before
    // restoring anything) and has the size KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(e("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    let (late, early): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = s
        .msrs
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    for part in [early, late] {
        for chunk in part.chunks(MSR_CHUNK) {
            let m = msrs(id, chunk)?;
            let n = vcpu.set_msrs(&m).map_err(e("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(VmmError::VcpuMsrRefused {
                    id,
                    op: "KVM_SET_MSRS",
                    done: n,
                    total: chunk.len(),
                    index: chunk.get(n).map_or(0, |m| m.index),
                });
            }
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    // Tell a kvmclock guest it was stopped (no soft-lockup warnings); others refuse: fine.
    let _ = vcpu.kvmclock_ctrl();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_tss_is_restored_as_available_on_amd_only() {
        let busy = kvm_segment {
            base: 0xffff_fe00_0000_3000,
            limit: 0x4087,
            selector: 0x40,
            type_: TSS64_BUSY,
            present: 1,
            ..Default::default()
        };
        let amd = restored_tr(busy, true);
        assert_eq!(amd.type_, TSS64_AVAILABLE);
        assert_eq!(
            (amd.base, amd.limit, amd.selector, amd.present),
            (busy.base, 0x4087, 0x40, 1)
        );
        assert_eq!(restored_tr(busy, false).type_, TSS64_BUSY);
        let other = kvm_segment { type_: 3, ..busy };
        assert_eq!(restored_tr(other, true).type_, 3);
    }
}
