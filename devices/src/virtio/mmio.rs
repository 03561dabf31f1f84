//! The virtio-mmio transport, version 2 ("modern"): feature negotiation, queue setup,
//! notifications (through ioeventfds the VMM registers at `QUEUE_NOTIFY`), interrupt status,
//! the device status state machine with reset and re-activation, and config space.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4e56_4854; // "THVN"

/// Offset of the queue-notify register, where the VMM places its ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// One virtio device behind a 4 KiB MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq_evt` becomes the device's interrupt (an irqfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq_evt: EventFd,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e:?}")))?,
            );
            notify.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new(irq_evt),
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The queue notification eventfds with their queue index (the ioeventfd datamatch).
    pub fn notify_eventfds(&self) -> Vec<(u32, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u32, e))
            .collect()
    }

    /// The interrupt eventfd (to register as an irqfd).
    pub fn irq_eventfd(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The VM is ending: stops the device's worker and makes its state durable.
    pub fn shutdown(&mut self) {
        self.device.shutdown();
        self.active = false;
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue configuration may only change before the driver is done.
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            tracing::warn!("virtio-mmio: queue change after DRIVER_OK ignored");
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn reset(&mut self) {
        if self.active {
            if let Some(fds) = self.device.reset() {
                if fds.len() == self.notify.len() {
                    self.notify = fds;
                }
            }
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in order (virtio 1.x 3.1.1).
        let added = v & !self.status;
        if v & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: driver cleared status bits {:#x} -> {v:#x}",
                self.status
            );
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // Refuse: the device does not set FEATURES_OK.
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let needed = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if self.status & needed != needed || self.status & VIRTIO_CONFIG_S_FAILED != 0 {
            return;
        }
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                tracing::warn!("virtio-mmio: queue {i} not ready or invalid at DRIVER_OK");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.trigger(super::INT_CONFIG);
                return;
            }
        }
        let fds: std::io::Result<Vec<EventFd>> =
            self.notify.iter().map(|e| e.try_clone()).collect();
        let fds = match fds {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("virtio-mmio: cannot clone eventfds: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
        };
        for (q, notify) in self.queues.iter().zip(fds) {
            match Queue::try_from(q.state()) {
                Ok(queue) => active.push(ActiveQueue { queue, notify }),
                Err(e) => {
                    tracing::warn!("virtio-mmio: bad queue state: {e:?}");
                    self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), active)
        {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!("virtio-mmio: activation failed: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.trigger(super::INT_CONFIG);
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.update_queue(|q| q.set_size(v as u16)),
            VIRTIO_MMIO_QUEUE_READY => self.update_queue(|q| q.set_ready(v == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.update_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; this path serves other access widths.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::warn!(
                "virtio-mmio: bad register read at {offset:#x} ({} bytes)",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::warn!(
                "virtio-mmio: bad register write at {offset:#x} ({} bytes)",
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}
