//! The buffers of an I/O request: memory the image reads into or writes from that the crate
//! never turns into a Rust slice.
//!
//! A request's data lives in memory the caller owns: guest RAM for virtio-blk (which the
//! guest's vCPUs may change at any time, so a `&[u8]` over it would be a data race by Rust's
//! rules), a test's or the image tool's own buffers otherwise. An [`IoBuf`] is such a buffer
//! as an address and a length with a validity contract ([`IoBuf::new`]); the crate hands it to
//! the kernel (`preadv`/`pwritev`, io_uring) and otherwise touches it only through vm-memory's
//! volatile copies and atomic loads (zero detection), never through a reference.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::cast::usize_from;
use vm_memory::VolatileSlice;

/// `len` bytes of memory at `ptr` (see [`IoBuf::new`] for what the creator guarantees).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoBuf is an address and a length; the memory it names is valid, and may be
// accessed from any thread, for as long as its creator promised (`IoBuf::new`). The crate
// only accesses it through the kernel, volatile copies and atomic loads, which are sound
// whatever other threads do to the same bytes.
unsafe impl Send for IoBuf {}
// SAFETY: as for Send: `&IoBuf` gives no access beyond what a copy of it gives.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped memory that stays mapped (and, if the buffer is read
    /// into, writable) until every I/O the buffer is handed to has completed: for the
    /// synchronous [`crate::disk::DiskImage`] methods until they return, for a
    /// [`crate::pipeline::Pipeline`] until the request's completion has been reaped. Other
    /// threads (a guest's vCPUs) may read and write the memory meanwhile; the caller holds
    /// no Rust reference to it while the crate writes into it.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBuf { ptr, len }
    }

    /// The bytes of `s`, to be written somewhere (the crate only reads them).
    ///
    /// # Safety
    /// The buffer borrows nothing: `s` must stay alive, and unchanged by the caller's own
    /// Rust references, for as long as the buffer (or a copy of it) is used, as for
    /// [`IoBuf::new`].
    pub unsafe fn from_slice(s: &[u8]) -> Self {
        IoBuf {
            ptr: s.as_ptr() as *mut u8,
            len: s.len(),
        }
    }

    /// The bytes of `s`, to be read into.
    ///
    /// # Safety
    /// As for [`IoBuf::from_slice`]; and the caller holds no other reference to `s` while
    /// the buffer is read into.
    pub unsafe fn from_mut_slice(s: &mut [u8]) -> Self {
        IoBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes `from..from + len` of the buffer (clamped to its end).
    pub fn sub(&self, from: usize, len: usize) -> IoBuf {
        let from = from.min(self.len);
        IoBuf {
            // Stays inside the buffer (or one past its end when `from == len`).
            ptr: self.ptr.wrapping_add(from),
            len: len.min(self.len - from),
        }
    }

    fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: the creator guarantees the memory is mapped for the buffer's use
        // (`IoBuf::new`); VolatileSlice only does volatile accesses.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }

    /// Copies `src` into the start of the buffer (at most `len` bytes).
    pub fn copy_from(&self, src: &[u8]) {
        self.volatile().copy_from(src);
    }

    /// Copies the start of the buffer into `dst` (at most `len` bytes).
    pub fn copy_to(&self, dst: &mut [u8]) {
        self.volatile().copy_to(dst);
    }

    /// Sets every byte to zero.
    pub fn fill_zero(&self) {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut at = 0;
        while at < self.len {
            let n = (self.len - at).min(ZEROS.len());
            self.sub(at, n).copy_from(&ZEROS[..n]);
            at += n;
        }
    }

    /// Whether every byte is zero, read with atomic loads (the memory may change meanwhile:
    /// the answer is then about some mix of old and new bytes, all a racing writer can expect).
    pub fn is_zero(&self) -> bool {
        let p = self.ptr;
        let head = (p.align_offset(8)).min(self.len);
        let words = (self.len - head) / 8;
        let byte = |i: usize| {
            // SAFETY: `i < len`: inside the buffer, valid for reads (IoBuf::new); AtomicU8 has
            // the alignment of u8.
            unsafe { (*(p.add(i) as *const AtomicU8)).load(Ordering::Relaxed) }
        };
        if (0..head).any(|i| byte(i) != 0) {
            return false;
        }
        // SAFETY: `p + head` is 8-aligned and `words` words from there lie inside the buffer.
        let w = unsafe { p.add(head) } as *const AtomicU64;
        let mut i = 0;
        while i + 8 <= words {
            let mut acc = 0u64;
            for k in 0..8 {
                // SAFETY: word `i + k` < `words`: inside the buffer and aligned (above).
                acc |= unsafe { (*w.add(i + k)).load(Ordering::Relaxed) };
            }
            if acc != 0 {
                return false;
            }
            i += 8;
        }
        while i < words {
            // SAFETY: as above.
            if unsafe { (*w.add(i)).load(Ordering::Relaxed) } != 0 {
                return false;
            }
            i += 1;
        }
        (head + words * 8..self.len).all(|i| byte(i) == 0)
    }
}

