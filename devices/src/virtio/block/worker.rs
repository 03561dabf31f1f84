//! The per-disk worker thread: block I/O runs here, off the vCPU threads. The thread lives
//! as long as the device (so it can be confined by its own seccomp filter from the start)
//! and owns the image. While the driver is active it sleeps on the queue's notification
//! eventfd (an ioeventfd KVM signals directly), drains the queue, raises the interrupt, and
//! lets the image finish deferred work (committing freed clusters, shrinking the file) once
//! the guest goes quiet.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use block::DiskImage;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Invalid, Limits, Request};
use super::stats::BlockStats;
use crate::virtio::{Interrupt, INT_VRING};

/// Most data bytes of one write batch.
const BATCH_BYTES: u64 = 64 << 20;

/// A popped descriptor chain: head index, descriptors, the parsed request.
type Chain = (u16, Vec<Descriptor>, Result<Request, Invalid>);

/// How long the guest must be quiet before deferred image work runs.
const IDLE_MS: i32 = 100;

/// Commands from the device to its worker thread.
pub enum Command {
    /// The driver is ready: process this queue until reset.
    Activate(Activation),
    /// The VM is ending: flush and exit.
    Shutdown,
}

/// What the worker needs to serve a queue.
pub struct Activation {
    pub queue: Queue,
    pub notify: EventFd,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
}

/// The worker: owns the image for the device's whole life.
pub struct Worker {
    pub image: Box<dyn DiskImage>,
    pub limits: Limits,
    pub serial: [u8; 20],
    pub stats: Arc<BlockStats>,
    /// Written by the device to stop serving the queue (driver reset or shutdown).
    pub stop: EventFd,
}

/// Serving state of one activation.
struct Serving {
    queue: Queue,
    notify: EventFd,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
}

impl Worker {
    /// The thread body: waits for activations; after each one ends (reset), hands the
    /// notification eventfd back through `returned`.
    pub fn run(
        mut self,
        commands: std::sync::mpsc::Receiver<Command>,
        returned: std::sync::mpsc::Sender<EventFd>,
    ) {
        while let Ok(cmd) = commands.recv() {
            match cmd {
                Command::Activate(a) => {
                    let mut serving = Serving {
                        queue: a.queue,
                        notify: a.notify,
                        mem: a.mem,
                        interrupt: a.interrupt,
                    };
                    self.serve(&mut serving);
                    let _ = returned.send(serving.notify);
                }
                Command::Shutdown => break,
            }
        }
        if let Err(e) = self.image.flush() {
            tracing::error!("virtio-blk: final flush failed: {e}");
        }
        self.publish_image_stats();
    }

