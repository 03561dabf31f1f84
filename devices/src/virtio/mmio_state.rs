//! Snapshots of a virtio-mmio transport: everything the driver wrote (status, features,
//! selectors, each queue's size, readiness and ring addresses), the interrupt status, and,
//! for an active device, where each queue stands, taken once the device is paused (drained:
//! every chain it took from any queue is answered, its used-ring entry written). A
//! multi-queue device serves the first queue and those the driver made ready; the others
//! keep position zero and are left out again at restore. Restoring sets the same registers and, for an active
//! device, activates it with queues that continue from those positions.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, QueueConfig, QueueError};
use crate::virtio::{ActivateError, ActiveQueue, PauseError, QueueProgress};

/// One queue's registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegisters {
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A transport and its device, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub unoffered_features: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueRegisters>,
    pub active: bool,
    /// Where each queue stands (active devices).
    pub progress: Vec<QueueProgress>,
}

/// Why a transport refused its saved state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("saved device type {saved} is not this device's {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("{saved} saved queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("the device is already active")]
    AlreadyActive,
    #[error(
        "saved driver features {saved:#x} include some this device does not offer ({offered:#x})"
    )]
    Features { saved: u64, offered: u64 },
    #[error("an active device saved without its queues' positions")]
    NoPositions,
    #[error("queue {queue}: no saved position")]
    NoPosition { queue: usize },
    /// A saved queue the device cannot use.
    #[error("queue {queue}: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: QueueError,
    },
    /// A queue's notification eventfd could not be duplicated for the device.
    #[error("eventfd: {0}")]
    Eventfd(#[source] std::io::Error),
    /// The device refused to activate.
    #[error("activation: {0}")]
    Activate(#[source] ActivateError),
}

impl MmioTransport {
    /// Pauses the device (it drains what it took) and returns the transport's state. The
    /// device stays paused until [`MmioTransport::resume`].
    pub fn pause(&mut self) -> Result<TransportState, PauseError> {
        let reported = self.device.pause()?;
        // The device reports the queues its activation serves (see `activated_queues`);
        // the state holds one position per transport queue (a queue the driver left unused
        // stays at zero).
        let served = self.activated_queues();
        if self.active && reported.len() != served.len() {
            self.device.resume();
            return Err(PauseError::QueueCount {
                reported: reported.len(),
                served: served.len(),
            });
        }
        let mut progress = vec![QueueProgress::default(); self.queues.len()];
        for (&i, p) in served.iter().zip(reported) {
            if let Some(slot) = progress.get_mut(i) {
                *slot = p;
            }
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            unoffered_features: self.unoffered_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegisters {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                })
                .collect(),
            active: self.active,
            progress: if self.active { progress } else { Vec::new() },
        })
    }

    /// Lets the device go on after [`MmioTransport::pause`].
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Puts a fresh transport (its device never activated) in the saved state; an active
    /// device is activated with its queues where they stood.
    pub fn restore(&mut self, st: &TransportState) -> Result<(), RestoreError> {
        if st.device_type != self.device.device_type() {
            return Err(RestoreError::DeviceType {
                saved: st.device_type,
                device: self.device.device_type(),
            });
        }
        if st.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: st.queues.len(),
                device: self.queues.len(),
            });
        }
        if self.active {
            return Err(RestoreError::AlreadyActive);
        }
        if st.driver_features & !self.device.features() != 0 {
            return Err(RestoreError::Features {
                saved: st.driver_features,
                offered: self.device.features(),
            });
        }
        for (q, r) in self.queues.iter_mut().zip(&st.queues) {
            *q = QueueConfig {
                max_size: q.max_size,
                size: r.size,
                ready: r.ready,
                desc: r.desc,
                avail: r.avail,
                used: r.used,
            };
        }
        self.status = st.status;
        self.found |= st.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE != 0;
        self.driver_features = st.driver_features;
        self.unoffered_features = st.unoffered_features;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.queue_sel = st.queue_sel;
        self.interrupt.restore_status(st.interrupt_status);
        if st.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.device.ack_features(st.driver_features);
        }
        if !st.active {
            return Ok(());
        }
        if st.progress.len() != self.queues.len() {
            return Err(RestoreError::NoPositions);
        }
        let mut active = Vec::with_capacity(self.queues.len());
        for i in self.activated_queues() {
            let (Some(c), Some(p)) = (self.queues.get(i), st.progress.get(i)) else {
                return Err(RestoreError::NoPosition { queue: i });
            };
            let mut q = c
                .build(&self.mem)
                .map_err(|source| RestoreError::Queue { queue: i, source })?;
            q.set_next_avail(p.next_avail);
            q.set_next_used(p.next_used);
            let notify: EventFd = self.notify[i].try_clone().map_err(RestoreError::Eventfd)?;
            active.push(ActiveQueue { queue: q, notify });
        }
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), active)
            .map_err(RestoreError::Activate)?;
        self.active = true;
        Ok(())
    }
}
