//! virtio-blk: the device (features, config space, activation, reset, shutdown) backed by
//! a [`block::DiskImage`]; requests parsed in [`request`] (over [`guest_ranges`]), executed
//! in [`execute`], a queue served in bounded passes by [`engine`] on the thread in
//! [`worker`].

pub mod engine;
pub mod execute;
pub mod guest_ranges;
pub mod pause;
pub mod request;
pub mod stats;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::DiskImage;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActiveQueue, Interrupt, PauseError, QueueProgress, VirtioDevice};
pub use execute::WriteErrorPolicy;
pub use request::Limits;
pub use stats::{BlockStats, QueueSnapshot, StatsSnapshot};
use worker::{Activation, Command, Control, Ended};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (`seg_max`): a chain may have this many + 2 descriptors, which
/// is the queue size (virtio 1.2 §2.7.5.3.1: no chain longer than the queue size).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most request queues of one device (`num-queues`).
pub const MAX_QUEUES: u16 = 16;
/// Largest discard / write-zeroes segment (1 GiB).
const MAX_SEGMENT_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request.
const MAX_SEGMENTS: u32 = 32;
/// How long a driver reset waits for the worker to leave the old activation (it looks at
/// the epoch between chunks of 8 MiB, so only a host I/O call that blocks for this long makes
/// it wait that long). After that the reset completes, and a new activation is refused until
/// the worker has left the old one.
pub const RESET_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the worker to stop and flush before the VMM exits anyway.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// How the VMM configures a disk.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub read_only: bool,
    /// `discard=unmap`: discards and unmapping write-zeroes release space.
    pub discard_unmap: bool,
    /// The 20-byte serial returned by GET_ID.
    pub serial: [u8; 20],
    /// `werror=`: what a write that finds the host file system full does.
    pub werror: WriteErrorPolicy,
    /// The disk's name in log lines (e.g. `vda`).
    pub name: String,
    /// [`RESET_WAIT`] (tests shorten it).
    pub reset_wait: Duration,
    /// [`SHUTDOWN_WAIT`] (tests shorten it).
    pub shutdown_wait: Duration,
    /// The I/O engine (`aio=`); `None`: io_uring where the kernel allows it, else the I/O
    /// threads.
    pub aio: Option<block::engine::Aio>,
    /// Request queues offered (`num-queues`, VIRTIO_BLK_F_MQ above one); at least 1.
    pub num_queues: u16,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            read_only: false,
            discard_unmap: true,
            serial: [0; 20],
            werror: WriteErrorPolicy::default(),
            name: "disk".into(),
            reset_wait: RESET_WAIT,
            shutdown_wait: SHUTDOWN_WAIT,
            aio: None,
            num_queues: 1,
        }
    }
}

/// `struct virtio_blk_config`, as the driver reads it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` with only integer fields (its nested
// geometry and zoned structs have none and no padding either): no padding bytes, and every bit
// pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

/// Builds a 20-byte virtio-blk serial from a string (truncated, NUL padded).
pub fn serial_bytes(s: &str) -> [u8; 20] {
    let mut out = [0u8; 20];
    let b = s.as_bytes();
    let n = b.len().min(20);
    out[..n].copy_from_slice(&b[..n]);
    out
}

pub use crate::virtio::ThreadInit;

/// A virtio-blk device.
pub struct Block {
    limits: Limits,
    /// The most queues the driver may use (`num-queues`), each [`QUEUE_SIZE`] long.
    queue_sizes: Vec<u16>,
    features: u64,
    acked: u64,
    config: ConfigSpace,
    stats: Arc<BlockStats>,
    name: String,
    control: Arc<Control>,
    commands: Option<Sender<Command>>,
    ended: Receiver<Ended>,
    /// The activation handed to the worker that it has not reported ended yet.
    serving: Option<u64>,
    reset_wait: Duration,
    shutdown_wait: Duration,
    thread: Option<JoinHandle<()>>,
    /// Told when the worker thread is about to end.
    exited: Receiver<()>,
}

