//! The [`DiskImage`] trait that the device layer and the image tool use, and how its
//! synchronous and batched defaults run plans (on the calling thread, or through a
//! [`Pipeline`] on the I/O threads).

use crate::engine;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::iobuf::IoBuf;
use crate::pipeline::{self, Pipeline};
use crate::plan::Plan;
use crate::status::{HostUsage, MapExtent, ReclaimStats};
use crate::zero::DetectZeroes;

/// A disk image as the device layer and the image tool see it.
///
/// All offsets and lengths are guest bytes. Requests beyond [`DiskImage::virtual_size`] fail
/// with [`Error::OutOfRange`]; write-type requests on a read-only image fail with
/// [`Error::ReadOnly`].
pub trait DiskImage: Send {
    /// The image file's format.
    fn format(&self) -> ImageFormat;
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// Whether the image was opened read-only (or was forced read-only, e.g. marked corrupt).
    fn is_read_only(&self) -> bool;
    /// Plans a read of `bufs` (their concatenation) at `offset`: zeros, compressed data and
    /// the like are filled in now, the rest becomes the plan's data operations.
    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan>;
    /// Plans a write of the concatenation of `bufs` at `offset` (subject to zero detection,
    /// see [`DiskImage::set_detect_zeroes`]): the metadata decided now, the data operations
    /// and the metadata actions that follow them in the plan.
    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan>;
    /// Completes a plan after its data operations ran (`data`: their result): a write's
    /// metadata actions, or giving back what it allocated if the data could not be written.
    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()>;
    /// Granularity at which writes in flight are ordered ([`pipeline::Pipeline`]): requests
    /// touching the same unit run one after the other.
    fn lock_unit(&self) -> u64;
    /// Whether deferred work (see [`DiskImage::idle`]) is due and the caller should let the
    /// I/O in flight finish and call `idle`.
    fn needs_drain(&self) -> bool {
        false
    }
    /// Makes every completed write durable while other requests may be in flight (leaves
    /// out work that needs all I/O finished, which [`DiskImage::flush`] does).
    fn flush_completed(&mut self) -> Result<()> {
        self.flush()
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // SAFETY: `buf` is borrowed for this call, which the buffer does not outlive.
        let bufs = [unsafe { IoBuf::from_mut_slice(buf) }];
        read_sync(self, offset, &bufs)
    }
    /// Writes `buf` at `offset` (subject to zero detection, see [`DiskImage::set_detect_zeroes`]).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        // SAFETY: `buf` is borrowed for this call, which the buffer does not outlive.
        let bufs = [unsafe { IoBuf::from_slice(buf) }];
        write_sync(self, offset, &bufs)
    }
    /// Writes the concatenation of `bufs` at `offset`, exactly like [`DiskImage::write_at`]
    /// of the gathered bytes (no gathering copy is made; `scratch` is not needed any more).
    fn write_vectored_at(
        &mut self,
        offset: u64,
        bufs: &[&[u8]],
        _scratch: &mut Vec<u8>,
    ) -> Result<()> {
        // SAFETY: the slices are borrowed for this call, which the buffers do not outlive.
        let bufs: Vec<IoBuf> = bufs
            .iter()
            .map(|b| unsafe { IoBuf::from_slice(b) })
            .collect();
        write_sync(self, offset, &bufs)
    }
    /// Reads the bytes at `offset` into `bufs` in turn, exactly like [`DiskImage::read_at`]
    /// into one buffer that is then scattered over them.
    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [&mut [u8]],
        _scratch: &mut Vec<u8>,
    ) -> Result<()> {
        // SAFETY: the slices are borrowed (exclusively) for this call, which the buffers do
        // not outlive.
        let bufs: Vec<IoBuf> = bufs
            .iter_mut()
            .map(|b| unsafe { IoBuf::from_mut_slice(b) })
            .collect();
        read_sync(self, offset, &bufs)
    }
    /// Reads every `(offset, buf)` of a batch, as [`DiskImage::read_at`] would, with up to
    /// `threads` data reads in flight at once. Returns the first error (in batch order).
    fn read_many(&mut self, reqs: &mut [(u64, &mut [u8])], threads: usize) -> Result<()> {
        let mut list = Vec::with_capacity(reqs.len());
        for (offset, buf) in reqs.iter_mut() {
            // SAFETY: the buffer is borrowed (exclusively) from `reqs` for this call, which
            // waits for every request to complete.
            let buf = unsafe { IoBuf::from_mut_slice(buf) };
            list.push(pipeline::IoRequest::Read {
                offset: *offset,
                bufs: vec![buf],
            });
        }
        let reqs = list;
        // SAFETY: the buffers are borrowed from `reqs` for this whole call, which waits for
        // every request to complete.
        unsafe { run_batch(self, reqs, threads) }
    }
    /// Writes every `(offset, buffers)` of a batch, as [`DiskImage::write_vectored_at`]
    /// would, in order where they overlap (a later write to a cluster an earlier one touches
    /// waits for it), with up to `threads` data writes in flight at once. Returns the first
    /// error (in batch order).
    fn write_many(
        &mut self,
        reqs: &[(u64, &[&[u8]])],
        threads: usize,
        _scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let mut list = Vec::with_capacity(reqs.len());
        for (offset, bufs) in reqs {
            let mut iobufs = Vec::with_capacity(bufs.len());
            for b in bufs.iter() {
                // SAFETY: the buffer is borrowed from `reqs` for this call, which waits for
                // every request to complete.
                iobufs.push(unsafe { IoBuf::from_slice(b) });
            }
            list.push(pipeline::IoRequest::Write {
                offset: *offset,
                bufs: iobufs,
            });
        }
        let reqs = list;
        // SAFETY: the buffers are borrowed from `reqs` for this whole call, which waits for
        // every request to complete.
        unsafe { run_batch(self, reqs, threads) }
    }
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;
    /// Makes `len` bytes at `offset` read as zeros. With `may_unmap`, host space may be
    /// released.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Discards `len` bytes at `offset`: the range need not keep its contents, and never
    /// reads anything it did not read before. On a qcow2 overlay whole clusters read as zeros
    /// (never the backing file's data); a piece of a cluster the overlay does not hold by
    /// itself keeps reading as before, as in QEMU: a discard never allocates.
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
    /// The status of the range starting at `offset`: one extent of uniform status, at most
    /// `max_len` bytes long.
    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<MapExtent>;
    /// Sets zero detection for subsequent writes.
    fn set_detect_zeroes(&mut self, mode: DetectZeroes);
    /// Current zero detection mode.
    fn detect_zeroes(&self) -> DetectZeroes;
    /// Host space given back so far, by path.
    fn reclaim_stats(&self) -> ReclaimStats;
    /// Host storage used by the image file (this layer only, not its backing files).
    fn host_usage(&self) -> Result<HostUsage>;
    /// Granularity (bytes) at which discard and write-zeroes can release space: the cluster
    /// size for qcow2, 4 KiB for raw.
    fn discard_granularity(&self) -> u64;
    /// Called when the device has no request in flight: lets the image finish deferred work
    /// (e.g. committing freed clusters so the file shrinks without waiting for a flush).
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Reads `bufs` at `offset` on the calling thread: plan, data, finish.
fn read_sync<I: DiskImage + ?Sized>(img: &mut I, offset: u64, bufs: &[IoBuf]) -> Result<()> {
    let plan = img.plan_read(offset, bufs)?;
    let r = plan.run_sync().map_err(|e| Error::io("read image data", e));
    img.finish(plan, r)
}

