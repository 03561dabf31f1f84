//! virtio-blk: the device (features, config space, activation) backed by a
//! [`block::DiskImage`]; requests in [`request`], the I/O thread in [`worker`].

pub mod request;
pub mod stats;
pub mod worker;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use block::DiskImage;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
pub use request::Limits;
pub use stats::{BlockStats, StatsSnapshot};
use worker::{Activation, Command};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Largest discard / write-zeroes segment (1 GiB).
const MAX_SEGMENT_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request.
const MAX_SEGMENTS: u32 = 32;

/// How the VMM configures a disk.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub read_only: bool,
    /// `discard=unmap`: discards and unmapping write-zeroes release space.
    pub discard_unmap: bool,
    /// The 20-byte serial returned by GET_ID.
    pub serial: [u8; 20],
}

/// Builds a 20-byte virtio-blk serial from a string (truncated, NUL padded).
pub fn serial_bytes(s: &str) -> [u8; 20] {
    let mut out = [0u8; 20];
    let b = s.as_bytes();
    let n = b.len().min(20);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// Code run at the start of the worker thread (e.g. installing its seccomp filter).
pub type ThreadInit = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// A virtio-blk device.
pub struct Block {
    limits: Limits,
    features: u64,
    acked: u64,
    config: Vec<u8>,
    stats: Arc<BlockStats>,
    commands: Option<Sender<Command>>,
    returned: Receiver<EventFd>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    active: bool,
}

impl Block {
    /// Creates the device and its worker thread (which owns `image` from now on).
    pub fn new(
        image: Box<dyn DiskImage>,
        cfg: BlockConfig,
        thread_init: Option<ThreadInit>,
    ) -> std::io::Result<Self> {
        let capacity = image.virtual_size() / request::SECTOR;
        let granularity = (image.discard_granularity() / request::SECTOR).max(1) as u32;
        let read_only = cfg.read_only || image.is_read_only();
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let limits = Limits {
            capacity_sectors: capacity,
            max_discard_sectors: MAX_SEGMENT_SECTORS,
            max_discard_seg: MAX_SEGMENTS,
            max_write_zeroes_sectors: MAX_SEGMENT_SECTORS,
            max_write_zeroes_seg: MAX_SEGMENTS,
            read_only,
            discard_unmap: cfg.discard_unmap,
        };
        // struct virtio_blk_config (little endian).
        let mut c = vec![0u8; 0x3c];
        c[0x00..0x08].copy_from_slice(&capacity.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[0x14..0x18].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[0x22..0x24].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[0x24..0x28].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        c[0x28..0x2c].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[0x2c..0x30].copy_from_slice(&granularity.to_le_bytes());
        c[0x30..0x34].copy_from_slice(&MAX_SEGMENT_SECTORS.to_le_bytes());
        c[0x34..0x38].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[0x38] = u8::from(cfg.discard_unmap);
        let stats = Arc::new(BlockStats::default());
        stats.set_image(
            image.reclaim_stats(),
            image.host_usage().unwrap_or_default(),
        );
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let worker = worker::Worker {
            image,
            limits,
            serial: cfg.serial,
            stats: stats.clone(),
            stop: stop.try_clone()?,
        };
        let (tx, rx) = channel();
        let (ret_tx, ret_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                if let Some(init) = thread_init {
                    if let Err(e) = init() {
                        tracing::error!("virtio-blk worker: {e}");
                        return;
                    }
                }
                worker.run(rx, ret_tx)
            })?;
        Ok(Block {
            limits,
            features,
            acked: 0,
            config: c,
            stats,
            commands: Some(tx),
            returned: ret_rx,
            stop,
            thread: Some(thread),
            active: false,
        })
    }

    /// The disk's statistics (shared with the worker).
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.limits.read_only
    }

    /// Stops serving the queue; returns its notification eventfd.
    fn stop_serving(&mut self) -> Option<EventFd> {
        if !self.active {
            return None;
        }
        self.active = false;
        let _ = self.stop.write(1);
        self.returned.recv_timeout(Duration::from_secs(30)).ok()
    }

    /// Stops the worker thread after a final flush.
    fn stop_thread(&mut self) {
        self.stop_serving();
        if let Some(tx) = self.commands.take() {
            let _ = tx.send(Command::Shutdown);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("virtio-blk worker panicked");
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        // (The worker serves whatever queue it is given; only EVENT_IDX matters to it.)
        self.acked = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match start.checked_add(data.len()) {
            Some(end) if end <= self.config.len() => data.copy_from_slice(&self.config[start..end]),
            _ => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount(queues.len()));
        }
        let Some(mut q) = queues.pop() else {
            return Err(ActivateError::QueueCount(0));
        };
        let Some(tx) = &self.commands else {
            return Err(ActivateError::NoBackend);
        };
        q.queue
            .set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        tx.send(Command::Activate(Activation {
            queue: q.queue,
            notify: q.notify,
            mem,
            interrupt,
        }))
        .map_err(|_| ActivateError::NoBackend)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        self.acked = 0;
        self.stop_serving().map(|e| vec![e])
    }

    fn shutdown(&mut self) {
        self.stop_thread();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
