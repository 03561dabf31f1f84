//! The image file on the host, opened through the page cache (default) or with `O_DIRECT`
//! (`cache=none`, `qemu-img bench -t none`).
//!
//! `O_DIRECT` wants file offsets, lengths and memory aligned to the device's logical block
//! size. The drivers read and write metadata and data at arbitrary byte granularity from
//! ordinary buffers, so in direct mode every access goes through an aligned bounce buffer:
//! reads are widened to aligned blocks, and writes that do not cover whole blocks read the
//! partial head and tail blocks first (read-modify-write). The drivers are single-threaded
//! per image, so the read-modify-write cannot race with another writer of the same file.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use crate::cast::usize_from;
use crate::iobuf::IoBuf;

/// Alignment used for direct I/O: covers 512-byte and 4 KiB logical block devices.
pub const DIRECT_ALIGN: u64 = 4096;

/// An open image file.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    direct: bool,
    /// QEMU-style image lock held through this file, if taken ([`HostFile::lock`]).
    lock: Option<crate::lock::ImageLock>,
}

/// A zero-filled buffer whose start is aligned to [`DIRECT_ALIGN`]: what O_DIRECT reads and
/// writes need (a slice of a slightly larger vector, so no unsafe allocation is needed).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes at a 4 KiB-aligned address.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + usize_from(DIRECT_ALIGN)];
        let start = storage.as_ptr().align_offset(usize_from(DIRECT_ALIGN));
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Whether `buf` can go to an O_DIRECT file as it is: address and length 4 KiB-aligned.
fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize) % usize_from(DIRECT_ALIGN) == 0
        && (buf.len() as u64) % DIRECT_ALIGN == 0
}

fn align_down(v: u64) -> u64 {
    v & !(DIRECT_ALIGN - 1)
}

fn align_up(v: u64) -> io::Result<u64> {
    v.checked_add(DIRECT_ALIGN - 1)
        .map(align_down)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
}

fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
}

/// Whether `bufs` at `offset` can go to an O_DIRECT file as they are: offset, every
/// address and every length block-aligned.
pub fn direct_ready(bufs: &[IoBuf], offset: u64) -> bool {
    offset % DIRECT_ALIGN == 0
        && bufs.iter().all(|b| {
            (b.as_ptr() as usize) % usize_from(DIRECT_ALIGN) == 0
                && b.len() as u64 % DIRECT_ALIGN == 0
        })
}

/// The iovecs of `bufs`.
pub fn iovecs(bufs: &[IoBuf]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect()
}

/// How far [`HostFile::transfer_vectored`] got.
enum Transferred {
    All,
    /// It stopped at this buffer, this many bytes into it.
    Until(usize, usize),
}

