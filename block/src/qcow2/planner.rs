//! Guest reads and writes of a qcow2 image as [`Plan`]s: the one write path.
//!
//! A read maps each run of clusters to where its bytes are: a data run of this file becomes
//! a read operation, a backing-file run the backing image's own plan, zeros and compressed
//! clusters are filled in at once.
//!
//! A write looks at each cluster it touches once:
//! * under zero detection, a cluster whose part of the write is all zeros becomes a zero
//!   action (the cluster is zeroed or released when the plan finishes);
//! * a cluster writable in place (refcount 1) joins a run of such clusters, contiguous on the
//!   host, written where it is;
//! * any other (unallocated, zero, shared, compressed) joins a run of new clusters: they are
//!   allocated now (refcount 1 in the cache), the untouched head of the first and tail of the
//!   last are copied from the cluster's current contents (a read stage before the write, or
//!   filled in at once for zeros and compressed data), and the L2 entries point at them only
//!   when the plan finishes after the data is in the file (refcounts before L2; the old
//!   clusters are queued for release, freed later once nothing is in flight).
//!
//! A single write is a plan of its own run on the calling thread; a batch or a device queue
//! runs many plans through a [`crate::pipeline::Pipeline`].

use std::sync::Arc;

use super::cluster::{Mapping, MAX_RUN};
use super::entry::owned_data;
use super::image::Qcow2Image;
use super::pending::FreeReason;
use crate::cast::usize_from;
use crate::engine::DataOp;
use crate::error::{Error, Result};
use crate::host_file::AlignedBuf;
use crate::iobuf::{self, IoBuf};
use crate::plan::{Action, Plan};
use crate::zero::DetectZeroes;

/// Stage of a plan's copy-on-write reads (and of plain reads and in-place writes).
const READ_STAGE: usize = 0;
/// Stage of the writes into new clusters (after their copy-on-write reads).
const WRITE_STAGE: usize = 1;
/// Host space allocated at once ahead of new clusters that extend the file.
const PREALLOC_CHUNK: u64 = 8 << 20;

