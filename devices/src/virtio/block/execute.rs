//! Parsed virtio-blk requests as image requests: each becomes a sequence of steps for the
//! image pipeline ([`block::pipeline::IoRequest`]): reads and writes in chunks of at most
//! [`CHUNK`] bytes (so a reset or shutdown is noticed between them), discard and
//! write-zeroes one segment at a time, a flush; GET_ID is answered at once. Also what a
//! failure means for the guest (IOERR, or, under `werror=enospc`, a write held until the host
//! has space again), and the statistics of completed requests.

use std::sync::Arc;

use block::host_file::AlignedBuf;
use block::pipeline::IoRequest;
use block::{DiskImage, IoBuf};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::request::{Request, RequestKind, STATUS_IOERR, STATUS_OK};
use super::stats::BlockStats;
use crate::virtio::ratelimited_warn;

/// Bytes moved per image request (and between two looks at the stop flag).
pub const CHUNK: u64 = 8 << 20;

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

/// What a request needs next.
pub enum Next {
    /// Run this image request; then call [`Disk::step_done`].
    Submit(IoRequest),
    /// Nothing more: answer the guest with this.
    Done(Outcome),
}

/// What a failed step comes to.
pub enum Failed {
    /// Answer the guest with this.
    Done(Outcome),
    /// A write-type request (or a flush) failed because the host file system is full, and
    /// the policy is to hold it: nothing was answered.
    NoSpace(block::Error),
}

fn ok(written: u32) -> Outcome {
    Outcome {
        status: STATUS_OK,
        written,
    }
}

fn ioerr(msg: String) -> Outcome {
    ratelimited_warn(&format!("virtio-blk: {msg}"));
    Outcome {
        status: STATUS_IOERR,
        written: 0,
    }
}

/// A request being worked on: which step it is at, and the bounce buffer of a read whose
/// guest buffers overlap.
pub struct Progress {
    pub head: u16,
    pub req: Request,
    pub step: u64,
    bounce: Option<AlignedBuf>,
    /// Retried after being held for lack of host space.
    pub retry: bool,
}

