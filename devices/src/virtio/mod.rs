//! virtio devices and their MMIO transport (virtio 1.x, split virtqueues).

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// Logs at most a few lines per second (all devices together), so a hostile guest cannot
/// flood the host's logs.
pub fn ratelimited_warn(msg: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs();
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        let suppressed = COUNT.swap(0, Ordering::Relaxed).saturating_sub(5);
        if suppressed > 0 {
            tracing::warn!("virtio: {suppressed} similar messages suppressed");
        }
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < 5 {
        tracing::warn!("{msg}");
    }
}

/// The interrupt line of a virtio-mmio device: the interrupt status register and the
/// irqfd that raises the guest interrupt.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

/// "A used buffer notification": bit 0 of the interrupt status.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Configuration change: bit 1.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl Interrupt {
    pub fn new(evt: EventFd) -> Arc<Self> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            evt,
        })
    }

    /// Raises the interrupt for `reason` (INT_VRING / INT_CONFIG).
    pub fn trigger(&self, reason: u32) {
        self.status.fetch_or(reason, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the interrupt status register of a restored VM and, when a bit is set, raises
    /// the interrupt again. The saved interrupt controller may not hold it: KVM injects an
    /// irqfd's IOAPIC interrupt from a work queue, which can run after the controller's
    /// state was read for the snapshot, and a completion whose interrupt is lost leaves the
    /// guest's driver waiting forever. A second interrupt finds the status register clear
    /// and is ignored by the driver.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
        if bits != 0 {
            if let Err(e) = self.evt.write(1) {
                tracing::error!("virtio: cannot raise interrupt: {e}");
            }
        }
    }

    /// The irqfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Code run at the start of a device's thread (e.g. installing its seccomp filter); its error
/// is the caller's own (see [`::block::ThreadStartError`]), logged by the thread, which then
/// ends.
pub type ThreadInit = Box<dyn FnOnce() -> Result<(), ::block::ThreadStartError> + Send>;

/// A queue handed to a device at activation, with its notification eventfd.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device has no backend (already active?)")]
    NoBackend,
    #[error("wrong number of queues: {0}")]
    QueueCount(usize),
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The device's I/O thread has not yet left the previous activation (a reset that could
    /// not wait for it): the driver must reset the device and try again later.
    #[error("the previous activation has not ended yet")]
    StillStopping,
}

/// Where a queue the device serves stands: the next available entry it will take and the
/// next used entry it will fill (what a snapshot needs besides the driver's registers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueProgress {
    pub next_avail: u16,
    pub next_used: u16,
}

/// Why a device cannot be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("this device cannot be paused")]
    Unsupported,
    /// Writes the worker holds until the host has space again.
    #[error("{0} writes wait for host space")]
    WritesWaiting(usize),
    /// Requests the worker submitted that did not complete.
    #[error("{0} requests did not complete")]
    InFlight(usize),
    /// The device's thread ended.
    #[error("the device's thread is gone")]
    ThreadGone,
    /// A job for a disk whose worker is not parked.
    #[error("the disk is not paused")]
    NotPaused,
    /// The device reported the positions of another number of queues than it serves.
    #[error("the device reported {reported} queues; it serves {served}")]
    QueueCount { reported: usize, served: usize },
    #[error("the device's thread did not stop within {0:?}")]
    Timeout(std::time::Duration),
}

/// What the MMIO transport needs from a device.
/// Reads a device's config space `cfg` at a driver-chosen `offset` into `data`: the bytes in
/// range are copied, everything past the end of the space reads as zero.
pub fn read_config_space(cfg: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(start) = usize::try_from(offset) {
        if start < cfg.len() {
            let n = data.len().min(cfg.len() - start);
            data[..n].copy_from_slice(&cfg[start..start + n]);
        }
    }
}

pub trait VirtioDevice: Send {
    /// virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops processing; returns the queues' notification eventfds so the transport can
    /// reuse them (they stay registered with KVM).
    fn reset(&mut self) -> Option<Vec<EventFd>>;
    /// The VM is ending: stop processing and make everything durable.
    fn shutdown(&mut self) {}
    /// Stops touching guest memory and the queues once every request already taken from a
    /// queue is answered (a snapshot drains the device first); returns where each queue it
    /// serves stands (none when it is not active). Until [`VirtioDevice::resume`] the device
    /// takes nothing new.
    fn pause(&mut self) -> Result<Vec<QueueProgress>, PauseError> {
        Err(PauseError::Unsupported)
    }
    /// Goes on after [`VirtioDevice::pause`].
    fn resume(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::read_config_space;

    #[test]
    fn config_reads_past_the_end_are_zeros_at_any_offset() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_space(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        for off in [4, 5, u64::from(u32::MAX), u64::MAX] {
            let mut d = [0xffu8; 8];
            read_config_space(&cfg, off, &mut d);
            assert_eq!(d, [0; 8], "offset {off}");
        }
    }
}
