//! Raw images: the file is the disk, byte for byte.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use crate::cast::usize_from;
use crate::disk::{check_range, DiskImage};
use crate::engine::DataOp;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::host_file::{is_unsupported, AlignedBuf, HostFile};
use crate::iobuf::IoBuf;
use crate::plan::{Action, Plan};
use crate::status::{HostUsage, MapExtent, ReclaimStats};
use crate::zero::DetectZeroes;

/// Granularity of hole punching on raw files.
const RAW_GRANULARITY: u64 = 4096;

/// A raw image file.
pub struct RawImage {
    file: Arc<HostFile>,
    size: u64,
    read_only: bool,
    detect_zeroes: DetectZeroes,
    stats: ReclaimStats,
    /// Whether the host file system accepted `FALLOC_FL_PUNCH_HOLE` so far.
    punch_supported: bool,
    /// The format was probed: writes may not make the image probe as another format.
    keep_raw: bool,
}

impl RawImage {
    /// Opens a raw image; its virtual size is the file's size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, read_only, false)
    }

    /// Opens a raw image, with `O_DIRECT` if `direct`.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        Self::open_with_options(
            path,
            &crate::options::OpenOptions {
                read_only,
                direct,
                ..Default::default()
            },
        )
    }

    /// Opens a raw image with the read-only, direct-I/O and force-share settings of `opts`,
    /// locked as [`crate::lock`] says.
    pub fn open_with_options(path: &Path, opts: &crate::options::OpenOptions) -> Result<Self> {
        let mode = crate::lock::LockMode::for_open(opts.read_only, opts.force_share)?;
        let mut file =
            HostFile::open(path, opts.read_only, opts.direct).map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        file.lock(path, mode)?;
        Self::from_host_file(file, opts.read_only)
    }

    /// Wraps an already open file (not locked).
    pub fn from_file(file: File, read_only: bool) -> Result<Self> {
        Self::from_host_file(HostFile::from_file(file), read_only)
    }

    pub(crate) fn from_host_file(file: HostFile, read_only: bool) -> Result<Self> {
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat raw image", e))?
            .len();
        Ok(RawImage {
            file: Arc::new(file),
            size,
            read_only,
            detect_zeroes: DetectZeroes::Off,
            stats: ReclaimStats::default(),
            punch_supported: true,
            keep_raw: false,
        })
    }

    /// From now on, refuses writes that would make the image's first bytes probe as another
    /// format (for images whose format was probed, see [`crate::probe`]).
    pub fn keep_probed_raw(&mut self) {
        self.keep_raw = true;
    }

    /// For a write of the concatenation of `bufs` at `offset` on an image kept raw
    /// ([`RawImage::keep_probed_raw`]) that reaches into the bytes the probe reads: a private
    /// copy of the request's bytes there, checked ([`RawImage::check_stays_raw`]). The plan
    /// writes the copy, not the request's buffers, so the bytes written are the bytes
    /// checked: a guest's vCPUs may change its buffers until the data write ends (with
    /// io_uring or the I/O threads, long after planning). `None` when the write does not
    /// reach the probed bytes or the image is not kept raw.
    ///
    /// The file's bytes the check reads are current: in a [`crate::pipeline::Pipeline`], a
    /// write is planned only when no earlier write overlapping its lock units (4 KiB, which
    /// hold all the probed bytes) is in flight or waiting. The request's bytes are read with
    /// volatile copies ([`crate::iobuf::copy_out`]): guest RAM is never seen through a Rust
    /// slice.
    fn checked_head(&self, offset: u64, bufs: &[IoBuf]) -> Result<Option<AlignedBuf>> {
        let probe_len = (crate::probe::PROBE_BYTES as u64).min(self.size);
        if !self.keep_raw || offset >= probe_len {
            return Ok(None);
        }
        let covered = (probe_len - offset).min(crate::iobuf::total_len(bufs));
        if covered == 0 {
            return Ok(None);
        }
        let mut copy = AlignedBuf::new(usize_from(covered));
        crate::iobuf::copy_out(bufs, 0, copy.as_mut_slice());
        self.check_stays_raw(offset, copy.as_slice())?;
        Ok(Some(copy))
    }

    /// The one check of [`RawImage::keep_probed_raw`], for `bytes` written at `offset` (at
    /// most up to the end of the probed bytes): the bytes the probe reads, as they would be
    /// after the write (the file's current bytes where the write does not cover them), must
    /// still probe as raw. Every raw write plans through it ([`RawImage::checked_head`] from
    /// [`DiskImage::plan_write`]), and so do write-zeroes and discard (zeros can complete a
    /// signature too: `QED\0`).
    fn check_stays_raw(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let probe_len = (crate::probe::PROBE_BYTES as u64).min(self.size);
        if !self.keep_raw || offset >= probe_len {
            return Ok(());
        }
        let mut head = vec![0u8; usize_from(probe_len)];
        self.file
            .read_exact_at(&mut head, 0)
            .map_err(|e| Error::io("read raw image", e))?;
        let at = usize_from(offset);
        let covered = (head.len() - at).min(bytes.len());
        head[at..at + covered].copy_from_slice(&bytes[..covered]);
        match crate::probe::foreign_format_of_head(&head) {
            None => Ok(()),
            Some(other) => Err(Error::Probe(format!(
                "write at offset {offset} refused: the image's format was probed as raw, and this write would make it probe as {other} (a guest could then make the host open other files); give the format (format=raw) to allow such writes"
            ))),
        }
    }

    /// [`RawImage::check_stays_raw`] for `len` bytes at `offset` that are to read as zeros
    /// (write-zeroes, discard).
    fn check_zeros_stay_raw(&self, offset: u64, len: u64) -> Result<()> {
        let probe_len = (crate::probe::PROBE_BYTES as u64).min(self.size);
        if !self.keep_raw || offset >= probe_len || len == 0 {
            return Ok(());
        }
        let covered = (probe_len - offset).min(len);
        self.check_stays_raw(offset, &vec![0u8; usize_from(covered)])
    }

    /// Creates (or truncates) a raw image of `size` bytes; the file is sparse. An existing
    /// file another process uses is refused before it is truncated ([`crate::lock`]).
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let _lock = crate::lock::acquire(&file, path, crate::lock::LockMode::Create)?;
        file.set_len(0)
            .and_then(|()| file.set_len(size))
            .map_err(|e| Error::io(format!("resize {}", path.display()), e))
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Releases host blocks of the range, keeping the file size. Returns the number of bytes
    /// of allocation given back (measured via st_blocks), or `None` if the file system cannot
    /// punch holes.
    fn punch(&mut self, offset: u64, len: u64) -> Result<Option<u64>> {
        if !self.punch_supported || len == 0 {
            return Ok(None);
        }
        let before = HostUsage::of_file(&self.file)?.allocated_bytes;
        match self.file.punch_hole(offset, len) {
            Ok(()) => {
                let after = HostUsage::of_file(&self.file)?.allocated_bytes;
                Ok(Some(before.saturating_sub(after)))
            }
            Err(e) if is_unsupported(&e) => {
                self.punch_supported = false;
                Ok(None)
            }
            Err(e) => Err(Error::io("punch hole in raw image", e)),
        }
    }

    /// Zeroes the range without releasing space.
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        match self.file.zero_range(offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zero_bytes(offset, len),
            Err(e) => Err(Error::io("zero range in raw image", e)),
        }
    }

    fn write_zero_bytes(&mut self, mut offset: u64, len: u64) -> Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = usize_from((end - offset).min(chunk.len() as u64));
            self.file
                .write_all_at(&chunk[..n], offset)
                .map_err(|e| Error::io("write zeros to raw image", e))?;
            offset += n as u64;
        }
        Ok(())
    }

    /// A write of `len` zero bytes that zero detection caught (detection on).
    fn detected_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let unmap = self.detect_zeroes == DetectZeroes::Unmap;
        let released = self.zero_or_unmap(offset, len, unmap)?;
        self.stats.zero_detect_bytes += released;
        Ok(())
    }

    /// Zeroes a range, releasing space when allowed; returns bytes of allocation released.
    fn zero_or_unmap(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<u64> {
        if may_unmap {
            if let Some(released) = self.punch(offset, len)? {
                return Ok(released);
            }
        }
        self.zero_range(offset, len)?;
        Ok(0)
    }
}