/// Total length of `bufs`.
pub fn total_len(bufs: &[IoBuf]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// The pieces of the concatenation of `bufs` that make up its bytes `range`.
pub fn pieces(bufs: &[IoBuf], range: std::ops::Range<u64>) -> impl Iterator<Item = IoBuf> + '_ {
    let mut at = 0u64;
    bufs.iter().filter_map(move |b| {
        let (s, e) = (at, at + b.len() as u64);
        at = e;
        if e <= range.start || s >= range.end || b.is_empty() {
            return None;
        }
        let from = usize_from(range.start.saturating_sub(s));
        let to = usize_from(range.end.min(e) - s);
        Some(b.sub(from, to - from))
    })
}

/// Appends the pieces of `bufs` covering `range` to `out`.
pub fn push_pieces(out: &mut Vec<IoBuf>, bufs: &[IoBuf], range: std::ops::Range<u64>) {
    out.extend(pieces(bufs, range));
}

/// Whether the bytes `range` of the concatenation of `bufs` are all zero.
pub fn is_zero_range(bufs: &[IoBuf], range: std::ops::Range<u64>) -> bool {
    pieces(bufs, range).all(|p| p.is_zero())
}

/// Fills the bytes `range` of the concatenation of `bufs` with zeros.
pub fn zero_range(bufs: &[IoBuf], range: std::ops::Range<u64>) {
    pieces(bufs, range).for_each(|p| p.fill_zero());
}

/// Copies `src` into the bytes of the concatenation of `bufs` starting at `at`.
pub fn copy_into(bufs: &[IoBuf], at: u64, src: &[u8]) {
    let mut done = 0usize;
    for p in pieces(bufs, at..at + src.len() as u64) {
        p.copy_from(&src[done..done + p.len()]);
        done += p.len();
    }
}

/// Copies the bytes `at..at + dst.len()` of the concatenation of `bufs` into `dst`.
pub fn copy_out(bufs: &[IoBuf], at: u64, dst: &mut [u8]) {
    let mut done = 0usize;
    for p in pieces(bufs, at..at + dst.len() as u64) {
        let n = p.len();
        p.copy_to(&mut dst[done..done + n]);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_and_copies_follow_the_bytes() {
        let mut mem = vec![0u8; 1000];
        // SAFETY: `mem` outlives `b` and is only touched through it.
        let b = unsafe { IoBuf::from_mut_slice(&mut mem) };
        assert!(b.is_zero());
        for i in [0usize, 3, 7, 8, 63, 64, 500, 999] {
            b.sub(i, 1).copy_from(&[1]);
            assert!(!b.is_zero(), "byte {i}");
            assert!(!b.sub(i.saturating_sub(3), 9).is_zero(), "window at {i}");
            b.fill_zero();
        }
        let parts = [b.sub(0, 10), b.sub(10, 0), b.sub(500, 20)];
        copy_into(&parts, 5, &[7u8; 10]);
        let mut back = [0u8; 30];
        copy_out(&parts, 0, &mut back);
        assert_eq!(&back[..5], &[0; 5]);
        assert_eq!(&back[5..15], &[7; 10]);
        assert!(!is_zero_range(&parts, 0..30));
        assert!(is_zero_range(&parts, 15..30));
        zero_range(&parts, 0..30);
        assert!(b.is_zero());
        assert_eq!(pieces(&parts, 8..12).map(|p| p.len()).sum::<usize>(), 4);
        assert_eq!(total_len(&parts), 30);
    }
}