impl Block {
    /// Creates the device and its worker thread (which owns `image` from now on); data I/O
    /// runs on the engine `cfg.aio` names.
    pub fn new(
        image: Box<dyn DiskImage>,
        cfg: BlockConfig,
        thread_init: Option<ThreadInit>,
    ) -> std::io::Result<Self> {
        let aio = cfg.aio.unwrap_or_else(|| block::engine::default_aio().0);
        let io = block::engine::new_engine(aio)?;
        Self::with_io_engine(image, cfg, thread_init, io)
    }

    /// [`Block::new`] with data I/O on `io` (tests hold completions back with their own
    /// engine to have requests in flight for as long as they need).
    pub fn with_io_engine(
        image: Box<dyn DiskImage>,
        cfg: BlockConfig,
        thread_init: Option<ThreadInit>,
        io: Box<dyn block::engine::Engine>,
    ) -> std::io::Result<Self> {
        let capacity = image.virtual_size() / request::SECTOR;
        let granularity = u32::try_from((image.discard_granularity() / request::SECTOR).max(1))
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "discard granularity does not fit virtio-blk's 32-bit sector count",
                )
            })?;
        let read_only = cfg.read_only || image.is_read_only();
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        let num_queues = cfg.num_queues.clamp(1, MAX_QUEUES);
        if num_queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let limits = Limits {
            capacity_sectors: capacity,
            seg_max: SEG_MAX,
            max_discard_sectors: MAX_SEGMENT_SECTORS,
            max_discard_seg: MAX_SEGMENTS,
            max_write_zeroes_sectors: MAX_SEGMENT_SECTORS,
            max_write_zeroes_seg: MAX_SEGMENTS,
            read_only,
            discard_unmap: cfg.discard_unmap,
        };
        let mut c = ConfigSpace::default();
        let cs = &mut c.0;
        cs.capacity = capacity.to_le();
        cs.seg_max = SEG_MAX.to_le();
        cs.blk_size = 512u32.to_le();
        cs.num_queues = num_queues.to_le();
        cs.max_discard_sectors = MAX_SEGMENT_SECTORS.to_le();
        cs.max_discard_seg = MAX_SEGMENTS.to_le();
        cs.discard_sector_alignment = granularity.to_le();
        cs.max_write_zeroes_sectors = MAX_SEGMENT_SECTORS.to_le();
        cs.max_write_zeroes_seg = MAX_SEGMENTS.to_le();
        cs.write_zeroes_may_unmap = u8::from(cfg.discard_unmap);
        let stats = Arc::new(BlockStats::default());
        stats.set_image(
            image.reclaim_stats(),
            image.host_usage().unwrap_or_default(),
        );
        let control = Arc::new(Control {
            epoch: AtomicU64::new(0),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            pause: pause::PauseGate::default(),
        });
        let disk = execute::Disk::new(
            image,
            cfg.serial,
            stats.clone(),
            cfg.werror,
            cfg.discard_unmap,
        );
        let worker = worker::Worker {
            engine: engine::Engine::new(disk, limits, cfg.name.clone()).with_io_engine(io),
            control: control.clone(),
        };
        let (tx, rx) = channel();
        let (ended_tx, ended_rx) = channel();
        let (exited_tx, exited_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                match thread_init.map_or(Ok(()), |init| init()) {
                    Ok(()) => worker.run(rx, ended_tx),
                    Err(e) => tracing::error!("virtio-blk worker: {e}"),
                }
                let _ = exited_tx.send(());
            })?;
        Ok(Block {
            limits,
            queue_sizes: vec![QUEUE_SIZE; usize::from(num_queues)],
            features,
            acked: 0,
            config: c,
            stats,
            name: cfg.name,
            control,
            commands: Some(tx),
            ended: ended_rx,
            serving: None,
            reset_wait: cfg.reset_wait,
            shutdown_wait: cfg.shutdown_wait,
            thread: Some(thread),
            exited: exited_rx,
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

    /// A handle that runs jobs on the worker's image while the device is paused
    /// ([`VirtioDevice::pause`]): flushing it, or switching to another image.
    pub fn image_jobs(&self) -> ImageJobs {
        ImageJobs(self.control.clone())
    }

    /// Ends the activation being served: moves the epoch on, wakes the worker.
    fn end_activation(&self) {
        self.control.epoch.fetch_add(1, Ordering::AcqRel);
        let _ = self.control.wake.write(1);
    }

    /// Waits up to `wait` for the worker to report the end of the pending activation;
    /// returns its notification eventfds when it did.
    fn collect_ended(&mut self, wait: Duration) -> Option<Vec<EventFd>> {
        let pending = self.serving?;
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ended.recv_timeout(left) {
                Ok(e) if e.epoch == pending => {
                    self.serving = None;
                    return Some(e.notify);
                }
                // An older activation's late report: keep waiting for ours.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    // The worker is gone: nothing serves anything any more.
                    self.serving = None;
                    return None;
                }
            }
        }
    }

    /// Stops the worker thread after a final flush, waiting at most `shutdown_wait`.
    fn stop_thread(&mut self) {
        self.end_activation();
        if let Some(tx) = self.commands.take() {
            let _ = tx.send(Command::Shutdown);
        }
        let Some(t) = self.thread.take() else { return };
        if let Err(RecvTimeoutError::Timeout) = self.exited.recv_timeout(self.shutdown_wait) {
            // The thread is stuck in a host I/O call; leave it (it ends with the process).
            // The image is then as after a crash: consistent, perhaps with leaked clusters.
            tracing::error!(
                "virtio-blk {}: the I/O thread did not stop within {:.1} s (host I/O blocked?); exiting without its final flush",
                self.name,
                self.shutdown_wait.as_secs_f64()
            );
            return;
        }
        if t.join().is_err() {
            tracing::error!("virtio-blk worker panicked");
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        // (The worker serves whatever queue it is given; only EVENT_IDX matters to it.)
        self.acked = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(self.config.as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.is_empty() || queues.len() > self.queue_sizes.len() {
            return Err(ActivateError::QueueCount(queues.len()));
        }
        // No new activation while the worker may still touch the old one's queue.
        if self.serving.is_some() {
            let _ = self.collect_ended(Duration::from_millis(100));
            if self.serving.is_some() {
                return Err(ActivateError::StillStopping);
            }
        }
        let Some(tx) = &self.commands else {
            return Err(ActivateError::NoBackend);
        };
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let (mut qs, notify): (Vec<_>, Vec<_>) =
            queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        for q in &mut qs {
            q.set_event_idx(event_idx);
        }
        let epoch = self.control.epoch.load(Ordering::Acquire);
        tx.send(Command::Activate(Activation {
            epoch,
            queues: qs,
            notify,
            mem,
            interrupt,
        }))
        .map_err(|_| ActivateError::NoBackend)?;
        self.serving = Some(epoch);
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        self.acked = 0;
        self.serving?;
        self.end_activation();
        match self.collect_ended(self.reset_wait) {
            Some(fds) => Some(fds),
            None => {
                if self.serving.is_some() {
                    tracing::error!(
                        "virtio-blk {}: the I/O thread did not leave the old activation within {:.1} s (host I/O blocked?); the device refuses a new one until it has",
                        self.name,
                        self.reset_wait.as_secs_f64()
                    );
                }
                None
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop_thread();
    }

    fn pause(&mut self) -> Result<Vec<QueueProgress>, PauseError> {
        let control = self.control.clone();
        let commands = self.commands.clone();
        self.control.pause.request(
            move || {
                let _ = control.wake.write(1);
                if let Some(c) = &commands {
                    let _ = c.send(Command::Pause);
                }
            },
            self.reset_wait,
        )
    }

    fn resume(&mut self) {
        self.control.pause.release();
    }
}

/// Runs jobs on a paused disk's image (see [`Block::image_jobs`]).
#[derive(Clone)]
pub struct ImageJobs(Arc<Control>);

impl ImageJobs {
    /// Runs `job` on the image of the paused worker and waits for it.
    pub fn run(&self, job: pause::ImageJob) -> Result<(), PauseError> {
        self.0.pause.run_job(job, SHUTDOWN_WAIT)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
