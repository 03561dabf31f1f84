//! Reads that continue one another, and writes that continue one another, taken from one
//! pass, run as one image read or write (as QEMU's virtio-blk merges a batch's adjacent
//! requests, `virtio_blk_submit_multireq`): fewer, larger I/Os whose requests complete
//! together, under one interrupt. Each request keeps its own answer (its length, its
//! status); when the image I/O fails, each is answered IOERR, and a merged write that found
//! the host full is held request by request (each retried on its own).

use std::collections::VecDeque;

use block::pipeline::IoRequest;
use vm_memory::GuestMemoryMmap;

use super::super::execute::{Failed, Next, Outcome, Progress, CHUNK};
use super::super::request::{self, Invalid, Request, RequestKind};
use super::super::stats::BlockStats;
use super::{Answer, Engine};
use virtio_queue::Queue;

/// Requests merged into one image I/O: at most this many bytes (one step of a request), and
/// at most this many guest buffers (the kernel's IOV_MAX: one readv / writev).
const MERGE_MAX_BYTES: u64 = CHUNK;
const MERGE_MAX_BUFS: usize = 1024;

/// An image I/O being built from merged requests.
struct Merged {
    write: bool,
    offset: u64,
    end: u64,
    bufs: Vec<block::IoBuf>,
    members: Vec<Progress>,
}

