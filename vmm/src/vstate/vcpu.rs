//! vCPU threads: create and configure each vCPU, run it, dispatch its exits to the buses,
//! and report why it stopped.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::arch::{cpuid, msr, regs};
use crate::error::{Result, VmmError};
use crate::lifecycle::{ExitReason, ExitState};

/// Per-vCPU state published for halt detection.
pub const RUNNING: u8 = 0;
/// Halted with interrupts disabled (what Linux does in `halt` without ACPI).
pub const HALTED_IRQS_OFF: u8 = 1;

const X86_EFLAGS_IF: u64 = 1 << 9;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Everything a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitState>,
    pub stop: Arc<AtomicBool>,
    pub state: Arc<Vec<AtomicU8>>,
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    id: u32,
}

/// The signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; KVM_RUN returns EINTR when it arrives.
pub fn install_kick_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| VmmError::Kvm(format!("cannot install the vCPU kick handler: {e}")))
}

impl Vcpu {
    /// Creates vCPU `id` of `cpus` and sets CPUID, MSRs, FPU and LAPIC.
    pub fn new(
        kvm: &Kvm,
        vm: &kvm_ioctls::VmFd,
        id: u32,
        cpus: u32,
        conservative: bool,
    ) -> Result<Vcpu> {
        let verr = |msg: String| VmmError::Vcpu { id, msg };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| verr(format!("KVM_CREATE_VCPU: {e}")))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| verr(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
        cpuid::filter(&mut cpuid, id, cpus, conservative);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| verr(format!("KVM_SET_CPUID2: {e}")))?;
        msr::setup_msrs(kvm, &fd, id)?;
        regs::setup_fpu(&fd, id)?;
        regs::setup_lapic(&fd, id)?;
        Ok(Vcpu { fd, id })
    }

    /// Puts the boot vCPU at the kernel's entry point.
    pub fn setup_boot_state(&self, gdt: &[u64; 4], mode: regs::EntryMode) -> Result<()> {
        regs::setup_sregs(&self.fd, gdt, mode)?;
        regs::setup_regs(&self.fd, mode)
    }

    /// Starts the vCPU thread. `seccomp` is applied inside the thread before the first run.
    pub fn start(
        self,
        shared: VcpuShared,
        seccomp: Option<seccompiler::BpfProgram>,
    ) -> Result<JoinHandle<()>> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_loop(shared, seccomp))
            .map_err(|e| VmmError::Vcpu {
                id,
                msg: format!("cannot start thread: {e}"),
            })
    }

    fn run_loop(mut self, shared: VcpuShared, seccomp: Option<seccompiler::BpfProgram>) {
        let id = self.id;
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
            shared.exit.set(ExitReason::Fatal {
                vcpu: id,
                msg: format!("cannot unblock the kick signal: {e}"),
            });
            return;
        }
        if let Some(prog) = seccomp {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu, &prog) {
                shared.exit.set(ExitReason::Fatal {
                    vcpu: id,
                    msg: format!("cannot install the seccomp filter: {e}"),
                });
                return;
            }
        }
        while !shared.stop.load(Ordering::Acquire) {
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(reason) = handle_exit(id, exit, &shared) {
                        let reason = match reason {
                            ExitReason::InternalError { vcpu, .. } => self.internal_error(vcpu),
                            other => other,
                        };
                        shared.exit.set(reason);
                        return;
                    }
                    shared.state[id as usize].store(RUNNING, Ordering::Release);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.publish_halt_state(&shared);
                }
                Err(e) => {
                    shared.exit.set(ExitReason::Fatal {
                        vcpu: id,
                        msg: format!("KVM_RUN failed: {e}"),
                    });
                    return;
                }
            }
        }
    }

    /// After a kick: record whether this vCPU sits in `hlt` with interrupts disabled.
    fn publish_halt_state(&mut self, shared: &VcpuShared) {
        let halted = match (self.fd.get_mp_state(), self.fd.get_regs()) {
            // Halted with interrupts off, or an application processor the guest never
            // started (still waiting for INIT/SIPI).
            (Ok(mp), Ok(r)) => {
                (mp.mp_state == KVM_MP_STATE_HALTED && r.rflags & X86_EFLAGS_IF == 0)
                    || mp.mp_state == KVM_MP_STATE_UNINITIALIZED
                    || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED
            }
            _ => false,
        };
        shared.state[self.id as usize].store(
            if halted { HALTED_IRQS_OFF } else { RUNNING },
            Ordering::Release,
        );
    }

    /// Decodes a KVM internal error; emulation failures carry RIP and instruction bytes.
    fn internal_error(&mut self, vcpu: u32) -> ExitReason {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let run = self.fd.get_kvm_run();
        // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member of the
        // exit union; its first two fields are shared with `emulation_failure`.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return ExitReason::InternalError {
                vcpu,
                suberror: internal.suberror,
            };
        }
        // SAFETY: suberror KVM_INTERNAL_ERROR_EMULATION means `emulation_failure` is filled.
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        let bytes = if ef.ndata >= 2
            && ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
        {
            // SAFETY: the flag says the instruction bytes are present.
            let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let n = (insn.insn_size as usize).min(insn.insn_bytes.len());
            insn.insn_bytes[..n].to_vec()
        } else {
            Vec::new()
        };
        ExitReason::EmulationFailure { vcpu, rip, bytes }
    }
}

/// Handles one exit; returns why the VM must stop, if it must.
fn handle_exit(id: u32, exit: VcpuExit<'_>, shared: &VcpuShared) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !shared.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            shared.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !shared.mmio.read(addr, data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.mmio.write(addr, data);
            None
        }
        VcpuExit::Hlt => Some(ExitReason::Poweroff),
        VcpuExit::Shutdown => Some(ExitReason::TripleFault { vcpu: id }),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
            KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash { vcpu: id },
            other => ExitReason::Fatal {
                vcpu: id,
                msg: format!("unknown KVM system event {other}"),
            },
        }),
        VcpuExit::InternalError => Some(ExitReason::InternalError {
            vcpu: id,
            suberror: 0,
        }),
        VcpuExit::FailEntry(reason, _) => Some(ExitReason::FailEntry { vcpu: id, reason }),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        other => Some(ExitReason::Fatal {
            vcpu: id,
            msg: format!("unexpected exit {other:?}"),
        }),
    }
}
