//! vCPU threads: create and configure each vCPU, run it, dispatch its exits to the buses,
//! report why it stopped, and park it on request (pause, snapshot) — see [`PauseControl`].

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::arch::regs::X86_EFLAGS_IF;
use crate::arch::{cpuid, msr, regs};
use crate::error::{Result, VmmError};
use crate::lifecycle::{ExitReason, ExitState};
use crate::sync::lock;
use crate::vstate::report::{ExitLog, LastExit, VcpuReport, VcpuReports};

pub use super::kick::{install_kick_handler, kick_signal};

/// Per-vCPU state published for halt detection.
pub const RUNNING: u8 = 0;
/// Halted with interrupts disabled (what Linux does in `halt` without ACPI).
pub const HALTED_IRQS_OFF: u8 = 1;

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
    pub pause: Arc<PauseControl>,
    /// Where the vCPUs say what they are doing when asked (SIGUSR1, `--timeout`).
    pub reports: Arc<VcpuReports>,
}

/// What a parked vCPU is asked to do.
pub enum VcpuRequest {
    /// Save its KVM state.
    Save(Sender<Result<crate::snapshot::vcpu::VcpuState>>),
    /// Run again.
    Resume,
}

/// Parking the vCPUs: the controller sets `requested` and kicks them out of `KVM_RUN`; each
/// completes any pending I/O (a `KVM_RUN` with `immediate_exit`, so its registers are
/// consistent), reports itself parked and waits for requests.
pub struct PauseControl {
    pub requested: AtomicBool,
    senders: Vec<Mutex<Sender<VcpuRequest>>>,
    parked_tx: Mutex<Sender<u32>>,
    parked_rx: Mutex<Receiver<u32>>,
}

impl PauseControl {
    /// The control for `vcpus` and each vCPU's end of its request channel.
    pub fn new(vcpus: usize) -> (Arc<PauseControl>, Vec<Receiver<VcpuRequest>>) {
        let (parked_tx, parked_rx) = channel();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..vcpus)
            .map(|_| {
                let (tx, rx) = channel();
                (Mutex::new(tx), rx)
            })
            .unzip();
        (
            Arc::new(PauseControl {
                requested: AtomicBool::new(false),
                senders,
                parked_tx: Mutex::new(parked_tx),
                parked_rx: Mutex::new(parked_rx),
            }),
            receivers,
        )
    }

    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Parks every vCPU (kicking them with `kick`); fails after `wait`.
    pub fn pause_all(&self, kick: &dyn Fn(), wait: Duration) -> Result<()> {
        let rx = lock(&self.parked_rx);
        while rx.try_recv().is_ok() {}
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + wait;
        let mut parked = 0;
        while parked < self.senders.len() {
            kick();
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(_) => parked += 1,
                Err(_) if Instant::now() < deadline => {}
                Err(_) => {
                    drop(rx);
                    self.resume_all();
                    return Err(VmmError::VcpusNotParked {
                        parked,
                        total: self.senders.len(),
                        wait,
                    });
                }
            }
        }
        Ok(())
    }

    /// Saves every parked vCPU's state, in vCPU order.
    pub fn save_all(&self) -> Result<Vec<crate::snapshot::vcpu::VcpuState>> {
        let mut out = Vec::with_capacity(self.senders.len());
        for (id, s) in self.senders.iter().enumerate() {
            let (tx, rx) = channel();
            lock(s)
                .send(VcpuRequest::Save(tx))
                .map_err(|_| VmmError::VcpuUnresponsive {
                    id,
                    problem: "is gone",
                })?;
            out.push(rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
                VmmError::VcpuUnresponsive {
                    id,
                    problem: "did not answer",
                }
            })??);
        }
        Ok(out)
    }

    /// Lets every vCPU run again.
    pub fn resume_all(&self) {
        self.requested.store(false, Ordering::Release);
        for s in &self.senders {
            let _ = lock(s).send(VcpuRequest::Resume);
        }
    }
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    id: u32,
    requests: Option<Receiver<VcpuRequest>>,
    msr_list: Vec<u32>,
    /// Its exits, for [`VcpuReports`].
    exits: ExitLog,
}

