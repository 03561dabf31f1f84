//! Batches of guest writes ([`crate::DiskImage::write_many`]): metadata is resolved one
//! request at a time, the data of many requests is written in parallel.
//!
//! A batch is cut into segments whose requests touch pairwise disjoint clusters. In a
//! segment, overwrites of allocated clusters become plain data writes at once; writes that
//! only need new clusters (fresh overlay, copy on write) are collected, their copy-on-write
//! reads (the untouched head and tail of a partially written cluster) run in parallel, their
//! clusters are allocated in order, and their data (with the copied head and tail, one
//! vectored write per host run) is written in parallel with the overwrites. The new L2
//! entries are set only after the data is in the file, as the one-request path does.
//! Anything else (zero detection, a mix of in-place and new clusters, compressed data
//! inside a request's span) takes the one-request path at once.

use super::cluster::Mapping;
use super::refcount::FreeReason;
use super::{Qcow2Image, OFLAG_COPIED};
use crate::parallel::{ReadJob, WriteJob};
use crate::{DetectZeroes, Error, Result};

/// A write that only needs new clusters: `len` bytes at guest `offset`, from `bufs`.
struct AllocatingWrite<'d> {
    offset: u64,
    len: u64,
    bufs: &'d [&'d [u8]],
}

/// Requests of a batch that touch pairwise disjoint clusters.
#[derive(Default)]
struct Segment<'d> {
    /// Overwrites of allocated clusters, ready to run.
    in_place: Vec<WriteJob<'d>>,
    allocating: Vec<AllocatingWrite<'d>>,
    /// Guest cluster spans (bytes, cluster-aligned) of the requests above.
    spans: Vec<(u64, u64)>,
}

/// The part of a new cluster run that the request does not cover and that is copied from
/// the cluster's old contents: `read` bytes at guest offset `guest`, then `pad` zero bytes
/// (the part of the last cluster past the virtual size).
#[derive(Clone, Copy)]
struct CowPart {
    guest: u64,
    read: u64,
    pad: u64,
    /// Where its bytes are in the segment's copy buffer.
    at: usize,
}

impl CowPart {
    fn len(&self) -> usize {
        (self.read + self.pad) as usize
    }
}