impl Qcow2Image {
    /// Adds the reads of `bufs` (their concatenation) at guest `offset` to `plan`'s stage
    /// `stage`; zeros and compressed clusters are filled in now.
    pub(crate) fn plan_read_into(
        &mut self,
        offset: u64,
        bufs: &[IoBuf],
        plan: &mut Plan,
        stage: usize,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let len = iobuf::total_len(bufs);
        let mut pos = 0u64;
        let mut scratch: Vec<u8> = Vec::new();
        while pos < len {
            let goff = offset + pos;
            let gc = goff / cs;
            let in_off = goff % cs;
            let m = self.mapping(gc)?;
            // Extend over following clusters stored the same way (contiguous on the host).
            let mut run_end = (gc + 1) * cs;
            let mut k = 1;
            if !matches!(m, Mapping::Compressed(_)) {
                while run_end < offset + len && k < MAX_RUN {
                    let same = match (m, self.mapping(gc + k)?) {
                        (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => {
                            b == a + k * cs
                        }
                        (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                        (Mapping::Unallocated, Mapping::Unallocated) => true,
                        _ => false,
                    };
                    if !same {
                        break;
                    }
                    run_end += cs;
                    k += 1;
                }
            }
            let n = run_end.min(offset + len) - goff;
            let parts: Vec<IoBuf> = iobuf::pieces(bufs, pos..pos + n).collect();
            match m {
                Mapping::Data { host, .. } => {
                    push_read(plan, stage, &self.file, host + in_off, parts);
                }
                Mapping::Zero { .. } => iobuf::zero_range(&parts, 0..n),
                Mapping::Unallocated => self.plan_backing_read(goff, &parts, plan, stage)?,
                Mapping::Compressed(_) => {
                    scratch.resize(usize_from(cs), 0);
                    self.read_cluster(gc, m, &mut scratch)?;
                    iobuf::copy_into(
                        &parts,
                        0,
                        &scratch[usize_from(in_off)..usize_from(in_off + n)],
                    );
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads of guest bytes `offset..` (into `parts`) from the backing file, zeros past its
    /// end or without one.
    pub(crate) fn plan_backing_read(
        &mut self,
        offset: u64,
        parts: &[IoBuf],
        plan: &mut Plan,
        stage: usize,
    ) -> Result<()> {
        let n = iobuf::total_len(parts);
        let Some(b) = self.backing.as_mut() else {
            iobuf::zero_range(parts, 0..n);
            return Ok(());
        };
        let avail = b.virtual_size().saturating_sub(offset).min(n);
        if avail > 0 {
            let from_backing: Vec<IoBuf> = iobuf::pieces(parts, 0..avail).collect();
            let sub = b.plan_read(offset, &from_backing)?;
            plan.merge(stage, sub);
        }
        iobuf::zero_range(parts, avail..n);
        Ok(())
    }

    /// The plan of a write of `bufs` at guest `offset` (range and writability checked by
    /// the caller).
    pub(crate) fn plan_write_inner(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        let cs = self.cluster_size;
        let len = iobuf::total_len(bufs);
        let mut plan = Plan::write();
        if len == 0 {
            return Ok(plan);
        }
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        // The request's bytes within cluster `gc`, relative to the request.
        let piece = |gc: u64| {
            (
                (gc * cs).max(offset) - offset,
                ((gc + 1) * cs).min(offset + len) - offset,
            )
        };
        // Zero detection, once per cluster.
        let zero: Vec<bool> = if self.detect_zeroes == DetectZeroes::Off {
            vec![false; usize_from(last - first + 1)]
        } else {
            (first..=last)
                .map(|gc| {
                    let (s, e) = piece(gc);
                    iobuf::is_zero_range(bufs, s..e)
                })
                .collect()
        };
        // L2 tables first, so metadata is allocated before (below) the data it maps. (An
        // all-zero write under zero detection may need no table at all.)
        let mut gc = first;
        while gc <= last {
            let table_end = ((gc / self.l2_entries + 1) * self.l2_entries).min(last + 1);
            if (gc..table_end).any(|g| !zero[usize_from(g - first)]) {
                self.l2_slot(gc, true)?;
            }
            gc = table_end;
        }
        let mut gc = first;
        while gc <= last {
            let i = usize_from(gc - first);
            let (s, e) = piece(gc);
            if zero[i] {
                plan.actions.push(Action::Zeroes {
                    offset: offset + s,
                    len: e - s,
                });
                gc += 1;
                continue;
            }
            let m = self.mapping(gc)?;
            if self.writable_in_place(m)? {
                let Mapping::Data { host, copied } = m else {
                    return Err(Error::InvalidImage("unexpected mapping".into()));
                };
                if !copied {
                    self.set_l2_entry(gc, owned_data(host))?;
                }
                // A v2 zero cluster written in place is no longer a zero cluster.
                self.zero_clusters.remove(host);
                // Extend over following clusters also writable in place and contiguous.
                let mut k = 1;
                while gc + k <= last && !zero[i + usize_from(k)] && k < MAX_RUN {
                    match self.mapping(gc + k)? {
                        Mapping::Data {
                            host: h,
                            copied: true,
                        } if h == host + k * cs => {
                            self.zero_clusters.remove(h);
                            k += 1;
                        }
                        _ => break,
                    }
                }
                let end = piece(gc + k - 1).1;
                plan.push(
                    READ_STAGE,
                    DataOp {
                        file: self.file.clone(),
                        write: true,
                        offset: host + (offset + s) % cs,
                        bufs: iobuf::pieces(bufs, s..end).collect(),
                    },
                );
                gc += k;
                continue;
            }
            // A run of clusters that all need new clusters.
            let mut k = 1;
            while gc + k <= last && !zero[i + usize_from(k)] && k < MAX_RUN {
                let nm = self.mapping(gc + k)?;
                if self.writable_in_place(nm)? {
                    break;
                }
                k += 1;
            }
            self.plan_allocation(&mut plan, gc, k, offset, bufs)?;
            gc += k;
        }
        Ok(plan)
    }

    /// New clusters for guest clusters `gc..gc + k` of a write of `bufs` at `offset`: one
    /// write per contiguous host run, with the copy-on-write head and tail.
    pub(crate) fn plan_allocation(
        &mut self,
        plan: &mut Plan,
        gc: u64,
        k: u64,
        offset: u64,
        bufs: &[IoBuf],
    ) -> Result<()> {
        let cs = self.cluster_size;
        let req_end = offset + iobuf::total_len(bufs);
        let mut done = 0u64;
        while done < k {
            let (start, got) = self.alloc_clusters(k - done)?;
            plan.new_clusters.push((start, got));
            let host = start * cs;
            let g0 = gc + done;
            let (run_start, run_end) = (g0 * cs, (g0 + got) * cs);
            let (lo, hi) = (run_start.max(offset), run_end.min(req_end));
            let mut wbufs = Vec::new();
            if lo > run_start {
                wbufs.push(self.plan_cow_part(plan, g0, run_start, lo)?);
            }
            wbufs.extend(iobuf::pieces(bufs, lo - offset..hi - offset));
            if hi < run_end {
                wbufs.push(self.plan_cow_part(plan, g0 + got - 1, hi, run_end)?);
            }
            self.preallocate(host, got * cs);
            plan.push(
                WRITE_STAGE,
                DataOp {
                    file: self.file.clone(),
                    write: true,
                    offset: host,
                    bufs: wbufs,
                },
            );
            for i in 0..got {
                plan.actions.push(Action::Map {
                    gc: g0 + i,
                    entry: owned_data(host + i * cs),
                });
            }
            done += got;
        }
        Ok(())
    }

    /// A bounce buffer with the current contents of guest bytes `from..to` (inside cluster
    /// `gc`): read in the plan's read stage, or filled in now.
    pub(crate) fn plan_cow_part(
        &mut self,
        plan: &mut Plan,
        gc: u64,
        from: u64,
        to: u64,
    ) -> Result<IoBuf> {
        let cs = self.cluster_size;
        let mut buf = AlignedBuf::new(usize_from(to - from));
        // SAFETY: the buffer's heap memory is kept in `plan.bounce` (below) until the plan
        // is dropped, after all its operations; it does not move with the AlignedBuf.
        let b = unsafe { IoBuf::from_mut_slice(buf.as_mut_slice()) };
        // The part of the last cluster past the virtual size stays zero.
        let readable = to.min(self.header.size).saturating_sub(from);
        let parts = [b.sub(0, usize_from(readable))];
        if readable > 0 {
            match self.mapping(gc)? {
                Mapping::Data { host, .. } => {
                    push_read(
                        plan,
                        READ_STAGE,
                        &self.file,
                        host + from % cs,
                        parts.to_vec(),
                    );
                }
                Mapping::Zero { .. } => {}
                Mapping::Unallocated => {
                    self.plan_backing_read(from, &parts, plan, READ_STAGE)?;
                }
                m @ Mapping::Compressed(_) => {
                    let mut cluster = vec![0u8; usize_from(cs)];
                    self.read_cluster(gc, m, &mut cluster)?;
                    let at = usize_from(from % cs);
                    iobuf::copy_into(&parts, 0, &cluster[at..at + usize_from(readable)]);
                }
            }
        }
        // (The buffer's heap memory does not move with it: `b` stays valid in the plan.)
        plan.bounce.push(buf);
        Ok(b)
    }

    /// Allocates host space ahead of new clusters that extend the file, with one
    /// `fallocate` for [`PREALLOC_CHUNK`] bytes or more, before their data is written. Writes
    /// that extend the file are serialised by file systems such as ext4 and XFS (they take
    /// the inode lock exclusively and wait for each other), and `fallocate` itself waits for
    /// every direct I/O in flight on the file: so it runs once per chunk, not per cluster.
    /// Space allocated past the last cluster in use is cut off when the file's tail is
    /// truncated (on flush, or when the guest goes quiet). Best effort: a file system without
    /// `fallocate` just gets the writes.
    pub(crate) fn preallocate(&mut self, host: u64, len: u64) {
        let end = host + len;
        if !self.prealloc_supported || end <= self.file_len {
            return;
        }
        let want = len.max(PREALLOC_CHUNK);
        match self.file.preallocate(host, want) {
            Ok(()) => self.file_len = self.file_len.max(host + want),
            Err(e) => {
                if crate::host_file::is_unsupported(&e) {
                    self.prealloc_supported = false;
                }
                // Otherwise (e.g. ENOSPC): the writes report what is wrong.
            }
        }
    }

    /// After a write plan's data operations ran: the new clusters are mapped and the old
    /// ones released, zero actions applied; or, if the data could not be written, the new
    /// clusters are given back.
    pub(crate) fn finish_write(&mut self, plan: Plan, data: Result<()>) -> Result<()> {
        let cs = self.cluster_size;
        if let Err(e) = data {
            // (e.g. the host file system is full) Nothing maps the new clusters yet: give
            // them back rather than leak them.
            for &(start, n) in &plan.new_clusters {
                for c in start..start + n {
                    self.queue_free(c, false, FreeReason::Internal);
                }
            }
            return Err(e);
        }
        for action in plan.actions {
            match action {
                Action::Map { gc, entry } => {
                    let host = entry & super::entry::L2E_OFFSET_MASK;
                    self.file_len = self.file_len.max(host + cs);
                    let old = self.mapping(gc)?;
                    self.set_l2_entry(gc, entry)?;
                    self.release_mapping(old, false, FreeReason::Internal);
                }
                Action::Zeroes { offset, len } => self.detected_zeroes(offset, len)?,
            }
        }
        Ok(())
    }

    /// Writes `data` at guest `offset` on the calling thread (no range check: the last
    /// cluster may reach past the virtual size).
    pub(crate) fn write_sync_inner(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        // SAFETY: `data` is borrowed for this call, which runs and finishes the plan.
        let bufs = [unsafe { IoBuf::from_slice(data) }];
        let plan = self.plan_write_inner(offset, &bufs)?;
        let r = plan
            .run_sync()
            .map_err(|e| Error::io("write guest data", e));
        self.finish_write(plan, r)
    }
}

/// Adds a read of `parts` at host `offset` of `file` to `stage`, joined to the stage's last
/// read when that one ends where this one starts.
fn push_read(
    plan: &mut Plan,
    stage: usize,
    file: &Arc<crate::host_file::HostFile>,
    offset: u64,
    parts: Vec<IoBuf>,
) {
    if let Some(last) = plan.stages.get_mut(stage).and_then(|s| s.last_mut()) {
        if !last.write
            && Arc::ptr_eq(&last.file, file)
            && last.offset + last.len() == offset
            && last.bufs.len() + parts.len() <= 1024
        {
            last.bufs.extend(parts);
            return;
        }
    }
    plan.push(
        stage,
        DataOp {
            file: file.clone(),
            write: false,
            offset,
            bufs: parts,
        },
    );
}