/// Writes `bufs` at `offset` on the calling thread: plan, data, finish, and the deferred
/// work that became due.
fn write_sync<I: DiskImage + ?Sized>(img: &mut I, offset: u64, bufs: &[IoBuf]) -> Result<()> {
    let plan = img.plan_write(offset, bufs)?;
    let r = plan
        .run_sync()
        .map_err(|e| Error::io("write image data", e));
    img.finish(plan, r)?;
    if img.needs_drain() {
        img.idle()?;
    }
    Ok(())
}

/// Runs a batch of requests through a pipeline on the I/O threads (at most `threads` data
/// operations at once) and waits for all of them; returns the first error in batch order.
///
/// # Safety
/// The requests' buffers must be valid until this returns.
unsafe fn run_batch<I: DiskImage + ?Sized>(
    img: &mut I,
    reqs: Vec<pipeline::IoRequest>,
    threads: usize,
) -> Result<()> {
    let engine: Box<dyn engine::Engine> = match engine::threads::ThreadEngine::new(threads) {
        Ok(e) if threads > 1 => Box::new(e),
        _ => Box::new(engine::sync::SyncEngine::default()),
    };
    let mut p = Pipeline::new(engine);
    for (i, r) in reqs.into_iter().enumerate() {
        // SAFETY: the caller keeps the buffers valid until this returns, and `drain` below
        // waits for every request.
        unsafe { p.submit(img, i as u64, r) };
    }
    let mut out = Vec::new();
    p.drain(img, &mut out);
    out.sort_by_key(|(tag, _)| *tag);
    let first_error = out.into_iter().find_map(|(_, r)| r.err());
    if img.needs_drain() {
        img.idle()?;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Checks that `[offset, offset + len)` lies within `size`.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// The pipeline drives every disk image through the methods of the same names.
impl<T: DiskImage + ?Sized> pipeline::PlanningImage for T {
    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        DiskImage::plan_read(self, offset, bufs)
    }
    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        DiskImage::plan_write(self, offset, bufs)
    }
    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()> {
        DiskImage::finish(self, plan, data)
    }
    fn lock_unit(&self) -> u64 {
        DiskImage::lock_unit(self)
    }
    fn needs_drain(&self) -> bool {
        DiskImage::needs_drain(self)
    }
    fn flush_completed(&mut self) -> Result<()> {
        DiskImage::flush_completed(self)
    }
    fn idle(&mut self) -> Result<()> {
        DiskImage::idle(self)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        DiskImage::write_zeroes(self, offset, len, may_unmap)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        DiskImage::discard(self, offset, len)
    }
}
