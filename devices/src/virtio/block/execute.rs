//! Executing parsed virtio-blk requests against the disk image: reads and writes in chunks
//! (so a reset or shutdown is noticed between them), batches of queued writes, flush,
//! GET_ID, discard and write-zeroes; and what a failure means for the guest (IOERR, or,
//! under `werror=enospc`, a write held until the host has space again).

use std::sync::Arc;

use block::DiskImage;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::guest_ranges::GuestRanges;
use super::request::{Request, RequestKind, Segment};
use super::stats::BlockStats;
use crate::virtio::ratelimited_warn;

/// Bytes moved per image call (and between two looks at the stop flag).
pub const CHUNK: u64 = 8 << 20;
/// Most data bytes of one write batch.
pub const BATCH_BYTES: u64 = 64 << 20;

/// What to do when a write fails because the host file system is full (ENOSPC, EDQUOT),
/// with QEMU's `werror=` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteErrorPolicy {
    /// Hold the request and retry it until space returns (the guest's I/O pauses): QEMU's
    /// default.
    #[default]
    Enospc,
    /// Fail the request with IOERR.
    Report,
}

/// The answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    /// Bytes written into device-writable buffers (data, not counting the status byte).
    pub written: u32,
}

/// What executing a request came to.
#[derive(Debug)]
pub enum Executed {
    /// Answer the guest with this.
    Done(Outcome),
    /// A write-type request (or a flush) failed because the host file system is full, and
    /// the policy is to hold it: nothing was answered.
    NoSpace(block::Error),
    /// The activation ended (reset, shutdown) before the request finished: nothing was
    /// answered.
    Stopped,
}

fn ok(written: u32) -> Executed {
    Executed::Done(Outcome {
        status: VIRTIO_BLK_S_OK as u8,
        written,
    })
}

fn ioerr(msg: String) -> Executed {
    ratelimited_warn(&format!("virtio-blk: {msg}"));
    Executed::Done(Outcome {
        status: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
    })
}

/// The disk side of a virtio-blk device: the image and what requests need besides it.
pub struct Disk {
    pub image: Box<dyn DiskImage>,
    pub serial: [u8; 20],
    pub stats: Arc<BlockStats>,
    pub werror: WriteErrorPolicy,
    /// `discard=unmap`: discards and unmapping write-zeroes release space (otherwise
    /// discards do nothing and write-zeroes never unmap).
    pub discard_unmap: bool,
    /// Reusable buffer (gathering, bounce reads); grown, never shrunk.
    bounce: Vec<u8>,
}

impl Disk {
    pub fn new(
        image: Box<dyn DiskImage>,
        serial: [u8; 20],
        stats: Arc<BlockStats>,
        werror: WriteErrorPolicy,
        discard_unmap: bool,
    ) -> Self {
        Disk {
            image,
            serial,
            stats,
            werror,
            discard_unmap,
            bounce: Vec::new(),
        }
    }

    /// An image error of a write-type request or flush: held (NoSpace) when the host is full
    /// and the policy says so, IOERR otherwise.
    fn write_failed(&self, what: String, e: block::Error) -> Executed {
        if self.werror == WriteErrorPolicy::Enospc && e.is_no_space() {
            return Executed::NoSpace(e);
        }
        ioerr(format!("{what}: {e}"))
    }

