//! The virtio-mmio transport, version 2 ("modern", virtio 1.2 §4.2.2): feature negotiation,
//! queue setup, notifications (through ioeventfds the VMM registers at `QUEUE_NOTIFY`),
//! interrupt status, the device status state machine with reset and re-activation, and
//! config space.
//!
//! Everything the driver writes is kept as written and judged at `DRIVER_OK`: a queue size
//! of 0, above the maximum, not a power of two or not even 16 bits, a misaligned ring, a
//! ring not wholly in guest RAM, a queue not made ready, `DRIVER_OK` without an accepted
//! `FEATURES_OK`: the device is not activated and sets `DEVICE_NEEDS_RESET` (with a
//! configuration-change interrupt), and only a reset gets it out of there. Status bits are
//! added in the spec's order (§3.1.1) and never cleared except by a reset; queue registers
//! change only between `FEATURES_OK` and `DRIVER_OK` and while the queue is not ready;
//! driver features only before `FEATURES_OK`, as in Firecracker's transport.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ratelimited_warn, ActiveQueue, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

#[path = "mmio_state.rs"]
mod state;
pub use state::{QueueRegisters, RestoreError, TransportState};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4e56_4854; // "THVN"

/// Offset of the queue-notify register, where the VMM places its ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Status bits the driver sets (the device sets only NEEDS_RESET).
const DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// The 32-bit word `sel` of a 64-bit feature set (§4.2.2: 0 the low, 1 the high half), 0
/// beyond.
fn feature_word(features: u64, sel: u32) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // keeping one 32-bit half is the point
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// What the driver wrote for one queue, applied at `DRIVER_OK`.
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    /// As written (32 bits); the maximum until the driver writes one.
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// The queue the configuration describes, if it is usable with `mem`.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let size = u16::try_from(self.size).map_err(|_| QueueError::SizeOver16Bits(self.size))?;
        let mut q = Queue::new(self.max_size).map_err(QueueError::Create)?;
        q.try_set_size(size).map_err(|source| QueueError::Size {
            size,
            max: self.max_size,
            source,
        })?;
        let misaligned = |ring: &'static str, addr: u64, align: u8| {
            move |source| QueueError::Misaligned {
                ring,
                addr,
                align,
                source,
            }
        };
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(misaligned("descriptor table", self.desc, 16))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(misaligned("available ring", self.avail, 2))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(misaligned("used ring", self.used, 4))?;
        let n = u64::from(size);
        for (ring, start, len) in [
            ("descriptor table", self.desc, 16 * n),
            ("available ring", self.avail, 6 + 2 * n),
            ("used ring", self.used, 6 + 8 * n),
        ] {
            let in_ram = start.checked_add(len).is_some()
                && usize::try_from(len).is_ok_and(|len| {
                    vm_memory::GuestMemoryBackend::check_range(mem, GuestAddress(start), len)
                });
            if !in_ram {
                return Err(QueueError::NotInRam { ring, start, len });
            }
        }
        q.set_ready(true);
        Ok(q)
    }
}