impl DiskImage for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn plan_read(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        check_range(offset, crate::iobuf::total_len(bufs), self.size)?;
        let mut plan = Plan::default();
        plan.push(
            0,
            DataOp {
                file: self.file.clone(),
                write: false,
                offset,
                bufs: bufs.to_vec(),
            },
        );
        Ok(plan)
    }

    fn plan_write(&mut self, offset: u64, bufs: &[IoBuf]) -> Result<Plan> {
        self.check_writable()?;
        let total = crate::iobuf::total_len(bufs);
        check_range(offset, total, self.size)?;
        let mut plan = Plan::write();
        // The probed bytes come from the checked copy, the rest from the request.
        let mut data = Vec::with_capacity(bufs.len() + 1);
        match self.checked_head(offset, bufs)? {
            Some(copy) => {
                // SAFETY: the copy's heap memory is kept in `plan.bounce` (below) until the
                // plan is dropped, after all its operations; it does not move with the
                // AlignedBuf, and nothing else refers to it.
                data.push(unsafe { IoBuf::from_slice(copy.as_slice()) });
                crate::iobuf::push_pieces(&mut data, bufs, copy.as_slice().len() as u64..total);
                plan.bounce.push(copy);
            }
            None => data.extend_from_slice(bufs),
        }
        if self.detect_zeroes != DetectZeroes::Off
            && total > 0
            && crate::iobuf::is_zero_range(&data, 0..total)
        {
            plan.actions.push(Action::Zeroes { offset, len: total });
            return Ok(plan);
        }
        plan.push(
            0,
            DataOp {
                file: self.file.clone(),
                write: true,
                offset,
                bufs: data,
            },
        );
        Ok(plan)
    }

    fn finish(&mut self, plan: Plan, data: Result<()>) -> Result<()> {
        data?;
        for a in plan.actions {
            if let Action::Zeroes { offset, len } = a {
                self.detected_zeroes(offset, len)?;
            }
        }
        Ok(())
    }

    fn lock_unit(&self) -> u64 {
        RAW_GRANULARITY
    }

    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush raw image", e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.check_zeros_stay_raw(offset, len)?;
        let released = self.zero_or_unmap(offset, len, may_unmap)?;
        self.stats.write_zeroes_bytes += released;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        self.check_zeros_stay_raw(offset, len)?;
        // A punched range reads as zeros; where the file system cannot punch, discard is a
        // no-op (the contents may stay, as the discard contract allows for raw images).
        if let Some(released) = self.punch(offset, len)? {
            self.stats.discard_bytes += released;
        }
        Ok(())
    }

    fn block_status(&mut self, offset: u64, max_len: u64) -> Result<MapExtent> {
        check_range(offset, max_len, self.size)?;
        let end = offset + max_len;
        let data_start = self
            .file
            .seek_data(offset)
            .map_err(|e| Error::io("seek data in raw image", e))?;
        let (is_data, ext_end) = match data_start {
            Some(d) if d <= offset => {
                let hole = self
                    .file
                    .seek_hole(offset)
                    .map_err(|e| Error::io("seek hole in raw image", e))?
                    .unwrap_or(end);
                (true, hole)
            }
            Some(d) => (false, d),
            None => (false, end),
        };
        let ext_end = ext_end.clamp(offset + 1, end);
        Ok(MapExtent {
            start: offset,
            length: ext_end - offset,
            depth: 0,
            present: true,
            zero: !is_data,
            data: is_data,
            offset: Some(offset),
        })
    }

    fn set_detect_zeroes(&mut self, mode: DetectZeroes) {
        self.detect_zeroes = mode;
    }

    fn detect_zeroes(&self) -> DetectZeroes {
        self.detect_zeroes
    }

    fn reclaim_stats(&self) -> ReclaimStats {
        self.stats
    }

    fn host_usage(&self) -> Result<HostUsage> {
        HostUsage::of_file(&self.file)
    }

    fn discard_granularity(&self) -> u64 {
        RAW_GRANULARITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_raw(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        RawImage::create(&path, size).unwrap();
        (dir, path)
    }

    #[test]
    fn write_read_and_bounds() {
        let (_d, path) = temp_raw(1 << 20);
        let mut img = RawImage::open(&path, false).unwrap();
        img.write_at(4096, &[0xab; 512]).unwrap();
        let mut buf = [0u8; 512];
        img.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 512]);
        assert!(matches!(
            img.write_at((1 << 20) - 100, &[1; 200]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            img.read_at(u64::MAX - 10, &mut buf),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_d, path) = temp_raw(65536);
        let mut img = RawImage::open(&path, true).unwrap();
        assert!(matches!(img.write_at(0, &[1]), Err(Error::ReadOnly)));
        assert!(matches!(img.discard(0, 4096), Err(Error::ReadOnly)));
        assert!(matches!(
            img.write_zeroes(0, 4096, true),
            Err(Error::ReadOnly)
        ));
    }

    #[test]
    fn zero_detection_unmap_releases_space() {
        let (_d, path) = temp_raw(4 << 20);
        let mut img = RawImage::open(&path, false).unwrap();
        img.write_at(0, &vec![7u8; 4 << 20]).unwrap();
        img.flush().unwrap();
        let full = img.host_usage().unwrap().allocated_bytes;
        assert!(full >= 4 << 20);
        img.set_detect_zeroes(DetectZeroes::Unmap);
        img.write_at(1 << 20, &vec![0u8; 2 << 20]).unwrap();
        let after = img.host_usage().unwrap();
        let mut buf = vec![1u8; 2 << 20];
        img.read_at(1 << 20, &mut buf).unwrap();
        assert!(crate::zero::is_zero(&buf));
        if img.punch_supported {
            assert!(after.allocated_bytes <= full - (2 << 20));
            assert_eq!(img.reclaim_stats().zero_detect_bytes, 2 << 20);
            let ext = img.block_status(1 << 20, 2 << 20).unwrap();
            assert!(ext.zero && !ext.data);
        }
        assert_eq!(after.apparent_bytes, 4 << 20);
    }

    #[test]
    fn write_zeroes_and_discard_read_zero() {
        let (_d, path) = temp_raw(1 << 20);
        let mut img = RawImage::open(&path, false).unwrap();
        img.write_at(0, &vec![9u8; 1 << 20]).unwrap();
        img.write_zeroes(8192, 8192, false).unwrap();
        img.write_zeroes(65536, 65536, true).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        img.read_at(0, &mut buf).unwrap();
        for (i, b) in buf.iter().enumerate() {
            let zero = (8192..16384).contains(&i) || (65536..131072).contains(&i);
            assert_eq!(*b, if zero { 0 } else { 9 }, "byte {i}");
        }
        img.discard(0, 4096).unwrap();
    }
}
