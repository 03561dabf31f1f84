//! virtio-vsock (virtio 1.2 §5.10) with Firecracker's host side: the guest's `AF_VSOCK`
//! stream sockets are carried to and from Unix sockets of the host (see [`muxer`]).
//!
//! * [`header`]: the packet header and the protocol's constants;
//! * [`packet`]: descriptor chains of the queues, parsed and checked once;
//! * [`connection`]: one connection's state machine and credit-based flow control;
//! * [`muxer`]: the VM's Unix socket, the connection table, what the guest is owed next;
//! * [`worker`]: the device's thread (an epoll loop).
//!
//! The device offers stream sockets only (no `VIRTIO_VSOCK_F_SEQPACKET`), three queues of
//! [`QUEUE_SIZE`] (rx, tx, event), and its config space is the guest's CID (le64).

pub mod connection;
pub mod header;
pub mod muxer;
pub mod packet;
pub mod worker;

use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActiveQueue, Interrupt, PauseError, QueueProgress, VirtioDevice};
use worker::{Activation, Command, Worker};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// How long a reset or pause waits for the device's thread (it never blocks on host I/O, so
/// this is only reached if the thread died).
const COMMAND_WAIT: Duration = Duration::from_secs(5);

pub use crate::virtio::ThreadInit;

/// How the VMM configures the device.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's context id (3 ..= u32::MAX - 1).
    pub guest_cid: u64,
    /// The VM's Unix socket (`PATH`; guest connections to host port P go to `PATH_P`).
    pub uds_path: PathBuf,
    /// Tell the driver, at its first activation, that every connection was reset (the VM was
    /// restored from a snapshot).
    pub announce_reset: bool,
}

/// Errors of the device's creation.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0}: must be from 3 to 4294967294 (0-2 and -1 are reserved)")]
    Cid(u64),
    #[error("Unix socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the device's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The virtio-vsock device.
pub struct Vsock {
    cfg: VsockConfig,
    commands: Option<Sender<Command>>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    active: bool,
    announce_reset: bool,
}

impl Vsock {
    /// Binds the VM's Unix socket and starts the device's thread (which runs `thread_init`
    /// first).
    pub fn new(cfg: VsockConfig, thread_init: Option<ThreadInit>) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(cfg.guest_cid));
        }
        let sock = |source| VsockError::Socket {
            path: cfg.uds_path.display().to_string(),
            source,
        };
        let muxer = muxer::Muxer::new(cfg.guest_cid, &cfg.uds_path).map_err(sock)?;
        let epoll = Epoll::new().map_err(VsockError::Thread)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Thread)?;
        let (tx, rx) = channel();
        let worker = Worker {
            muxer,
            epoll,
            commands: rx,
            wake: wake.try_clone().map_err(VsockError::Thread)?,
            guest_cid: cfg.guest_cid,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || match thread_init.map_or(Ok(()), |init| init()) {
                Ok(()) => worker.run(),
                Err(e) => tracing::error!("virtio-vsock thread: {e}"),
            })
            .map_err(VsockError::Thread)?;
        Ok(Vsock {
            announce_reset: cfg.announce_reset,
            cfg,
            commands: Some(tx),
            wake,
            thread: Some(thread),
            active: false,
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    fn send(&self, cmd: Command) -> bool {
        let sent = self.commands.as_ref().is_some_and(|c| c.send(cmd).is_ok());
        if sent {
            let _ = self.wake.write(1);
        }
        sent
    }

    fn stop_thread(&mut self) {
        self.send(Command::Shutdown);
        self.commands = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("virtio-vsock thread panicked");
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The config space: le64 guest_cid.
        super::read_config_space(&self.cfg.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let n = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(ActivateError::QueueCount(n));
        };
        let announce_reset = std::mem::take(&mut self.announce_reset);
        if !self.send(Command::Activate(Activation {
            mem,
            interrupt,
            rx,
            tx,
            event,
            announce_reset,
        })) {
            return Err(ActivateError::NoBackend);
        }
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<EventFd>> {
        if !std::mem::take(&mut self.active) {
            return None;
        }
        let (tx, rx) = channel();
        if !self.send(Command::Reset(tx)) {
            return None;
        }
        match rx.recv_timeout(COMMAND_WAIT) {
            Ok(fds) if fds.len() == 3 => Some(fds),
            Ok(_) => None,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                tracing::error!("virtio-vsock: the device's thread did not answer a reset");
                None
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop_thread();
    }

    /// Connections stay open meanwhile; host data waits in their sockets.
    fn pause(&mut self) -> Result<Vec<QueueProgress>, PauseError> {
        let (tx, rx) = channel();
        if !self.send(Command::Pause(tx)) {
            return Err(PauseError::ThreadGone);
        }
        rx.recv_timeout(COMMAND_WAIT)
            .map_err(|_| PauseError::Timeout(COMMAND_WAIT))
    }

    fn resume(&mut self) {
        self.send(Command::Resume);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
