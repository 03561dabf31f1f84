//! Builds a VM from a [`VmConfig`], runs it until it ends, and tears it down.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::legacy::{SerialDevice, SerialOutput, I8042};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, KernelFormat};
use crate::arch::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use crate::arch::regs::EntryMode;
use crate::arch::{acpi, mptable, regs};
use crate::config::{SerialConfig, VmConfig};
use crate::disks;
use crate::error::{Result, VmmError};
use crate::event_loop::{self, Controller};
use crate::host;
use crate::lifecycle::{ExitReason, ExitState};
use crate::seccomp::{self, ThreadKind};
use crate::terminal;
use crate::vstate::vcpu::{self, Vcpu, VcpuShared, RUNNING};
use crate::vstate::vm::Vm;

const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;

fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))
}

/// Runs a VM to its end.
pub fn run(cfg: VmConfig) -> Result<ExitReason> {
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = event_loop::signal_fd()?;
    // Before the first thread is confined (disk workers are, as they start).
    if cfg.seccomp {
        seccomp::prepare_process()?;
    }
    let kvm = host::open_kvm()?;
    let max = kvm.get_max_vcpus() as u32;
    if cfg.cpus > max {
        return Err(VmmError::Config(format!(
            "--cpus {}: this host's KVM allows at most {max}",
            cfg.cpus
        )));
    }
    let nested = host::software_nested_kvm();
    let vm = Vm::new(&kvm, cfg.mem_size)?;
    let exit = Arc::new(ExitState::new().map_err(|e| VmmError::io("eventfd", e))?);
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
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
    pio.insert(serial.clone(), SERIAL_PORT, 8)
        .map_err(|e| VmmError::Device(e.to_string()))?;
    let reset_clone = reset_evt
        .try_clone()
        .map_err(|e| VmmError::io("eventfd", e))?;
    pio.insert(Arc::new(Mutex::new(I8042::new(reset_clone))), I8042_PORT, 5)
        .map_err(|e| VmmError::Device(e.to_string()))?;

    // Disks (virtio-mmio), announced on the command line (for kernels without ACPI; with
    // ACPI a kernel that also has VIRTIO_MMIO_CMDLINE_DEVICES registers each device once: the
    // second registration of the same MMIO range is refused).
    let mut cmdline = cfg.cmdline.clone();
    let mut disk_set = disks::attach(&vm, &mut mmio, &cfg, &mut cmdline)?;

    // Kernel, boot information, MP table, page tables. Once the kernel is loaded and known
    // to be Linux (a bzImage, or a vmlinux with the PVH note), warn once if this host cannot
    // run Linux user space.
    // ACPI tables (distribution kernels find the disks only there).
    let rsdp = if cfg.acpi {
        let slots: Vec<acpi::VirtioMmioSlot> = (0..cfg.disks.len())
            .map(|i| {
                let (base, gsi) = virtio_mmio_slot(i);
                acpi::VirtioMmioSlot {
                    base,
                    size: VIRTIO_MMIO_SIZE,
                    gsi,
                }
            })
            .collect();
        let serial = acpi::SerialPort {
            port: SERIAL_PORT as u16,
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
        &cmdline,
        rsdp,
    )?;
    let is_linux =
        loaded.format == KernelFormat::BzImage || matches!(loaded.entry, EntryMode::Pvh32 { .. });
    if let (Some(kind), true) = (nested, is_linux) {
        eprintln!("{}", host::nested_warning(kind));
    }
    mptable::setup(&vm.memory, cfg.cpus)?;
    let gdt = regs::setup_tables(&vm.memory, loaded.entry)?;

    vcpu::install_kick_handler()?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        vcpus.push(Vcpu::new(&kvm, &vm.fd, id, cfg.cpus, nested.is_some())?);
    }
    if let Some(boot_cpu) = vcpus.first() {
        boot_cpu.setup_boot_state(&gdt, loaded.entry)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let state: Arc<Vec<AtomicU8>> =
        Arc::new((0..cfg.cpus).map(|_| AtomicU8::new(RUNNING)).collect());
    let shared = VcpuShared {
        pio,
        mmio,
        exit: exit.clone(),
        stop: stop.clone(),
        state: state.clone(),
    };
    let vcpu_filter = if cfg.seccomp {
        Some(seccomp::filter(ThreadKind::Vcpu)?)
    } else {
        None
    };
    let vmm_filter = if cfg.seccomp {
        Some(seccomp::filter(ThreadKind::Vmm)?)
    } else {
        None
    };

    let raw_guard = if cfg.serial == SerialConfig::Stdio {
        terminal::enter_raw_mode()
    } else {
        None
    };
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(v.start(shared.clone(), vcpu_filter.clone())?);
    }
    let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    let kick_threads = threads.clone();
    let kick = Box::new(move || {
        for t in &kick_threads {
            // SAFETY: the vCPU threads are joined only after the event loop (and this
            // closure) is done; signalling an exited but unjoined thread is allowed.
            unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
        }
    });
    let stats = disk_set.stats_printer();
    let controller = Controller::new(
        exit.clone(),
        reset_evt,
        Some(serial),
        cfg.serial == SerialConfig::Stdio,
        signals,
        kick,
        state,
        stats,
        cfg.stats_interval,
    )?;
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmmError::Device(format!("event manager: {e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(controller)));

    if let Some(f) = &vmm_filter {
        seccomp::apply(ThreadKind::Vmm, f)?;
    }
    while exit.get().is_none() {
        if let Err(e) = em.run_with_timeout(500) {
            tracing::warn!("event loop: {e:?}");
        }
    }
    let reason = exit.get().unwrap_or(ExitReason::Poweroff);

    // Stop the vCPUs: set the flag, then kick until every thread has left KVM_RUN.
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (h, t) in handles.into_iter().zip(threads) {
        while !h.is_finished() && Instant::now() < deadline {
            // SAFETY: `t` belongs to `h`, which has not been joined yet.
            unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::error!("a vCPU thread did not stop");
        }
    }
    disk_set.shutdown();
    drop(raw_guard);
    Ok(reason)
}
