//! Builds a VM from a [`VmConfig`] (a boot) — or, with [`crate::restore`], from a snapshot —
//! runs it until it ends, and tears it down. Both paths share the devices ([`attach_devices`])
//! and everything from starting the vCPUs on ([`launch`]).

use std::os::unix::io::OwnedFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::legacy::{DebugExit, SerialDevice, SerialOutput, SerialSnapshot, I8042};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, KernelFormat};
use crate::arch::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use crate::arch::regs::EntryMode;
use crate::arch::{acpi, cpuid, mptable, regs};
use crate::config::{SerialConfig, VmConfig};
use crate::disks::{self, DiskSet};
use crate::error::{Result, VmmError};
use crate::event_loop::{self, Controller};
use crate::host;
use crate::lifecycle::{timing_mark, ExitReason, ExitState};
use crate::seccomp::{self, ThreadKind};
use crate::terminal;
use crate::vm_control::{VmControl, VsockHandle};
use crate::vsock::VsockDevice;
use crate::vstate::kvm_stats::IdleWatch;
use crate::vstate::report::VcpuReports;
use crate::vstate::vcpu::{self, PauseControl, Vcpu, VcpuShared, RUNNING};
use crate::vstate::vm::Vm;

const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;

fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))
}

/// The VM's devices, attached.
pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub reset_evt: EventFd,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub disk_set: DiskSet,
    pub vsock_dev: Option<VsockDevice>,
    /// The kernel command line with the virtio-mmio announcements.
    pub cmdline: String,
}

/// Blocks the handled signals (before any thread exists, so every thread inherits the mask)
/// and opens KVM, checking it allows `cpus` vCPUs.
pub fn open_kvm(cpus: u32, seccomp_on: bool) -> Result<(OwnedFd, Kvm)> {
    let signals = event_loop::signal_fd()?;
    // Before the first thread is confined (disk workers are, as they start).
    if seccomp_on {
        seccomp::prepare_process()?;
    }
    let kvm = host::open_kvm()?;
    // A limit beyond u32 allows every u32 count.
    let max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    if cpus > max {
        return Err(VmmError::TooManyVcpus { cpus, max });
    }
    Ok((signals, kvm))
}

