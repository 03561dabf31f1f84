//! `--vsock`: the virtio-vsock device on virtio-mmio, in the slot after the disks (its MMIO
//! window, IRQ, ioeventfds and irqfd), announced on the kernel command line, its thread under
//! its own seccomp filter.

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::vsock::{ThreadInit, Vsock, VsockConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use crate::config::MAX_DISKS;
use crate::error::{Result, VmmError};
use crate::seccomp::{self, ThreadKind};
use crate::testvm_config::VsockOptions;
use crate::vstate::vm::Vm;

/// The attached device.
pub struct VsockDevice {
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl VsockDevice {
    /// Stops the device's thread (the VM is ending).
    pub fn shutdown(&self) {
        crate::sync::lock(&self.transport).shutdown();
    }
}

/// Attaches the device in virtio-mmio slot `slot`; `announce_reset` for a restored VM.
pub fn attach(
    vm: &Vm,
    mmio: &mut Bus,
    opts: &VsockOptions,
    slot: usize,
    seccomp_on: bool,
    announce_reset: bool,
    cmdline: &mut String,
) -> Result<VsockDevice> {
    if slot >= MAX_DISKS {
        return Err(VmmError::VsockNoSlot);
    }
    let thread_init: Option<ThreadInit> = if seccomp_on {
        let prog = seccomp::filter(ThreadKind::Vsock)?;
        Some(Box::new(move || {
            seccomp::apply(ThreadKind::Vsock, &prog).map_err(block::ThreadStartError::from)
        }))
    } else {
        None
    };
    let dev = Vsock::new(
        VsockConfig {
            guest_cid: opts.cid,
            uds_path: opts.uds.clone(),
            announce_reset,
        },
        thread_init,
    )
    .map_err(VmmError::Vsock)?;
    let (base, gsi) = virtio_mmio_slot(slot).ok_or(VmmError::NoVirtioSlot { index: slot })?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
    vm.register_irqfd(&irq, gsi)?;
    let transport =
        MmioTransport::new(Box::new(dev), vm.memory.clone(), irq).map_err(|source| {
            VmmError::Transport {
                what: "vsock".into(),
                source,
            }
        })?;
    for (q, evt) in transport.notify_eventfds() {
        vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, q)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)
        .map_err(VmmError::bus("vsock virtio-mmio"))?;
    cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
    Ok(VsockDevice { transport })
}
