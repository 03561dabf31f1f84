//! thinvm's disk image crate.
//!
//! One trait, [`DiskImage`], is what the device layer (virtio-blk) and the `thinvm image` tool
//! use. Implementations: [`raw::RawImage`] and [`qcow2::Qcow2Image`]. [`open`] probes the
//! format (under the rules of [`probe`]) and opens either.
//!
//! A read or write becomes a [`Plan`] (the image's metadata decisions as data: data
//! operations in stages, then metadata actions); plans run on the calling thread (the
//! synchronous methods, e.g. [`DiskImage::write_at`]) or many at once through a
//! [`pipeline::Pipeline`] on an [`engine`] (io_uring, I/O threads, synchronous). Request
//! buffers are [`IoBuf`]s, never Rust slices over memory others may change.

pub mod chain;
pub mod engine;
pub mod error;
pub mod host_file;
pub mod inspect;
pub mod iobuf;
pub mod lock;
mod parallel;
pub mod pipeline;
pub mod plan;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod zero;

use std::path::Path;

pub use error::{Error, Result};
pub use iobuf::IoBuf;
pub use parallel::{start_pool, ThreadStart, MAX_THREADS as MAX_IO_THREADS};
pub use plan::Plan;
pub use probe::{probe_format, ProbePolicy};

/// Image file formats understood by the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name used on command lines and in JSON (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::InvalidArgument(format!(
                "unknown image format '{other}' (expected raw or qcow2)"
            ))),
        }
    }
}

/// Zero detection on ordinary writes, with QEMU's names and meanings.
///
/// * `Off`: writes are written as given.
/// * `On`: an all-zero write (per cluster for qcow2) becomes a write-zeroes request that keeps
///   the allocation.
/// * `Unmap`: an all-zero write becomes a write-zeroes request that may release host space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

impl std::str::FromStr for DetectZeroes {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(Error::InvalidArgument(format!(
                "unknown detect-zeroes mode '{other}' (expected off, on or unmap)"
            ))),
        }
    }
}

/// Counters of host space given back, by the path that gave it back (bytes of host clusters
/// released, not guest bytes requested).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimStats {
    /// Released because an ordinary write turned out to be all zeros.
    pub zero_detect_bytes: u64,
    /// Released by discard requests.
    pub discard_bytes: u64,
    /// Released by write-zeroes requests.
    pub write_zeroes_bytes: u64,
}

/// How much host storage the image file uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostUsage {
    /// Bytes of the file actually allocated on the host (`st_blocks * 512`, what `du` shows).
    pub allocated_bytes: u64,
    /// The file's apparent size (`st_size`, what `ls -l` shows).
    pub apparent_bytes: u64,
}

impl HostUsage {
    /// Reads the usage of an open file.
    pub fn of_file(file: &host_file::HostFile) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat image file", e))?;
        Ok(HostUsage {
            allocated_bytes: meta.blocks().saturating_mul(512),
            apparent_bytes: meta.size(),
        })
    }
}

/// The status of one guest-visible range, as `qemu-img map --output=json` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapExtent {
    /// Guest offset of the extent.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Depth in the backing chain where the data comes from (0 = this image). For ranges
    /// that no layer allocates, the depth of the last layer (the chain's length - 1) plus one
    /// if it is beyond every layer, as QEMU reports it.
    pub depth: u32,
    /// Whether some layer of the chain provides the data (false: unallocated everywhere).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range is backed by data in a file.
    pub data: bool,
    /// Host offset in the file of `depth` where the data lives, if it is stored uncompressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

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
    /// Discards `len` bytes at `offset`: the range need not keep its contents, but on an
    /// overlay it never reads back the backing file's data afterwards (thinvm reads zeros).
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
    let mut p = pipeline::Pipeline::new(engine);
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

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open the file read-only.
    pub read_only: bool,
    /// The expected format; `None` probes the file's first bytes.
    pub format: Option<ImageFormat>,
    /// What the image may do if its format is probed (and which backing files of unrecorded
    /// format may be followed): see [`probe`].
    pub probe: ProbePolicy,
    /// Bypass the host page cache (`O_DIRECT`, QEMU's `cache=none`), for the image and its
    /// backing chain.
    pub direct: bool,
    /// QEMU's `force-share` (`-U`): lock the chain without refusing other users, for reading
    /// an image another process may be writing. Only with `read_only` ([`lock`]).
    pub force_share: bool,
}

/// Opens an image, probing its format unless `opts.format` names it. A probed image is held
/// to `opts.probe`'s rules ([`probe`]): a probed qcow2 image that names a backing file may
/// be refused, and a writable image probed as raw refuses writes that would make it probe as
/// another format.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    // Checked before anything is opened: force-share is for read-only opens only.
    let lock_mode = lock::LockMode::for_open(opts.read_only, opts.force_share)?;
    let mut file =
        host_file::HostFile::open(path, opts.read_only, opts.direct).map_err(|source| {
            Error::Open {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let probed = opts.format.is_none();
    let format = match opts.format {
        Some(f) => f,
        None => probe::probe_file(&file, path)?,
    };
    Ok(match format {
        ImageFormat::Raw => {
            file.lock(path, lock_mode)?;
            let mut img = raw::RawImage::from_host_file(file, opts.read_only)?;
            if probed && !opts.read_only {
                tracing::warn!(
                    "{}: no format given and probing found raw: writes that would make its first bytes look like another format are refused; give format=raw to allow them",
                    path.display()
                );
                img.keep_probed_raw();
            }
            Box::new(img)
        }
        ImageFormat::Qcow2 => {
            let mut chain = chain::Chain::new(opts.probe.follows_probed_names(opts.read_only));
            Box::new(qcow2::Qcow2Image::open_file(
                file,
                path,
                opts.read_only,
                &mut chain,
                qcow2::OpenFlags {
                    direct: opts.direct,
                    force_share: opts.force_share,
                    ..Default::default()
                },
                probed.then_some(probe::Probed::Image),
            )?)
        }
    })
}

/// Checks that `[offset, offset + len)` lies within `size`.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Creates an image of the given format. For raw, only `opts.size` is used.
pub fn create(path: &Path, format: ImageFormat, opts: &qcow2::CreateOptions) -> Result<()> {
    match format {
        ImageFormat::Raw => {
            if opts.backing_file.is_some() {
                return Err(Error::InvalidArgument(
                    "raw images cannot have a backing file".into(),
                ));
            }
            let size = opts
                .size
                .ok_or_else(|| Error::InvalidArgument("image size required".into()))?;
            raw::RawImage::create(path, size)
        }
        ImageFormat::Qcow2 => qcow2::create(path, opts),
    }
}