/// Attaches the serial port (in `serial_state` for a restored VM), the i8042, the debug-exit
/// port, the disks and the vsock device (which `announce_reset`s for a restored VM).
pub fn attach_devices(
    vm: &Vm,
    cfg: &VmConfig,
    exit: &Arc<ExitState>,
    serial_state: Option<&SerialSnapshot>,
    announce_reset: bool,
) -> Result<Devices> {
    let reset_evt = eventfd()?;
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    // Serial console.
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let out = match &cfg.serial {
        SerialConfig::Stdio => SerialOutput::Stdout,
        SerialConfig::None => SerialOutput::Sink,
        SerialConfig::File(p) => SerialOutput::File(
            std::fs::File::create(p)
                .map_err(|e| VmmError::io(format!("serial output {}", p.display()), e))?,
        ),
    };
    let serial = match serial_state {
        None => SerialDevice::new(serial_irq, out),
        Some(s) => SerialDevice::restored(serial_irq, out, s).map_err(VmmError::SerialState)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
        .map_err(VmmError::bus("serial port"))?;
    let reset_clone = reset_evt
        .try_clone()
        .map_err(|e| VmmError::io("eventfd", e))?;
    pio.insert(Arc::new(Mutex::new(I8042::new(reset_clone))), I8042_PORT, 5)
        .map_err(VmmError::bus("i8042"))?;
    if let Some(d) = cfg.testvm.debug_exit {
        let exit = exit.clone();
        let dev = DebugExit::new(Box::new(move |v| exit.set(ExitReason::DebugExit(v))));
        pio.insert(
            Arc::new(Mutex::new(dev)),
            u64::from(d.port),
            u64::from(d.size),
        )
        .map_err(|source| VmmError::DebugExitOverlap {
            port: d.port,
            size: d.size,
            source,
        })?;
    }

    // Disks and the vsock device (virtio-mmio), announced on the command line (for kernels
    // without ACPI; with ACPI a kernel that also has VIRTIO_MMIO_CMDLINE_DEVICES registers each
    // device once: the second registration of the same MMIO range is refused).
    let mut cmdline = cfg.cmdline.clone();
    timing_mark("serial");
    let disk_set = disks::attach(vm, &mut mmio, cfg, &mut cmdline)?;
    timing_mark("disks");
    let vsock_dev = match &cfg.testvm.vsock {
        Some(opts) => Some(crate::vsock::attach(
            vm,
            &mut mmio,
            opts,
            cfg.disks.len(),
            cfg.seccomp,
            announce_reset,
            &mut cmdline,
        )?),
        None => None,
    };
    Ok(Devices {
        pio,
        mmio,
        reset_evt,
        serial,
        disk_set,
        vsock_dev,
        cmdline,
    })
}

/// Boots a VM and runs it to its end: [`build`], [`Launch::run`].
pub fn run(cfg: VmConfig) -> Result<ExitReason> {
    build(cfg)?.run()
}

/// Builds the VM `cfg` describes: KVM, memory, devices, the kernel loaded, vCPUs at its entry
/// point. Nothing runs yet.
pub fn build(cfg: VmConfig) -> Result<Launch> {
    timing_mark("build");
    let (signals, kvm) = open_kvm(cfg.cpus, cfg.seccomp)?;
    let nested = host::software_nested_kvm();
    timing_mark("kvm-open");
    let vm = Arc::new(Vm::new(&kvm, cfg.mem_size)?);
    timing_mark("vm-memory");
    let exit = Arc::new(ExitState::new().map_err(|e| VmmError::io("eventfd", e))?);
    let devs = attach_devices(&vm, &cfg, &exit, None, false)?;
    timing_mark("devices");

    // Kernel, boot information, MP table, page tables. Once the kernel is loaded and known
    // to be Linux (a bzImage, or a vmlinux with the PVH note), warn once if this host cannot
    // run Linux user space.
    // ACPI tables (distribution kernels find the disks only there).
    let rsdp = if cfg.acpi {
        // The disks, then the vsock device in the slot after them.
        let devices = cfg.disks.len() + usize::from(cfg.testvm.vsock.is_some());
        let slots = (0..devices)
            .map(|i| {
                let (base, gsi) = virtio_mmio_slot(i).ok_or(VmmError::NoVirtioSlot { index: i })?;
                Ok(acpi::VirtioMmioSlot {
                    base,
                    size: VIRTIO_MMIO_SIZE,
                    gsi,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let serial = acpi::SerialPort {
            port: SERIAL_PORT,
            irq: SERIAL_IRQ,
        };
        Some(acpi::setup(&vm.memory, cfg.cpus, serial, &slots)?)
    } else {
        None
    };
    let loaded = boot::load(
        &vm.memory,
        cfg.mem_size,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &devs.cmdline,
        rsdp,
    )?;
    let is_linux =
        loaded.format == KernelFormat::BzImage || matches!(loaded.entry, EntryMode::Pvh32 { .. });
    if let (Some(kind), true) = (nested, is_linux) {
        eprintln!("{}", host::nested_warning(kind));
    }
    mptable::setup(&vm.memory, cfg.cpus)?;
    let gdt = regs::setup_tables(&vm.memory, loaded.entry)?;
    timing_mark("kernel-loaded");

    let emulated_cpu = host::emulated_host_cpu();
    if emulated_cpu && cfg.cpus > 1 {
        tracing::debug!(
            "the host's CPU is emulated (QEMU TCG): the guest is not offered KVM's paravirtual TLB flush"
        );
    }
    let host_features = cpuid::HostFeatures {
        conservative: nested.is_some(),
        tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        hide_pv_tlb_flush: emulated_cpu,
    };
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        vcpus.push(Vcpu::new(&kvm, &vm.fd, id, cfg.cpus, host_features)?);
    }
    if let Some(boot_cpu) = vcpus.first() {
        boot_cpu.setup_boot_state(&gdt, loaded.entry)?;
    }
    Ok(Launch {
        kvm,
        vm,
        exit,
        devs,
        vcpus,
        signals,
        cfg,
    })
}

/// A VM ready to run: memory, devices and vCPUs in their first state.
pub struct Launch {
    pub kvm: Kvm,
    pub vm: Arc<Vm>,
    pub exit: Arc<ExitState>,
    pub devs: Devices,
    pub vcpus: Vec<Vcpu>,
    pub signals: OwnedFd,
    pub cfg: VmConfig,
}

impl Launch {
    /// Runs the VM to its end and tears it down: [`Launch::start`], [`RunningVm::wait`],
    /// [`RunningVm::tear_down`].
    pub fn run(self) -> Result<ExitReason> {
        let mut running = self.start()?;
        let reason = running.wait();
        running.tear_down();
        Ok(reason)
    }

    /// Starts the vCPUs and the event loop (with the API socket and the `--exec` client);
    /// from here on the calling thread is confined by the VMM's seccomp filter.
    pub fn start(self) -> Result<RunningVm> {
        start(self)
    }
}

fn start(l: Launch) -> Result<RunningVm> {
    let Launch {
        kvm,
        vm,
        exit,
        devs,
        mut vcpus,
        signals,
        cfg,
    } = l;
    let Devices {
        pio,
        mmio,
        reset_evt,
        serial,
        disk_set,
        vsock_dev,
        cmdline: _,
    } = devs;
    // What a snapshot saves of each vCPU; parking for pause and snapshot.
    let msr_list = match vcpus.first() {
        Some(v) => crate::snapshot::vcpu::msrs_to_save(&kvm, v.fd(), v.id())?,
        None => Vec::new(),
    };
    let (pause, requests) = PauseControl::new(vcpus.len());
    let reports = Arc::new(VcpuReports::new(vcpus.len()));
    for (v, r) in vcpus.iter_mut().zip(requests) {
        v.set_pause(r, msr_list.clone());
    }

    vcpu::install_kick_handler()?;
    let stop = Arc::new(AtomicBool::new(false));
    let state: Arc<Vec<AtomicU8>> =
        Arc::new((0..cfg.cpus).map(|_| AtomicU8::new(RUNNING)).collect());
    let shared = VcpuShared {
        pio,
        mmio,
        exit: exit.clone(),
        stop: stop.clone(),
        state: state.clone(),
        pause: pause.clone(),
        reports: reports.clone(),
    };
    // With an API socket, the main thread serves snapshots and the vCPUs save their state.
    let api = cfg.testvm.api_socket.is_some();
    let vcpu_kind = ThreadKind::vcpu_thread(api);
    let vmm_kind = ThreadKind::main_thread(api);
    let vcpu_filter = if cfg.seccomp {
        Some((vcpu_kind, seccomp::filter(vcpu_kind)?))
    } else {
        None
    };
    let vmm_filter = if cfg.seccomp {
        Some(seccomp::filter(vmm_kind)?)
    } else {
        None
    };

    let raw_guard = if cfg.serial == SerialConfig::Stdio {
        terminal::enter_raw_mode()
    } else {
        None
    };
    // Halt detection reads KVM's statistics of each vCPU where the kernel has them.
    let idle_watch = IdleWatch::new(vcpus.iter().map(|v| v.fd()));
    if idle_watch.is_none() {
        tracing::debug!("no KVM vCPU statistics: halt detection kicks every vCPU at each tick");
    }
    // When the vCPUs are about to enter the guest (benchmarks: restore to the first guest
    // instruction).
    timing_mark("vcpus-start");
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(v.start(shared.clone(), vcpu_filter.clone())?);
    }
    let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    let kick_threads = threads.clone();
    let kick: Arc<dyn Fn() + Send + Sync> = Arc::new(move || kick_all(&kick_threads));
    let stats = disk_set.stats_printer();
    let controller = Controller::new(
        exit.clone(),
        reset_evt,
        Some(serial.clone()),
        cfg.serial == SerialConfig::Stdio,
        signals,
        kick.clone(),
        state,
        idle_watch,
        stats,
        cfg.stats_interval,
        pause.clone(),
        reports.clone(),
    )?;
    let mut em: Events = EventManager::new().map_err(VmmError::EventManager)?;
    em.add_subscriber(Arc::new(Mutex::new(controller)));

    // `--api-socket`: pause, resume, snapshot.
    if let Some(path) = &cfg.testvm.api_socket {
        let control = VmControl::new(
            vm.clone(),
            pause.clone(),
            kick.clone(),
            serial.clone(),
            disk_set.handles(),
            match (&vsock_dev, &cfg.testvm.vsock) {
                (Some(d), Some(o)) => Some(VsockHandle {
                    transport: d.transport.clone(),
                    slot: cfg.disks.len(),
                    cid: o.cid,
                }),
                _ => None,
            },
            cfg.testvm.debug_exit.map(|d| (d.port, d.size)),
            cfg.mem_size,
            cfg.cpus,
        );
        let api = crate::api::ApiServer::bind(path, control)?;
        em.add_subscriber(Arc::new(Mutex::new(api)));
    }

    // `--exec`: the agent's client, started before the main thread confines itself (threads
    // inherit the filter of the thread that starts them) under its own filter.
    if let (Some(command), Some(v)) = (&cfg.testvm.exec, &cfg.testvm.vsock) {
        let client = crate::exec::ExecClient {
            uds: v.uds.clone(),
            command: command.clone(),
            exit: exit.clone(),
            forward_stdin: cfg.serial != SerialConfig::Stdio,
        };
        let filter = if cfg.seccomp {
            Some(seccomp::filter(ThreadKind::Exec)?)
        } else {
            None
        };
        // Detached: it ends with the VM (its socket closes) or with the process.
        drop(client.start(filter)?);
    }
    if let Some(f) = &vmm_filter {
        seccomp::apply(vmm_kind, f)?;
    }
    let deadline = cfg
        .testvm
        .timeout
        .map(|t| (Instant::now() + t, t.as_secs()));
    Ok(RunningVm {
        em: Some(em),
        exit,
        deadline,
        stop,
        pause,
        reports,
        handles,
        threads,
        disk_set,
        vsock_dev,
        raw_guard,
        torn_down: false,
        _vm: vm,
        _kvm: kvm,
    })
}

/// The event manager of the main thread.
type Events = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A VM whose vCPUs and event loop run: [`RunningVm::wait`] for its end, then
/// [`RunningVm::tear_down`] (dropping it tears it down too).
pub struct RunningVm {
    /// `None` once torn down.
    em: Option<Events>,
    exit: Arc<ExitState>,
    /// `--timeout`: when, and its length in seconds (for the exit reason).
    deadline: Option<(Instant, u64)>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseControl>,
    reports: Arc<VcpuReports>,
    handles: Vec<std::thread::JoinHandle<()>>,
    threads: Vec<libc::pthread_t>,
    disk_set: DiskSet,
    vsock_dev: Option<VsockDevice>,
    raw_guard: Option<terminal::RawModeGuard>,
    torn_down: bool,
    /// Kept until the vCPU threads are gone (guest memory, the VM and KVM descriptors).
    _vm: Arc<Vm>,
    _kvm: Kvm,
}

impl RunningVm {
    /// Serves the event loop until the VM ends (the guest, a signal, `--timeout`, `--exec`)
    /// and says how it ended.
    pub fn wait(&mut self) -> ExitReason {
        if let Some(em) = self.em.as_mut() {
            while self.exit.get().is_none() {
                let wait = match self.deadline {
                    Some((at, secs)) => {
                        let left = at.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            self.exit.set(ExitReason::Timeout(secs));
                            // What the guest was doing (the disks' queues follow at
                            // tear-down).
                            self.reports.print(&|| kick_all(&self.threads));
                            break;
                        }
                        // At most 500 (ms), so it fits.
                        i32::try_from(left.as_millis().min(500)).unwrap_or(500)
                    }
                    None => 500,
                };
                if let Err(e) = em.run_with_timeout(wait.max(1)) {
                    tracing::warn!("event loop: {e:?}");
                }
            }
        }
        self.exit.get().unwrap_or(ExitReason::Poweroff)
    }

    /// Stops the vCPUs, then the API socket and the devices, and gives the terminal back.
    pub fn tear_down(mut self) {
        self.stop_everything();
    }

    fn stop_everything(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        timing_mark("tear-down");
        // Stop the vCPUs: set the flag, let parked ones go, then kick until every thread has
        // left KVM_RUN.
        self.stop.store(true, Ordering::Release);
        self.pause.resume_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        for (h, t) in self.handles.drain(..).zip(self.threads.drain(..)) {
            while !h.is_finished() && Instant::now() < deadline {
                kick_all(&[t]);
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::error!("a vCPU thread did not stop");
            }
        }
        // The API socket goes first (no more requests), then the devices stop.
        self.em = None;
        self.disk_set.shutdown();
        if let Some(v) = &self.vsock_dev {
            v.shutdown();
        }
        self.raw_guard = None;
        timing_mark("torn-down");
    }
}

/// Kicks the vCPU threads `threads` out of `KVM_RUN`.
fn kick_all(threads: &[libc::pthread_t]) {
    for t in threads {
        // SAFETY: the vCPU threads are joined only after every kick (tear-down joins a thread
        // once it finished, then kicks it no more); signalling an exited but unjoined thread
        // is allowed.
        unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop_everything();
    }
}