impl HostFile {
    /// Opens `path` for reading (and writing unless `read_only`), with `O_DIRECT` if
    /// `direct`. A file system without direct I/O support fails here with `EINVAL`.
    /// Only regular files and block devices are images: anything else (a FIFO, a terminal,
    /// a socket, a directory) is refused, without waiting on it (see [`crate::chain`]).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let mut flags = crate::chain::OPEN_FLAGS;
        if direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let file = opts.open(path)?;
        crate::chain::check_opened_file(&file)?;
        Ok(HostFile {
            file,
            direct,
            lock: None,
        })
    }

    /// Wraps a file opened through the page cache (not locked).
    pub fn from_file(file: File) -> Self {
        HostFile {
            file,
            direct: false,
            lock: None,
        }
    }

    /// Locks the file (the image at `path`) with QEMU's lock bytes for `mode`, failing if
    /// another user's locks conflict ([`crate::lock`]). Held until the file is dropped.
    pub fn lock(&mut self, path: &Path, mode: crate::lock::LockMode) -> crate::error::Result<()> {
        self.lock = Some(crate::lock::acquire(&self.file, path, mode)?);
        Ok(())
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The underlying file, for operations that need no alignment (fstat, fallocate, lseek).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if !self.direct || (offset % DIRECT_ALIGN == 0 && is_aligned(buf)) {
            return self.file.read_at(buf, offset);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let start = align_down(offset);
        let end = align_up(end_of(offset, buf.len())?)?;
        let mut bounce = AlignedBuf::new(usize_from(end - start));
        let got = self.read_aligned(bounce.as_mut_slice(), start)?;
        let head = usize_from(offset - start);
        let n = got.saturating_sub(head).min(buf.len());
        buf[..n].copy_from_slice(&bounce.as_slice()[head..head + n]);
        Ok(n)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (an error at the end of the file).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "failed to fill whole buffer",
            ));
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct || (offset % DIRECT_ALIGN == 0 && is_aligned(buf)) {
            return self.file.write_all_at(buf, offset);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let end = end_of(offset, buf.len())?;
        let start = align_down(offset);
        let aligned_end = align_up(end)?;
        let mut bounce = AlignedBuf::new(usize_from(aligned_end - start));
        let head = usize_from(offset - start);
        let partial_head = head != 0;
        let partial_tail = aligned_end != end;
        let old_len = if partial_head || partial_tail {
            Some(self.file.metadata()?.len())
        } else {
            None
        };
        // Read-modify-write of the partial blocks (zeros beyond the end of the file).
        let block = usize_from(DIRECT_ALIGN);
        if partial_head {
            self.read_aligned(&mut bounce.as_mut_slice()[..block], start)?;
        }
        if partial_tail && (aligned_end - DIRECT_ALIGN > start || !partial_head) {
            let tail_at = aligned_end - DIRECT_ALIGN;
            let from = usize_from(tail_at - start);
            self.read_aligned(&mut bounce.as_mut_slice()[from..from + block], tail_at)?;
        }
        bounce.as_mut_slice()[head..head + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(bounce.as_slice(), start)?;
        // A widened write past the old end must not leave the file longer than intended.
        if let Some(old_len) = old_len {
            if aligned_end > old_len {
                self.file.set_len(old_len.max(end))?;
            }
        }
        Ok(())
    }

    /// Writes the concatenation of `bufs` at `offset` straight from the buffers (`pwritev`,
    /// no copy). In direct mode, buffers or an offset that are not block-aligned are gathered
    /// into an aligned bounce buffer first.
    pub fn write_vectored_all_at(&self, bufs: &[IoBuf], offset: u64) -> io::Result<()> {
        if self.direct && !direct_ready(bufs, offset) {
            let total = usize_from(crate::iobuf::total_len(bufs));
            let mut aligned = AlignedBuf::new(total);
            crate::iobuf::copy_out(bufs, 0, aligned.as_mut_slice());
            return self.write_all_at(aligned.as_slice(), offset);
        }
        let iov = iovecs(bufs);
        // SAFETY: every iovec covers one IoBuf, valid for the whole call (IoBuf::new);
        // pwritev only reads them.
        match unsafe { self.transfer_vectored(&iov, offset, libc::pwritev) }? {
            Transferred::All => Ok(()),
            Transferred::Until(..) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev stopped short",
            )),
        }
    }

    /// Reads the bytes at `offset` straight into `bufs`, one after another (one `preadv` per
    /// up to 1024 buffers); the part past the end of the file reads as zeros.
    /// Under `O_DIRECT`, buffers or an offset that are not block-aligned are read through
    /// an aligned bounce buffer.
    pub fn read_vectored_or_zeros(&self, bufs: &[IoBuf], offset: u64) -> io::Result<()> {
        if self.direct && !direct_ready(bufs, offset) {
            let total = usize_from(crate::iobuf::total_len(bufs));
            let mut bounce = vec![0u8; total];
            self.read_or_zeros(&mut bounce, offset)?;
            crate::iobuf::copy_into(bufs, 0, &bounce);
            return Ok(());
        }
        let iov = iovecs(bufs);
        // SAFETY: every iovec covers one IoBuf, valid and writable for the whole call
        // (IoBuf::new); preadv writes at most that many bytes to each.
        let got = unsafe { self.transfer_vectored(&iov, offset, libc::preadv) }?;
        if let Transferred::Until(idx, skip) = got {
            // The end of the file: the rest reads as zeros.
            bufs[idx].sub(skip, usize::MAX).fill_zero();
            for b in &bufs[idx + 1..] {
                b.fill_zero();
            }
        }
        Ok(())
    }

    /// Runs `op` (`preadv` or `pwritev`) over the buffers `iov` from file offset `offset`,
    /// at most IOV_MAX (1024) of them per call, resuming mid-buffer after a short transfer.
    /// Stops early where `op` transfers nothing (the end of the file, for reads) or, under
    /// `O_DIRECT`, where a transfer ends off a block boundary (only the end of the file
    /// does that): `Until(buffer, byte)`.
    ///
    /// # Safety
    /// Every iovec must describe memory that stays valid, and (for reads) unaliased, for
    /// the whole call.
    unsafe fn transfer_vectored(
        &self,
        iov: &[libc::iovec],
        offset: u64,
        op: unsafe extern "C" fn(
            libc::c_int,
            *const libc::iovec,
            libc::c_int,
            libc::off_t,
        ) -> libc::ssize_t,
    ) -> io::Result<Transferred> {
        const IOV_MAX: usize = 1024;
        let mut idx = 0;
        let mut skip = 0usize;
        let mut pos = offset;
        let mut call: Vec<libc::iovec> = Vec::with_capacity(iov.len().min(IOV_MAX));
        while idx < iov.len() {
            if iov[idx].iov_len == skip {
                idx += 1;
                skip = 0;
                continue;
            }
            call.clear();
            for (k, v) in iov[idx..].iter().take(IOV_MAX).enumerate() {
                let from = if k == 0 { skip } else { 0 };
                call.push(libc::iovec {
                    // Stays inside the buffer: `from` < its length.
                    iov_base: v.iov_base.wrapping_byte_add(from),
                    iov_len: v.iov_len - from,
                });
            }
            let at = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // At most IOV_MAX.
            let iovecs = libc::c_int::try_from(call.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the caller guarantees the buffers; `call` holds their remaining parts.
            let n = unsafe { op(self.file.as_raw_fd(), call.as_ptr(), iovecs, at) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(Transferred::Until(idx, skip));
            }
            // `n` is positive here.
            let mut n = n.unsigned_abs();
            pos += n as u64;
            while n > 0 {
                let left = iov[idx].iov_len - skip;
                if n >= left {
                    n -= left;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
            if self.direct && pos % DIRECT_ALIGN != 0 && idx < iov.len() {
                return Ok(Transferred::Until(idx, skip));
            }
        }
        Ok(Transferred::All)
    }

    /// Reads aligned blocks into an aligned buffer until it is full or the file ends; the
    /// rest of the buffer is zeroed. Returns the bytes read.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }

    /// Reads `buf.len()` bytes at `offset`; the part past the end of the file reads as zeros.
    pub fn read_or_zeros(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            match self.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Releases the host blocks of `len` bytes at `offset`, keeping the file's size
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the range then reads as zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Allocates host blocks for `len` bytes at `offset`, extending the file if needed
    /// (`fallocate` mode 0); the new range reads as zeros.
    pub fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(0, offset, len)
    }

    /// Makes `len` bytes at `offset` read as zeros without releasing their blocks
    /// (`fallocate(ZERO_RANGE)`).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
    }

    /// The first offset at or after `offset` that holds data (`lseek(SEEK_DATA)`); `None`
    /// when there is none (ENXIO).
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(offset, libc::SEEK_DATA)
    }

    /// The first offset at or after `offset` that starts a hole (`lseek(SEEK_HOLE)`; the end
    /// of the file counts as one); `None` past the end (ENXIO).
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(offset, libc::SEEK_HOLE)
    }

    /// `fallocate(2)` on the file, retried on EINTR.
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate only operates on the file descriptor, which `self` keeps open
            // for the duration of the call; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `lseek(2)` with `SEEK_DATA` / `SEEK_HOLE`; `None` when there is no such position
    /// (ENXIO). Positioned I/O (pread/pwrite) does not use the file position it moves.
    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only operates on the descriptor kept open by `self`; no memory is
        // passed.
        let ret = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        // lseek returned a non-negative offset.
        u64::try_from(ret)
            .map(Some)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// `fdatasync`.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// `fsync`.
    pub fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Truncates or extends the file.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// `fstat`.
    pub fn metadata(&self) -> io::Result<Metadata> {
        self.file.metadata()
    }
}