    /// Serves the queue until `stop` is signalled.
    fn serve(&mut self, s: &mut Serving) {
        let mut bounce = Vec::new();
        let mut idle_pending = false;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: s.notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let timeout = if idle_pending { IDLE_MS } else { -1 };
            // SAFETY: `fds` is a valid array of two pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("virtio-blk worker: poll failed; stopping");
                break;
            }
            if fds[1].revents != 0 {
                let _ = self.stop.read();
                break;
            }
            if n == 0 {
                if let Err(e) = self.image.idle() {
                    request::ratelimited_warn(&format!("deferred image work failed: {e}"));
                }
                self.publish_image_stats();
                idle_pending = false;
                continue;
            }
            if fds[0].revents != 0 {
                let _ = s.notify.read();
                self.process_queue(s, &mut bounce);
                idle_pending = true;
            }
        }
        // Finish deferred work before the queue goes away.
        let _ = self.image.idle();
        self.publish_image_stats();
    }

    fn publish_image_stats(&self) {
        let usage = self.image.host_usage().unwrap_or_default();
        self.stats.set_image(self.image.reclaim_stats(), usage);
    }

    /// Processes every available request. Runs of consecutive writes go to the image as one
    /// batch (their data written in parallel); everything else runs one request at a time.
    /// (Reads stay one at a time: batching them measured slower in the rig, where the
    /// image's data is in the host's page cache and waking I/O threads costs more than the
    /// reads; see the README's limits.)
    fn process_queue(&mut self, s: &mut Serving, bounce: &mut Vec<u8>) {
        let mem = s.mem.clone();
        let mut chains = Vec::new();
        loop {
            if let Err(e) = s.queue.disable_notification(&mem) {
                request::ratelimited_warn(&format!("queue: {e}"));
            }
            while let Some(chain) = s.queue.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let truncated = descs.last().is_some_and(|d| d.has_next());
                let parsed = request::parse(&descs, truncated, &mem);
                chains.push((head, descs, parsed));
            }
            let mut i = 0;
            while i < chains.len() {
                let batch = self.batchable_writes(&chains[i..], &mem);
                let n = batch.len();
                if n >= 2 {
                    let out = request::execute_write_batch(
                        &batch,
                        self.image.as_mut(),
                        &self.stats,
                        bounce,
                    );
                    for (head, _, parsed) in &chains[i..i + n] {
                        let used = match parsed {
                            Ok(req) => self.answer(req, out, &mem),
                            Err(_) => 0,
                        };
                        Self::add_used(s, &mem, *head, used);
                    }
                    i += n;
                } else {
                    let (head, descs, parsed) = &chains[i];
                    let used = self.handle(descs, parsed, &mem, bounce);
                    Self::add_used(s, &mem, *head, used);
                    i += 1;
                }
            }
            chains.clear();
            match s.queue.enable_notification(&mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        match s.queue.needs_notification(&mem) {
            Ok(false) => {}
            _ => s.interrupt.trigger(INT_VRING),
        }
    }

    /// The writes at the start of `chains` that can run as one batch (at most
    /// [`BATCH_BYTES`] of data together).
    fn batchable_writes<'m>(
        &self,
        chains: &[Chain],
        mem: &'m GuestMemoryMmap,
    ) -> Vec<request::BatchWrite<'m>> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (_, _, parsed) in chains {
            let Ok(req) = parsed else { break };
            let Some(w) = request::batch_write(req, mem, &self.limits) else {
                break;
            };
            bytes += w.bytes();
            if bytes > BATCH_BYTES && !out.is_empty() {
                break;
            }
            out.push(w);
        }
        out
    }

    fn add_used(s: &mut Serving, mem: &GuestMemoryMmap, head: u16, used: u32) {
        if let Err(e) = s.queue.add_used(mem, head, used) {
            request::ratelimited_warn(&format!("cannot return a used buffer: {e}"));
        }
    }

    /// Reports `out` for `req`: counts an error, writes the status byte; returns the used
    /// length.
    fn answer(&self, req: &Request, out: request::Outcome, mem: &GuestMemoryMmap) -> u32 {
        if out.status == VIRTIO_BLK_S_IOERR as u8 {
            BlockStats::add(&self.stats.errors, 1);
        }
        if request::write_status(mem, req.status, out.status) {
            out.written.saturating_add(1)
        } else {
            0
        }
    }

    /// Handles one chain; returns the used length to report.
    fn handle(
        &mut self,
        descs: &[Descriptor],
        parsed: &Result<Request, Invalid>,
        mem: &GuestMemoryMmap,
        bounce: &mut Vec<u8>,
    ) -> u32 {
        match parsed {
            Ok(req) => {
                let out = request::execute(
                    req,
                    self.image.as_mut(),
                    mem,
                    &self.limits,
                    &self.serial,
                    &self.stats,
                    bounce,
                );
                self.answer(req, out, mem)
            }
            Err(Invalid::Status(status, msg)) => {
                request::ratelimited_warn(msg);
                BlockStats::add(&self.stats.errors, 1);
                // parse() validated the status descriptor before any Status error.
                match descs
                    .last()
                    .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
                {
                    Some(a) if request::write_status(mem, a, *status) => 1,
                    _ => 0,
                }
            }
            Err(Invalid::Drop(msg)) => {
                request::ratelimited_warn(&format!("dropping request: {msg}"));
                BlockStats::add(&self.stats.dropped, 1);
                0
            }
        }
    }
}