impl Progress {
    pub fn new(head: u16, req: Request) -> Self {
        Progress {
            head,
            req,
            step: 0,
            bounce: None,
            retry: false,
        }
    }
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
        }
    }

    /// A failed step of a write-type request or flush: held (NoSpace) when the host is full
    /// and the policy says so, IOERR otherwise.
    fn write_failed(&self, what: String, e: block::Error) -> Failed {
        if self.werror == WriteErrorPolicy::Enospc && e.is_no_space() {
            return Failed::NoSpace(e);
        }
        Failed::Done(ioerr(format!("{what}: {e}")))
    }

    /// The next step of `p` (its `step` counts the steps done).
    pub fn next(&mut self, p: &mut Progress, mem: &GuestMemoryMmap) -> Next {
        let step = p.step;
        match &p.req.kind {
            RequestKind::Read { offset, data } => {
                let total = data.len();
                let pos = step * CHUNK;
                if pos >= total {
                    BlockStats::add(&self.stats.reads, 1);
                    BlockStats::add(&self.stats.read_bytes, total);
                    // The data of one chain is at most 4 GiB (virtio-queue ends a longer one).
                    return Next::Done(ok(u32::try_from(total).unwrap_or(u32::MAX)));
                }
                let n = (total - pos).min(CHUNK);
                let mut bufs = Vec::with_capacity(data.ranges().len());
                if data.disjoint() {
                    // Straight into the guest's buffers (a well-behaved driver's never
                    // overlap).
                    if !data.io_bufs(mem, pos, n, &mut bufs) {
                        return Next::Done(ioerr("read buffer outside guest memory".into()));
                    }
                } else {
                    // Through a bounce buffer, copied out in order when the chunk is read, so
                    // the request reads as if its buffers were filled one after the other.
                    let mut b = AlignedBuf::new(n as usize);
                    // SAFETY: the bounce buffer's heap memory is kept in `p` (the request's
                    // progress) until the step's completion has been handled.
                    bufs.push(unsafe { IoBuf::from_mut_slice(b.as_mut_slice()) });
                    p.bounce = Some(b);
                }
                Next::Submit(IoRequest::Read {
                    offset: offset + pos,
                    bufs,
                })
            }
            RequestKind::Write { offset, data } => {
                let total = data.len();
                let pos = step * CHUNK;
                if pos >= total {
                    BlockStats::add(&self.stats.writes, 1);
                    BlockStats::add(&self.stats.write_bytes, total);
                    return Next::Done(ok(0));
                }
                let n = (total - pos).min(CHUNK);
                let mut bufs = Vec::with_capacity(data.ranges().len());
                if !data.io_bufs(mem, pos, n, &mut bufs) {
                    return Next::Done(ioerr("write buffer outside guest memory".into()));
                }
                Next::Submit(IoRequest::Write {
                    offset: offset + pos,
                    bufs,
                })
            }
            RequestKind::Flush => {
                if step == 0 {
                    return Next::Submit(IoRequest::Flush);
                }
                BlockStats::add(&self.stats.flushes, 1);
                Next::Done(ok(0))
            }
            RequestKind::GetId { buf } => {
                // A buffer too long for a usize is longer than the serial.
                let n = usize::try_from(buf.len())
                    .map_or(self.serial.len(), |l| l.min(self.serial.len()));
                Next::Done(
                    match buf.write_from(mem, &self.serial[..n]).map(u32::try_from) {
                        Ok(Ok(n)) => {
                            BlockStats::add(&self.stats.get_ids, 1);
                            ok(n)
                        }
                        Ok(Err(e)) => ioerr(format!("get-id: {e}")),
                        Err(e) => ioerr(format!("get-id: {e}")),
                    },
                )
            }
            RequestKind::Discard(segs) => {
                let Some(s) = usize::try_from(step).ok().and_then(|i| segs.get(i)) else {
                    return Next::Done(ok(0));
                };
                if !self.discard_unmap {
                    // discard=ignore: succeeds and does nothing, as QEMU's.
                    BlockStats::add(&self.stats.discards, 1);
                    BlockStats::add(&self.stats.discard_bytes, s.len);
                    p.step += 1;
                    return self.next(p, mem);
                }
                Next::Submit(IoRequest::Discard {
                    offset: s.offset,
                    len: s.len,
                })
            }
            RequestKind::WriteZeroes(segs) => {
                let Some(s) = usize::try_from(step).ok().and_then(|i| segs.get(i)) else {
                    return Next::Done(ok(0));
                };
                Next::Submit(IoRequest::WriteZeroes {
                    offset: s.offset,
                    len: s.len,
                    unmap: s.unmap && self.discard_unmap,
                })
            }
        }
    }

    /// A step of `p` ended with `r`: counts it, copies a bounced read out, and moves `p` on
    /// (call [`Disk::next`] then), or says what the failure comes to.
    pub fn step_done(
        &mut self,
        p: &mut Progress,
        mem: &GuestMemoryMmap,
        r: block::Result<()>,
    ) -> Result<(), Failed> {
        let step = p.step;
        let bounce = p.bounce.take();
        match (&p.req.kind, r) {
            (RequestKind::Read { data, .. }, Ok(())) => {
                if let Some(b) = bounce {
                    let pos = step * CHUNK;
                    let buf = b.as_slice();
                    let mut done = 0usize;
                    for (addr, len) in data.pieces(pos, buf.len() as u64) {
                        let len = len as usize;
                        if mem.write_slice(&buf[done..done + len], addr).is_err() {
                            return Err(Failed::Done(ioerr(
                                "read buffer outside guest memory".into(),
                            )));
                        }
                        done += len;
                    }
                }
            }
            (RequestKind::Read { offset, .. }, Err(e)) => {
                let at = offset + step * CHUNK;
                return Err(Failed::Done(ioerr(format!("read at {at}: {e}"))));
            }
            (RequestKind::Write { offset, .. }, Err(e)) => {
                let at = offset + step * CHUNK;
                return Err(self.write_failed(format!("write at {at}"), e));
            }
            (RequestKind::Flush, Err(e)) => return Err(self.write_failed("flush".into(), e)),
            (RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs), r) => {
                let discard = matches!(p.req.kind, RequestKind::Discard(_));
                let what = if discard { "discard" } else { "write-zeroes" };
                let Some(s) = usize::try_from(step).ok().and_then(|i| segs.get(i)) else {
                    return Ok(());
                };
                if let Err(e) = r {
                    return Err(self.write_failed(format!("{what} at {}+{}", s.offset, s.len), e));
                }
                if discard {
                    BlockStats::add(&self.stats.discards, 1);
                    BlockStats::add(&self.stats.discard_bytes, s.len);
                } else {
                    BlockStats::add(&self.stats.write_zeroes, 1);
                    BlockStats::add(&self.stats.write_zeroes_bytes, s.len);
                }
            }
            (RequestKind::GetId { .. }, Err(e)) => {
                return Err(Failed::Done(ioerr(format!("get-id: {e}"))))
            }
            (_, Ok(())) => {}
        }
        p.step += 1;
        Ok(())
    }
}