/// Whether an `fallocate` error means the file system does not support the operation.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl AsRawFd for HostFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct_file(dir: &Path) -> Option<HostFile> {
        let path = dir.join("direct.img");
        std::fs::write(&path, b"").ok()?;
        match HostFile::open(&path, false, true) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("skipping: O_DIRECT not supported in {}: {e}", dir.display());
                None
            }
        }
    }

    #[test]
    fn unaligned_direct_io_matches_a_buffered_model() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let Some(f) = direct_file(dir) else { return };
        let buffered = HostFile::open(&dir.join("direct.img"), true, false).unwrap();
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Every third write and read is fully aligned (address, length, offset): those go to
        // the file without a bounce buffer; vectored writes gather or go straight through.
        let mut aligned_store = vec![0u8; 16384 + 4096];
        let a0 = aligned_store.as_ptr().align_offset(4096);
        for i in 0..300 {
            let byte = u8::try_from(i % 251).unwrap() + 1;
            let (off, len) = if i % 3 == 0 {
                ((next() % 10) * 4096, ((next() % 4) as usize + 1) * 4096)
            } else {
                (next() % 40_000, (next() % 9000) as usize + 1)
            };
            let data = vec![byte; len];
            if i % 3 == 0 {
                let buf = &mut aligned_store[a0..a0 + len];
                buf.fill(byte);
                if i % 2 == 0 {
                    f.write_all_at(buf, off).unwrap();
                } else {
                    let (x, y) = buf.split_at(4096);
                    // SAFETY: `x` and `y` outlive the call.
                    let parts = unsafe { [IoBuf::from_slice(x), IoBuf::from_slice(y)] };
                    f.write_vectored_all_at(&parts, off).unwrap();
                }
            } else if i % 3 == 1 {
                let (x, y) = data.split_at(len / 2);
                // SAFETY: `x` and `y` outlive the call.
                let parts = unsafe {
                    [
                        IoBuf::from_slice(x),
                        IoBuf::from_slice(&[]),
                        IoBuf::from_slice(y),
                    ]
                };
                f.write_vectored_all_at(&parts, off).unwrap();
            } else {
                f.write_all_at(&data, off).unwrap();
            }
            let end = usize_from(off) + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[usize_from(off)..end].copy_from_slice(&data);
            assert_eq!(
                f.metadata().unwrap().len(),
                model.len() as u64,
                "length after write {i}"
            );
            let (roff, rlen) = if i % 3 == 2 {
                ((next() % 12) * 4096, ((next() % 4) as usize + 1) * 4096)
            } else {
                (next() % 45_000, (next() % 9000) as usize + 1)
            };
            let mut got = vec![0xeeu8; rlen];
            let n = if i % 3 == 2 {
                let buf = &mut aligned_store[a0..a0 + rlen];
                let n = f.read_at(buf, roff).unwrap();
                got[..n].copy_from_slice(&buf[..n]);
                n
            } else {
                f.read_at(&mut got, roff).unwrap()
            };
            let want: &[u8] = model.get(usize_from(roff)..).unwrap_or(&[]);
            let want = &want[..want.len().min(rlen)];
            assert_eq!(n, want.len(), "read length {i}");
            assert_eq!(&got[..n], want, "read data {i}");
            // The same range read vectored (aligned pieces every third time), through this
            // O_DIRECT handle and a buffered one: past the end of the file it reads zeros.
            let mut want_full = want.to_vec();
            want_full.resize(rlen, 0);
            for file in [&f, &buffered] {
                let mut store = vec![0xeeu8; rlen];
                let aligned_buf;
                let bytes: &mut [u8] = if i % 3 == 2 {
                    aligned_buf = &mut aligned_store[a0..a0 + rlen];
                    aligned_buf.fill(0xee);
                    aligned_buf
                } else {
                    &mut store
                };
                let cut = if i % 3 == 2 { 4096 } else { rlen / 3 };
                let (x, y) = bytes.split_at_mut(cut);
                // SAFETY: `x` and `y` outlive the call and are only touched through these.
                let parts = unsafe {
                    [
                        IoBuf::from_mut_slice(x),
                        IoBuf::from_mut_slice(&mut []),
                        IoBuf::from_mut_slice(y),
                    ]
                };
                file.read_vectored_or_zeros(&parts, roff).unwrap();
                assert_eq!(&bytes[..], &want_full[..], "vectored read {i}");
            }
        }
    }
}