/// Why a transport could not be created for a device.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device's maximum size of a queue is not a valid queue size.
    #[error("queue size {max}: {source}")]
    QueueSize {
        max: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's notification eventfd could not be created.
    #[error("eventfd: {0}")]
    Eventfd(#[source] std::io::Error),
}

/// Why a queue, as the driver set it up, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The driver did not make the queue ready.
    #[error("not ready")]
    NotReady,
    /// A size that does not even fit 16 bits.
    #[error("size {0:#x}")]
    SizeOver16Bits(u32),
    /// virtio-queue refused the queue's maximum size.
    #[error("{0}")]
    Create(#[source] virtio_queue::Error),
    /// A size that is zero, above the maximum or not a power of two.
    #[error("size {size} (must be a power of two from 1 to {max})")]
    Size {
        size: u16,
        max: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring (`ring`: which) at an address not aligned as the spec requires.
    #[error("{ring} {addr:#x} not {align}-byte aligned")]
    Misaligned {
        ring: &'static str,
        addr: u64,
        align: u8,
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring (`ring`: which) not wholly in guest RAM.
    #[error("{ring} {start:#x}+{len:#x} not in guest RAM")]
    NotInRam {
        ring: &'static str,
        start: u64,
        len: u64,
    },
}

/// One virtio device behind a 4 KiB MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver set feature bits beyond the 64 the device has.
    unoffered_features: bool,
    queue_sel: u32,
    active: bool,
    /// A driver has acknowledged the device at least once (survives resets): a guest that
    /// never did never found it.
    pub(super) found: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq_evt` becomes the device's interrupt (an irqfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq_evt: EventFd,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &max in device.queue_max_sizes() {
            // The device's own maximum must be a valid queue size.
            Queue::new(max).map_err(|source| TransportError::QueueSize { max, source })?;
            queues.push(QueueConfig::new(max));
            notify.push(EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::Eventfd)?);
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
            unoffered_features: false,
            queue_sel: 0,
            active: false,
            found: false,
        })
    }

    /// The queue notification eventfds with their queue index (the ioeventfd datamatch).
    pub fn notify_eventfds(&self) -> Vec<(u32, &EventFd)> {
        (0u32..).zip(self.notify.iter()).collect()
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

    /// Whether a driver ever acknowledged the device (since it was made or restored).
    pub fn found_by_driver(&self) -> bool {
        self.found
    }

    /// Whether the device is serving its queues.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may change after FEATURES_OK, before DRIVER_OK, while the queue is
    /// not ready (§4.2.2.2: the driver must not touch them while QueueReady is set).
    fn update_queue(&mut self, what: &str, f: impl FnOnce(&mut QueueConfig)) {
        let open = self.has(VIRTIO_CONFIG_S_FEATURES_OK)
            && self.status
                & (VIRTIO_CONFIG_S_DRIVER_OK
                    | VIRTIO_CONFIG_S_FAILED
                    | VIRTIO_CONFIG_S_NEEDS_RESET)
                == 0;
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) if open && !q.ready => f(q),
            Some(_) => ratelimited_warn(&format!(
                "virtio-mmio: {what} write ignored (device status {:#x})",
                self.status
            )),
            None => ratelimited_warn(&format!(
                "virtio-mmio: {what} write for queue {} ignored: no such queue",
                self.queue_sel
            )),
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
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.unoffered_features = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    /// The device cannot go on until reset: DEVICE_NEEDS_RESET and a config interrupt.
    fn needs_reset(&mut self, why: &str) {
        ratelimited_warn(&format!("virtio-mmio: {why}; device needs a reset"));
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.trigger(super::INT_CONFIG);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let current = self.status & DRIVER_BITS;
        let wanted = v & DRIVER_BITS;
        if wanted & current != current {
            ratelimited_warn(&format!(
                "virtio-mmio: driver cleared status bits ({current:#x} -> {v:#x}); ignored"
            ));
            return;
        }
        let added = wanted & !current;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            ratelimited_warn("virtio-mmio: the driver gave up on the device (FAILED)");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // Bits in the order of §3.1.1, each needing the ones before it.
        let steps = [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (
                VIRTIO_CONFIG_S_FEATURES_OK,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
            ),
            (
                VIRTIO_CONFIG_S_DRIVER_OK,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            ),
        ];
        for (bit, needs) in steps {
            if added & bit == 0 {
                continue;
            }
            if bit == VIRTIO_CONFIG_S_DRIVER_OK {
                self.status |= bit;
                if !self.has(needs) {
                    self.needs_reset("DRIVER_OK before FEATURES_OK was accepted");
                } else if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
                    self.activate();
                }
                continue;
            }
            if !self.has(needs) {
                ratelimited_warn(&format!(
                    "virtio-mmio: status bit {bit:#x} set out of order (status {:#x}); ignored",
                    self.status
                ));
                return;
            }
            if bit == VIRTIO_CONFIG_S_FEATURES_OK && !self.features_acceptable() {
                // Refused: the device does not set FEATURES_OK (§3.1.1 step 6).
                return;
            }
            self.status |= bit;
            self.found |= bit == VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
    }

    /// Accepts the driver's features (FEATURES_OK): a subset of the offered ones, with
    /// VERSION_1 (this is a modern-only transport).
    fn features_acceptable(&mut self) -> bool {
        let offered = self.device.features();
        let f = self.driver_features;
        if f & !offered != 0 || self.unoffered_features {
            ratelimited_warn(&format!(
                "virtio-mmio: driver accepted features {:#x} the device did not offer",
                f & !offered
            ));
            return false;
        }
        if f & (1 << VIRTIO_F_VERSION_1) == 0 {
            ratelimited_warn("virtio-mmio: driver did not accept VERSION_1");
            return false;
        }
        self.device.ack_features(f);
        true
    }

    /// The queues an activation serves, in order: a driver may use fewer queues than a
    /// multi-queue device offers (Linux uses one per vCPU at most), so a queue after the
    /// first it never made ready is left out. (Readiness cannot change while the device is
    /// active, so a snapshot's registers give the same list.)
    fn activated_queues(&self) -> Vec<usize> {
        self.queues
            .iter()
            .enumerate()
            .filter(|(i, c)| *i == 0 || c.ready)
            .map(|(i, _)| i)
            .collect()
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut used = Vec::with_capacity(self.queues.len());
        for i in self.activated_queues() {
            let Some(c) = self.queues.get(i) else {
                continue;
            };
            match c.build(&self.mem) {
                Ok(q) => {
                    queues.push(q);
                    used.push(i);
                }
                Err(e) => {
                    self.needs_reset(&format!("queue {i} unusable at DRIVER_OK: {e}"));
                    return;
                }
            }
        }
        let fds: std::io::Result<Vec<EventFd>> = used
            .iter()
            .filter_map(|&i| self.notify.get(i))
            .map(|e| e.try_clone())
            .collect();
        let fds = match fds {
            Ok(f) => f,
            Err(e) => {
                self.needs_reset(&format!("cannot clone eventfds: {e}"));
                return;
            }
        };
        let active = queues
            .into_iter()
            .zip(fds)
            .map(|(queue, notify)| ActiveQueue { queue, notify })
            .collect();
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), active)
        {
            Ok(()) => self.active = true,
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                feature_word(self.device.features(), self.device_features_sel)
            }
            // 0 for a queue that does not exist (§4.2.2).
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length of -1 says so (§4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            // The config space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        let lo = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(v);
        let hi = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if !self.has(VIRTIO_CONFIG_S_DRIVER)
                    || self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) != 0
                {
                    ratelimited_warn(&format!(
                        "virtio-mmio: driver features written in status {:#x}; ignored",
                        self.status
                    ));
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
                    // No feature bits there: accepting one is accepting an unoffered feature,
                    // and FEATURES_OK will be refused.
                    _ => self.unoffered_features |= v != 0,
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.update_queue("QUEUE_NUM", |q| q.size = v),
            VIRTIO_MMIO_QUEUE_READY => {
                // Setting ready is a queue change like any other; clearing it is allowed
                // in the same window (a driver backing out of a setup).
                let open = self.has(VIRTIO_CONFIG_S_FEATURES_OK)
                    && self.status
                        & (VIRTIO_CONFIG_S_DRIVER_OK
                            | VIRTIO_CONFIG_S_FAILED
                            | VIRTIO_CONFIG_S_NEEDS_RESET)
                        == 0;
                match self.queues.get_mut(self.queue_sel as usize) {
                    Some(q) if open => q.ready = v == 1,
                    // Linux clears it after a reset when it deletes its queues.
                    _ if v == 0 => {}
                    _ => ratelimited_warn(&format!(
                        "virtio-mmio: QUEUE_READY write ignored (queue {}, status {:#x})",
                        self.queue_sel, self.status
                    )),
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.update_queue("QUEUE_DESC", |q| lo(&mut q.desc)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.update_queue("QUEUE_DESC", |q| hi(&mut q.desc)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.update_queue("QUEUE_AVAIL", |q| lo(&mut q.avail)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.update_queue("QUEUE_AVAIL", |q| hi(&mut q.avail)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.update_queue("QUEUE_USED", |q| lo(&mut q.used)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.update_queue("QUEUE_USED", |q| hi(&mut q.used)),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; this path serves other access widths.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write of register {offset:#x} ignored"),
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
        // Registers: 32-bit aligned accesses only (§4.2.2.2); anything else reads zeros.
        match (<[u8; 4]>::try_from(&mut *data), u32::try_from(offset)) {
            (Ok(_), Ok(offset)) if offset % 4 == 0 => {
                let v = self.read_reg(offset);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                ratelimited_warn(&format!(
                    "virtio-mmio: bad register read at {offset:#x} ({} bytes)",
                    data.len()
                ));
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        match (<[u8; 4]>::try_from(data), u32::try_from(offset)) {
            (Ok(b), Ok(reg)) if reg % 4 == 0 => self.write_reg(reg, u32::from_le_bytes(b)),
            _ => ratelimited_warn(&format!(
                "virtio-mmio: bad register write at {offset:#x} ({} bytes)",
                data.len()
            )),
        }
    }
}