impl Vcpu {
    /// Creates vCPU `id` of `cpus` and sets CPUID, MSRs, FPU and LAPIC.
    pub fn new(
        kvm: &Kvm,
        vm: &kvm_ioctls::VmFd,
        id: u32,
        cpus: u32,
        host: cpuid::HostFeatures,
    ) -> Result<Vcpu> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(VmmError::vcpu(id, "KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::vcpu(id, "KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::filter(&mut cpuid, id, cpus, host);
        fd.set_cpuid2(&cpuid)
            .map_err(VmmError::vcpu(id, "KVM_SET_CPUID2"))?;
        msr::setup_msrs(kvm, &fd, id)?;
        regs::setup_fpu(&fd, id)?;
        regs::setup_lapic(&fd, id)?;
        Ok(Vcpu {
            fd,
            id,
            requests: None,
            msr_list: Vec::new(),
            exits: ExitLog::new(),
        })
    }

    /// Creates vCPU `id` in a saved state (a restored VM).
    pub fn restored(
        vm: &kvm_ioctls::VmFd,
        state: &crate::snapshot::vcpu::VcpuState,
    ) -> Result<Vcpu> {
        let id = state.id;
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(VmmError::vcpu(id, "KVM_CREATE_VCPU"))?;
        crate::snapshot::vcpu::restore(&fd, id, state)?;
        Ok(Vcpu {
            fd,
            id,
            requests: None,
            msr_list: Vec::new(),
            exits: ExitLog::new(),
        })
    }

    /// The vCPU's KVM file descriptor (to probe what it supports).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's id (its local APIC id).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Where park requests come from, and the MSRs a saved state holds.
    pub fn set_pause(&mut self, requests: Receiver<VcpuRequest>, msr_list: Vec<u32>) {
        self.requests = Some(requests);
        self.msr_list = msr_list;
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
        seccomp: Option<(crate::seccomp::ThreadKind, seccompiler::BpfProgram)>,
    ) -> Result<JoinHandle<()>> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_loop(shared, seccomp))
            .map_err(|source| VmmError::VcpuThread { id, source })
    }

    fn run_loop(
        mut self,
        shared: VcpuShared,
        seccomp: Option<(crate::seccomp::ThreadKind, seccompiler::BpfProgram)>,
    ) {
        let id = self.id;
        if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
            shared.exit.set(ExitReason::Fatal {
                vcpu: id,
                msg: format!("cannot unblock the kick signal: {e}"),
            });
            return;
        }
        if let Some((kind, prog)) = seccomp {
            if let Err(e) = crate::seccomp::apply(kind, &prog) {
                shared.exit.set(ExitReason::Fatal {
                    vcpu: id,
                    msg: format!("cannot install the seccomp filter: {e}"),
                });
                return;
            }
        }
        while !shared.stop.load(Ordering::Acquire) {
            if shared.pause.is_paused() {
                if !self.park(&shared) {
                    return;
                }
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    self.exits.record(last_exit_of(&exit));
                    if let Some(reason) = handle_exit(id, exit, &shared) {
                        let reason = match reason {
                            ExitReason::InternalError { vcpu, .. } => self.internal_error(vcpu),
                            other => other,
                        };
                        shared.exit.set(reason);
                        return;
                    }
                    // The exit ended the VM (a device said so, e.g. the debug-exit port):
                    // the guest runs no further, as on QEMU.
                    if shared.exit.is_set() {
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

    /// Parks (see [`PauseControl`]); false when the vCPU must end.
    fn park(&mut self, shared: &VcpuShared) -> bool {
        // Complete the I/O of the last exit, so the registers are consistent.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let Some(requests) = &self.requests else {
            return false;
        };
        // Requests left over from an earlier pause this vCPU missed (a pause that gave up).
        while requests.try_recv().is_ok() {}
        let _ = lock(&shared.pause.parked_tx).send(self.id);
        loop {
            match requests.recv() {
                Ok(VcpuRequest::Save(reply)) => {
                    let _ = reply.send(crate::snapshot::vcpu::save(
                        &self.fd,
                        self.id,
                        &self.msr_list,
                    ));
                }
                Ok(VcpuRequest::Resume) => return !shared.stop.load(Ordering::Acquire),
                Err(_) => return false,
            }
        }
    }

    /// After a kick: record whether this vCPU sits in `hlt` with interrupts disabled, and
    /// answer an open report request.
    fn publish_halt_state(&mut self, shared: &VcpuShared) {
        self.exits.kicked(Instant::now());
        let (mp, regs) = (self.fd.get_mp_state(), self.fd.get_regs());
        let halted = match (&mp, &regs) {
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
        if let (Some(request), Ok(mp), Ok(r)) = (shared.reports.wanted(), mp, regs) {
            shared.reports.answer(
                self.id,
                request,
                VcpuReport {
                    rip: r.rip,
                    rflags: r.rflags,
                    mp_state: mp.mp_state,
                    exits: self.exits,
                },
            );
        }
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

/// What `exit` was, for [`VcpuReports`].
fn last_exit_of(exit: &VcpuExit<'_>) -> LastExit {
    let (kind, addr) = match exit {
        VcpuExit::IoIn(port, _) => ("port read", u64::from(*port)),
        VcpuExit::IoOut(port, _) => ("port write", u64::from(*port)),
        VcpuExit::MmioRead(addr, _) => ("mmio read", *addr),
        VcpuExit::MmioWrite(addr, _) => ("mmio write", *addr),
        VcpuExit::Hlt => ("hlt", 0),
        VcpuExit::Intr => ("intr", 0),
        VcpuExit::IrqWindowOpen => ("irq window open", 0),
        _ => ("other", 0),
    };
    LastExit { kind, addr }
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