impl Engine {
    /// Starts `first`, if it is [`mergeable`], with the chains after it in `popped` that
    /// continue it (same direction, the next bytes of the disk), as one image I/O where
    /// their buffers allow; returns the requests answered at once. Anything else comes back
    /// untouched.
    pub(super) fn start_merged(
        &mut self,
        qi: usize,
        first: Progress,
        popped: &mut VecDeque<(u16, Result<Request, Invalid>)>,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<Answer>, Progress> {
        let Some((write, mut end)) = mergeable(&first.req) else {
            return Err(first);
        };
        let mut group = vec![first];
        let mut bytes = group[0].req.kind.data_len();
        while let Some((_, Ok(next))) = popped.front() {
            match mergeable(next) {
                Some((w, next_end))
                    if w == write
                        && next_end.checked_sub(next.kind.data_len()) == Some(end)
                        && bytes + next.kind.data_len() <= MERGE_MAX_BYTES =>
                {
                    bytes += next.kind.data_len();
                    end = next_end;
                }
                _ => break,
            }
            let Some((h, Ok(r))) = popped.pop_front() else {
                break;
            };
            group.push(Progress::new(h, r));
        }
        Ok(self.start_group(qi, group, mem))
    }

    /// Starts requests that continue one another (each [`mergeable`], one direction) as few
    /// image I/Os as their buffers allow: one, unless a request is answered at once (a
    /// buffer outside guest memory) or the buffers exceed one readv / writev. Returns the
    /// requests answered at once.
    fn start_group(
        &mut self,
        qi: usize,
        group: Vec<Progress>,
        mem: &GuestMemoryMmap,
    ) -> Vec<Answer> {
        let mut answered = Vec::new();
        let mut cur: Option<Merged> = None;
        for mut p in group {
            let (write, offset, bufs) = match self.disk.next(&mut p, mem) {
                Next::Submit(IoRequest::Read { offset, bufs }) => (false, offset, bufs),
                Next::Submit(IoRequest::Write { offset, bufs }) => (true, offset, bufs),
                Next::Submit(io) => {
                    // (Neither a read nor a write after all: cannot happen for a mergeable
                    // request.)
                    if let Some(done) = cur.take() {
                        self.submit_merged(qi, done);
                    }
                    self.submit(qi, p, Vec::new(), io);
                    continue;
                }
                Next::Done(out) => {
                    if let Some(done) = cur.take() {
                        self.submit_merged(qi, done);
                    }
                    answered.push((qi, p.head, p.req.status, out));
                    continue;
                }
            };
            let len = p.req.kind.data_len();
            match &mut cur {
                Some(m)
                    if m.write == write
                        && m.end == offset
                        && m.bufs.len() + bufs.len() <= MERGE_MAX_BUFS =>
                {
                    m.end = m.end.saturating_add(len);
                    m.bufs.extend(bufs);
                    m.members.push(p);
                }
                _ => {
                    if let Some(done) = cur.take() {
                        self.submit_merged(qi, done);
                    }
                    cur = Some(Merged {
                        write,
                        offset,
                        end: offset.saturating_add(len),
                        bufs,
                        members: vec![p],
                    });
                }
            }
        }
        if let Some(done) = cur.take() {
            self.submit_merged(qi, done);
        }
        answered
    }

    fn submit_merged(&mut self, qi: usize, m: Merged) {
        let Merged {
            write,
            offset,
            bufs,
            mut members,
            ..
        } = m;
        if members.len() > 1 {
            let counter = if write {
                &self.disk.stats.merged_writes
            } else {
                &self.disk.stats.merged_reads
            };
            BlockStats::add(counter, members.len() as u64);
        }
        let followers = members.split_off(1);
        let io = if write {
            IoRequest::Write { offset, bufs }
        } else {
            IoRequest::Read { offset, bufs }
        };
        if let Some(leader) = members.pop() {
            self.submit(qi, leader, followers, io);
        }
    }

    /// The image I/O of merged requests ended with `r`: each of them is answered with it
    /// (each was one step: a mergeable request is at most one chunk), or, a write that found
    /// the host full under the hold policy, held.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn merged_done(
        &mut self,
        q: &mut [Queue],
        mem: &GuestMemoryMmap,
        idx: usize,
        qi: usize,
        p: Progress,
        followers: Vec<Progress>,
        r: block::Result<()>,
        stop: &dyn Fn() -> bool,
    ) -> usize {
        if r.is_ok() && stop() {
            // The activation is ending: the requests stay unanswered.
            self.active[idx] = Some((qi, p));
            self.followers[idx] = followers;
            return 0;
        }
        self.release(idx, qi, 1 + followers.len());
        // The others get the same error, its kind kept (a full host holds them too).
        let failed = r.as_ref().err().map(|e| {
            let kind = if e.is_no_space() {
                std::io::ErrorKind::StorageFull
            } else {
                std::io::ErrorKind::Other
            };
            (kind, e.to_string())
        });
        let mut first = Some(r);
        let mut answered = 0;
        for mut m in std::iter::once(p).chain(followers) {
            let r = first.take().unwrap_or_else(|| match &failed {
                None => Ok(()),
                Some((kind, e)) => Err(block::Error::Io {
                    context: "merged request".into(),
                    source: std::io::Error::new(*kind, e.clone()),
                }),
            });
            let out = match self.disk.step_done(&mut m, mem, r) {
                Ok(()) => match self.disk.next(&mut m, mem) {
                    Next::Done(out) => out,
                    // (A mergeable request has one step: cannot happen.)
                    Next::Submit(_) => Outcome {
                        status: request::STATUS_IOERR,
                        written: 0,
                    },
                },
                Err(Failed::Done(out)) => out,
                Err(Failed::NoSpace(e)) => {
                    // Held, in order, and retried one by one.
                    self.hold_request(qi, m, &e);
                    continue;
                }
            };
            self.answer(q, mem, (qi, m.head, m.req.status, out));
            answered += 1;
        }
        answered
    }
}

/// Whether a request may be merged with the ones continuing it, and then its direction
/// (true: a write) and where it ends on the disk: a read into the guest's own buffers (not
/// bounced: they do not overlap) or a write, in one step of the pipeline.
fn mergeable(req: &Request) -> Option<(bool, u64)> {
    let (write, offset, data) = match &req.kind {
        RequestKind::Read { offset, data } if data.disjoint() => (false, *offset, data),
        RequestKind::Write { offset, data } => (true, *offset, data),
        _ => return None,
    };
    if data.is_empty() || data.len() > MERGE_MAX_BYTES {
        return None;
    }
    offset.checked_add(data.len()).map(|end| (write, end))
}