impl Qcow2Image {
    /// [`crate::DiskImage::write_many`] without the writability check and post-processing.
    pub(crate) fn write_batch<'d>(
        &mut self,
        reqs: &[(u64, &'d [&'d [u8]])],
        threads: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let mut seg = Segment::default();
        for &(offset, bufs) in reqs {
            let total = crate::total_len(bufs);
            crate::check_range(offset, total, self.header.size)?;
            if total == 0 {
                continue;
            }
            let span = (offset / cs * cs, (offset + total).div_ceil(cs) * cs);
            if crate::overlaps(&seg.spans, span.0, span.1) {
                self.run_segment(std::mem::take(&mut seg), threads)?;
            }
            if self.detect_zeroes != DetectZeroes::Off && crate::is_zero_vectored(bufs, 0..total) {
                self.detected_zeroes(offset, total)?;
                continue;
            }
            if let Some(host) = self.in_place_host_run(offset, total, bufs)? {
                seg.in_place.push(WriteJob {
                    offset: host,
                    bufs: bufs.to_vec(),
                });
                seg.spans.push(span);
            } else if self.only_allocates(offset, total, bufs)? {
                seg.allocating.push(AllocatingWrite {
                    offset,
                    len: total,
                    bufs,
                });
                seg.spans.push(span);
            } else {
                crate::gather(bufs, scratch);
                self.write_guest(offset, scratch)?;
            }
        }
        self.run_segment(seg, threads)
    }

    /// Whether every cluster of the write needs a new cluster (none is writable in place, none
    /// is compressed) and, under zero detection, no cluster's part of it is all zeros.
    fn only_allocates(&mut self, offset: u64, len: u64, bufs: &[&[u8]]) -> Result<bool> {
        let cs = self.cluster_size;
        let detect = self.detect_zeroes != DetectZeroes::Off;
        for gc in offset / cs..=(offset + len - 1) / cs {
            let m = self.mapping(gc)?;
            if matches!(m, Mapping::Compressed(_)) || self.writable_in_place(m)? {
                return Ok(false);
            }
            if detect {
                let s = (gc * cs).max(offset) - offset;
                let e = ((gc + 1) * cs).min(offset + len) - offset;
                if crate::is_zero_vectored(bufs, s..e) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The copy-on-write parts of an allocating write: the head of its first cluster and the
    /// tail of its last one, where the write does not cover them.
    fn cow_parts(
        &self,
        w: &AllocatingWrite<'_>,
        at: &mut usize,
    ) -> (Option<CowPart>, Option<CowPart>) {
        let cs = self.cluster_size;
        let end = w.offset + w.len;
        let mut part = |guest: u64, upto: u64| {
            let read = upto.min(self.header.size).saturating_sub(guest);
            let p = CowPart {
                guest,
                read,
                pad: upto - guest - read,
                at: *at,
            };
            *at += p.len();
            p
        };
        let head = (w.offset % cs != 0).then(|| part(w.offset / cs * cs, w.offset));
        let tail = (end % cs != 0).then(|| part(end, end.div_ceil(cs) * cs));
        (head, tail)
    }

    /// Runs a segment: copy-on-write reads, allocation, all data writes, then the L2 entries.
    fn run_segment(&mut self, seg: Segment<'_>, threads: usize) -> Result<()> {
        let cs = self.cluster_size;
        // 1. The old contents of partially written clusters, read in parallel.
        let mut at = 0usize;
        let cows: Vec<_> = seg
            .allocating
            .iter()
            .map(|w| self.cow_parts(w, &mut at))
            .collect();
        let mut copy = vec![0u8; at];
        {
            let mut jobs: Vec<ReadJob<'_>> = Vec::new();
            let mut backing_jobs = Vec::new();
            let mut rest: &mut [u8] = &mut copy;
            for part in cows.iter().flat_map(|(h, t)| [h, t]).flatten() {
                let (this, tail) = std::mem::take(&mut rest).split_at_mut(part.len());
                rest = tail;
                let (read, _pad) = this.split_at_mut(part.read as usize);
                self.plan_read(part.guest, read, &mut jobs, Some(&mut backing_jobs))?;
            }
            if let Some(b) = self.backing.as_mut() {
                if !backing_jobs.is_empty() {
                    b.read_many(&mut backing_jobs, threads)?;
                }
            }
            crate::parallel::read_all(&self.file, jobs, threads)
                .map_err(|e| Error::io("read for copy on write", e))?;
        }
        // 2. New clusters, in request order; one write job per host run.
        let mut jobs = seg.in_place;
        let mut new_entries: Vec<(u64, u64)> = Vec::new();
        for (w, (head, tail)) in seg.allocating.iter().zip(&cows) {
            let first = w.offset / cs;
            let last = (w.offset + w.len - 1) / cs;
            // L2 tables first, so metadata is allocated before (below) the data it maps.
            let mut gc = first;
            while gc <= last {
                self.l2_slot(gc, true)?;
                gc = (gc / self.l2_entries + 1) * self.l2_entries;
            }
            let mut gc = first;
            while gc <= last {
                let (start, got) = self.alloc_clusters(last + 1 - gc)?;
                let lo = (gc * cs).max(w.offset) - w.offset;
                let hi = ((gc + got) * cs).min(w.offset + w.len) - w.offset;
                let mut bufs: Vec<&[u8]> = Vec::new();
                if let (true, Some(h)) = (gc == first, head) {
                    bufs.push(&copy[h.at..h.at + h.len()]);
                }
                bufs.extend(crate::pieces(w.bufs, lo..hi));
                if let (true, Some(t)) = (gc + got > last, tail) {
                    bufs.push(&copy[t.at..t.at + t.len()]);
                }
                jobs.push(WriteJob {
                    offset: start * cs,
                    bufs,
                });
                new_entries.extend((0..got).map(|i| (gc + i, (start + i) * cs)));
                gc += got;
            }
        }
        // 3. All data, in parallel, into space allocated beforehand.
        self.preallocate(&new_entries);
        if let Err(e) = self.run_write_jobs(jobs, threads) {
            // (e.g. the host file system is full) Nothing maps the new clusters yet: give
            // them back rather than leak them.
            for (_, host) in new_entries {
                self.queue_free(host / cs, false, FreeReason::Internal);
            }
            return Err(e);
        }
        // 4. Map the new clusters; the old ones are released.
        for (gc, host) in new_entries {
            let old = self.mapping(gc)?;
            self.set_l2_entry(gc, host | OFLAG_COPIED)?;
            self.release_mapping(old, false, FreeReason::Internal);
        }
        Ok(())
    }

    /// Allocates the host space of the new clusters (`(guest, host)` pairs) with one
    /// `fallocate` per contiguous host run, before their data is written. Writes that extend
    /// the file, or fill holes in it, are serialised by file systems such as ext4 and XFS
    /// (they take the inode lock exclusively and, past the end of the file, wait for each
    /// other); writes into allocated space run side by side. The data then covers every byte
    /// of the new clusters, so this allocates nothing the writes would not. Best effort: a
    /// file system without `fallocate` just gets the writes.
    fn preallocate(&mut self, new_entries: &[(u64, u64)]) {
        if !self.prealloc_supported || new_entries.len() < 2 {
            return;
        }
        let cs = self.cluster_size;
        let mut hosts: Vec<u64> = new_entries.iter().map(|&(_, h)| h).collect();
        hosts.sort_unstable();
        let mut i = 0;
        while i < hosts.len() {
            let start = hosts[i];
            let mut end = start + cs;
            i += 1;
            while i < hosts.len() && hosts[i] == end {
                end += cs;
                i += 1;
            }
            match crate::raw::fallocate(&self.file, 0, start, end - start) {
                Ok(()) => self.file_len = self.file_len.max(end),
                Err(e) => {
                    if crate::raw::is_unsupported(&e) {
                        self.prealloc_supported = false;
                    }
                    // Otherwise (e.g. ENOSPC): the writes report what is wrong.
                    return;
                }
            }
        }
    }

    fn run_write_jobs(&mut self, jobs: Vec<WriteJob<'_>>, threads: usize) -> Result<()> {
        let end = jobs
            .iter()
            .map(|j| j.offset + crate::total_len(&j.bufs))
            .max()
            .unwrap_or(0);
        crate::parallel::write_all(&self.file, jobs, threads)
            .map_err(|e| Error::io("write guest data", e))?;
        self.file_len = self.file_len.max(end);
        Ok(())
    }
}