    /// Executes `req`; `stop` is asked between chunks.
    pub fn execute(
        &mut self,
        req: &Request,
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> Executed {
        match &req.kind {
            RequestKind::Read { offset, data } => self.read(*offset, data, mem, stop),
            RequestKind::Write { offset, data } => self.write(*offset, data, mem, stop),
            RequestKind::Flush => match self.image.flush() {
                Ok(()) => {
                    BlockStats::add(&self.stats.flushes, 1);
                    ok(0)
                }
                Err(e) => self.write_failed("flush".into(), e),
            },
            RequestKind::GetId { buf } => {
                let n = (buf.len() as usize).min(self.serial.len());
                match buf.write_from(mem, &self.serial[..n]) {
                    Ok(n) => {
                        BlockStats::add(&self.stats.get_ids, 1);
                        ok(n as u32)
                    }
                    Err(e) => ioerr(format!("get-id: {e}")),
                }
            }
            RequestKind::Discard(segs) => self.segments(segs, true, stop),
            RequestKind::WriteZeroes(segs) => self.segments(segs, false, stop),
        }
    }

    fn read(
        &mut self,
        offset: u64,
        data: &GuestRanges,
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> Executed {
        let total = data.len();
        // Straight into the guest's buffers when they are disjoint (a well-behaved driver's
        // always are); through the bounce buffer otherwise, so the request still reads as if
        // its buffers were filled one after the other.
        let direct = data.disjoint();
        let mut pos = 0u64;
        while pos < total {
            if stop() {
                return Executed::Stopped;
            }
            let n = (total - pos).min(CHUNK);
            let at = offset + pos;
            if direct {
                let mut parts: Vec<&mut [u8]> = Vec::with_capacity(data.ranges().len());
                // SAFETY: `data`'s ranges are pairwise disjoint (checked above), `parts` is
                // new, and this thread holds no other slice of guest memory.
                if !unsafe { data.host_slices_mut(mem, pos, n, &mut parts) } {
                    return ioerr("read buffer outside guest memory".into());
                }
                if let Err(e) = self
                    .image
                    .read_vectored_at(at, &mut parts, &mut self.bounce)
                {
                    return ioerr(format!("read at {at}: {e}"));
                }
            } else {
                if self.bounce.len() < n as usize {
                    self.bounce.resize(n as usize, 0);
                }
                let buf = &mut self.bounce[..n as usize];
                if let Err(e) = self.image.read_at(at, buf) {
                    return ioerr(format!("read at {at}: {e}"));
                }
                let mut done = 0usize;
                for (addr, len) in data.pieces(pos, n) {
                    let len = len as usize;
                    if mem.write_slice(&buf[done..done + len], addr).is_err() {
                        return ioerr("read buffer outside guest memory".into());
                    }
                    done += len;
                }
            }
            pos += n;
        }
        BlockStats::add(&self.stats.reads, 1);
        BlockStats::add(&self.stats.read_bytes, total);
        // The data of one chain is at most 4 GiB (virtio-queue ends a longer chain).
        ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

    fn write(
        &mut self,
        offset: u64,
        data: &GuestRanges,
        mem: &GuestMemoryMmap,
        stop: &dyn Fn() -> bool,
    ) -> Executed {
        let total = data.len();
        // The image gets the request up to CHUNK at a time as a list of slices of guest
        // memory, so zero detection sees whole clusters even when the guest split the buffer
        // into pages, and overwrites need no gathering copy.
        let mut pos = 0u64;
        while pos < total {
            if stop() {
                return Executed::Stopped;
            }
            let n = (total - pos).min(CHUNK);
            let at = offset + pos;
            let mut parts: Vec<&[u8]> = Vec::with_capacity(data.ranges().len());
            if !data.host_slices(mem, pos, n, &mut parts) {
                return ioerr("write buffer outside guest memory".into());
            }
            if let Err(e) = self.image.write_vectored_at(at, &parts, &mut self.bounce) {
                return self.write_failed(format!("write at {at}"), e);
            }
            pos += n;
        }
        BlockStats::add(&self.stats.writes, 1);
        BlockStats::add(&self.stats.write_bytes, total);
        ok(0)
    }

    /// Whether `req` can join a write batch: a write of at most [`CHUNK`] bytes.
    pub fn batchable(req: &Request) -> Option<u64> {
        match &req.kind {
            RequestKind::Write { data, .. } if data.len() <= CHUNK => Some(data.len()),
            _ => None,
        }
    }

    /// Executes several writes (each [`Disk::batchable`]) at once
    /// ([`DiskImage::write_many`]: metadata in order, data in parallel). One result for all:
    /// on failure every write of the batch reports it (writes are idempotent, so a held
    /// batch is simply written again).
    pub fn execute_write_batch(&mut self, reqs: &[&Request], mem: &GuestMemoryMmap) -> Executed {
        let mut writes: Vec<(u64, Vec<&[u8]>)> = Vec::with_capacity(reqs.len());
        for req in reqs {
            let RequestKind::Write { offset, data } = &req.kind else {
                return ioerr("internal: a non-write in a write batch".into());
            };
            let mut parts = Vec::with_capacity(data.ranges().len());
            if !data.host_slices(mem, 0, data.len(), &mut parts) {
                return ioerr("write buffer outside guest memory".into());
            }
            writes.push((*offset, parts));
        }
        let list: Vec<(u64, &[&[u8]])> = writes.iter().map(|(o, p)| (*o, &p[..])).collect();
        if let Err(e) = self
            .image
            .write_many(&list, block::MAX_IO_THREADS, &mut self.bounce)
        {
            return self.write_failed(format!("batch of {} writes", reqs.len()), e);
        }
        BlockStats::add(&self.stats.batched_writes, reqs.len() as u64);
        for (_, parts) in &writes {
            BlockStats::add(&self.stats.writes, 1);
            let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
            BlockStats::add(&self.stats.write_bytes, bytes);
        }
        ok(0)
    }

    /// Discard and write-zeroes: validated segments, one image call each.
    fn segments(&mut self, segs: &[Segment], discard: bool, stop: &dyn Fn() -> bool) -> Executed {
        let what = if discard { "discard" } else { "write-zeroes" };
        let unmap_allowed = self.discard_unmap;
        for s in segs {
            if stop() {
                return Executed::Stopped;
            }
            let r = if discard {
                if !unmap_allowed {
                    // discard=ignore: succeeds and does nothing, as QEMU's.
                    Ok(())
                } else {
                    self.image.discard(s.offset, s.len)
                }
            } else {
                self.image
                    .write_zeroes(s.offset, s.len, s.unmap && unmap_allowed)
            };
            if let Err(e) = r {
                return self.write_failed(format!("{what} at {}+{}", s.offset, s.len), e);
            }
            if discard {
                BlockStats::add(&self.stats.discards, 1);
                BlockStats::add(&self.stats.discard_bytes, s.len);
            } else {
                BlockStats::add(&self.stats.write_zeroes, 1);
                BlockStats::add(&self.stats.write_zeroes_bytes, s.len);
            }
        }
        ok(0)
    }
}
