//! Reads that continue one another, taken from one pass, run as one image read (as QEMU's
//! virtio-blk merges a batch's adjacent requests, `virtio_blk_submit_multireq`): fewer,
//! larger I/Os whose requests complete together, under one interrupt. Each request keeps its
//! own answer (its length, its status); when the image read fails, each is answered IOERR.

use std::collections::VecDeque;

use block::pipeline::IoRequest;
use vm_memory::GuestMemoryMmap;

use super::super::execute::{Failed, Next, Outcome, Progress, CHUNK};
use super::super::request::{self, Invalid, Request, RequestKind};
use super::super::stats::BlockStats;
use super::{Answer, Engine};
use virtio_queue::Queue;

/// Reads merged into one image read: at most this many bytes (one step of a request), and at
/// most this many guest buffers (the kernel's IOV_MAX: one readv).
const MERGE_MAX_BYTES: u64 = CHUNK;
const MERGE_MAX_BUFS: usize = 1024;

impl Engine {
    /// Starts `first`, if it is a [`mergeable`] read, with the chains after it in `popped`
    /// that continue it, as one image read where their buffers allow; returns the requests
    /// answered at once. Anything else comes back untouched.
    pub(super) fn start_merged_reads(
        &mut self,
        qi: usize,
        first: Progress,
        popped: &mut VecDeque<(u16, Result<Request, Invalid>)>,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<Answer>, Progress> {
        if !mergeable(&first.req) {
            return Err(first);
        }
        let mut group = vec![first];
        let mut bytes = group[0].req.kind.data_len();
        while let Some((_, Ok(next))) = popped.front() {
            let last = &group[group.len() - 1].req.kind;
            let (
                RequestKind::Read {
                    offset: o1,
                    data: d1,
                },
                RequestKind::Read { offset: o2, .. },
            ) = (last, &next.kind)
            else {
                break;
            };
            if !mergeable(next)
                || o1.checked_add(d1.len()) != Some(*o2)
                || bytes + next.kind.data_len() > MERGE_MAX_BYTES
            {
                break;
            }
            bytes += next.kind.data_len();
            let Some((h, Ok(r))) = popped.pop_front() else {
                break;
            };
            group.push(Progress::new(h, r));
        }
        Ok(self.start_reads(qi, group, mem))
    }

    /// Starts reads that continue one another (each [`mergeable`]) as few image reads as
    /// their buffers allow: one, unless a request is answered at once (a buffer outside
    /// guest memory) or the buffers exceed one readv. Returns the requests answered at once.
    fn start_reads(
        &mut self,
        qi: usize,
        group: Vec<Progress>,
        mem: &GuestMemoryMmap,
    ) -> Vec<Answer> {
        let mut answered = Vec::new();
        // The read being built: its offset, where it ends, its buffers, its requests.
        let mut cur: Option<(u64, u64, Vec<block::IoBuf>, Vec<Progress>)> = None;
        for mut p in group {
            match self.disk.next(&mut p, mem) {
                Next::Submit(IoRequest::Read { offset, bufs }) => {
                    let len: u64 = p.req.kind.data_len();
                    match &mut cur {
                        Some((_, end, b, members))
                            if *end == offset && b.len() + bufs.len() <= MERGE_MAX_BUFS =>
                        {
                            *end = end.saturating_add(len);
                            b.extend(bufs);
                            members.push(p);
                        }
                        _ => {
                            if let Some(done) = cur.take() {
                                self.submit_read(qi, done);
                            }
                            cur = Some((offset, offset.saturating_add(len), bufs, vec![p]));
                        }
                    }
                }
                Next::Submit(io) => {
                    // (Not a read after all: cannot happen for a mergeable request.)
                    if let Some(done) = cur.take() {
                        self.submit_read(qi, done);
                    }
                    self.submit(qi, p, Vec::new(), io);
                }
                Next::Done(out) => {
                    if let Some(done) = cur.take() {
                        self.submit_read(qi, done);
                    }
                    answered.push((qi, p.head, p.req.status, out));
                }
            }
        }
        if let Some(done) = cur.take() {
            self.submit_read(qi, done);
        }
        answered
    }

    fn submit_read(&mut self, qi: usize, read: (u64, u64, Vec<block::IoBuf>, Vec<Progress>)) {
        let (offset, _, bufs, mut members) = read;
        if members.len() > 1 {
            BlockStats::add(&self.disk.stats.merged_reads, members.len() as u64);
        }
        let followers = members.split_off(1);
        if let Some(leader) = members.pop() {
            self.submit(qi, leader, followers, IoRequest::Read { offset, bufs });
        }
    }

    /// The image read of merged reads ended with `r`: each of them is answered with it
    /// (each was one step: a mergeable read is at most one chunk).
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
        let failed = r.as_ref().err().map(|e| e.to_string());
        let mut first = Some(r);
        let mut answered = 0;
        for mut m in std::iter::once(p).chain(followers) {
            // The first member reports the image's error itself; the others say the same.
            let r = first.take().unwrap_or_else(|| match &failed {
                None => Ok(()),
                Some(e) => Err(block::Error::Io {
                    context: "merged read".into(),
                    source: std::io::Error::other(e.clone()),
                }),
            });
            let out = match self.disk.step_done(&mut m, mem, r) {
                Ok(()) => match self.disk.next(&mut m, mem) {
                    Next::Done(out) => out,
                    // (A mergeable read has one step: cannot happen.)
                    Next::Submit(_) => Outcome {
                        status: request::STATUS_IOERR,
                        written: 0,
                    },
                },
                Err(Failed::Done(out)) => out,
                // (Reads are never held: cannot happen.)
                Err(Failed::NoSpace(_)) => Outcome {
                    status: request::STATUS_IOERR,
                    written: 0,
                },
            };
            self.answer(q, mem, (qi, m.head, m.req.status, out));
            answered += 1;
        }
        answered
    }
}

/// A read that may be merged with the ones continuing it: data in the guest's own buffers
/// (not bounced: they do not overlap), in one step of the pipeline.
fn mergeable(req: &Request) -> bool {
    match &req.kind {
        RequestKind::Read { data, .. } => {
            data.disjoint() && !data.is_empty() && data.len() <= MERGE_MAX_BYTES
        }
        _ => false,
    }
}
