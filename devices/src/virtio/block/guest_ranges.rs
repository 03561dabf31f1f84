//! Guest memory as a list of guest-address ranges: the bytes of a request's header, data or
//! status as the driver spread them over its descriptors (virtio 1.x allows any layout).
//!
//! A range is checked once, when the request is parsed: it does not wrap around the address
//! space and lies inside guest RAM. Bytes are moved with vm-memory's volatile copies; the
//! image gets them as [`IoBuf`]s ([`GuestRanges::io_bufs`]), never as Rust slices.

use block::IoBuf;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// `len` bytes of guest memory at `addr` (never empty; `addr + len` does not overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u32,
}

impl GuestRange {
    /// The range if `addr + len` does not wrap around; `None` for an empty or wrapping one.
    pub fn new(addr: GuestAddress, len: u32) -> Option<Self> {
        if len == 0 {
            return None;
        }
        addr.0.checked_add(u64::from(len))?;
        Some(GuestRange { addr, len })
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        // Cannot overflow: checked in `new` (and kept by every shrinking operation).
        self.addr.0 + u64::from(self.len)
    }

    /// Whether every byte lies in guest RAM.
    pub fn in_ram(&self, mem: &GuestMemoryMmap) -> bool {
        GuestMemoryBackend::check_range(mem, self.addr, self.len as usize)
    }
}

/// A byte stream made of guest ranges, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestRanges {
    ranges: Vec<GuestRange>,
    len: u64,
}

impl GuestRanges {
    pub fn new() -> Self {
        GuestRanges::default()
    }

    /// Appends a range.
    pub fn push(&mut self, r: GuestRange) {
        self.len += u64::from(r.len);
        self.ranges.push(r);
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ranges, in stream order.
    pub fn ranges(&self) -> &[GuestRange] {
        &self.ranges
    }

    /// Removes the first `n` bytes (all of them if fewer) and returns them as their own
    /// stream.
    pub fn split_front(&mut self, n: u64) -> GuestRanges {
        let mut head = GuestRanges::new();
        let mut taken = 0usize;
        let mut left = n;
        for r in &mut self.ranges {
            if left == 0 {
                break;
            }
            match u32::try_from(left) {
                Ok(k) if k < r.len => {
                    head.push(GuestRange {
                        addr: r.addr,
                        len: k,
                    });
                    r.addr = GuestAddress(r.addr.0 + u64::from(k));
                    r.len -= k;
                    left = 0;
                }
                // `left` >= r.len (a u32 or more): the whole range.
                _ => {
                    left -= u64::from(r.len);
                    head.push(*r);
                    taken += 1;
                }
            }
        }
        self.ranges.drain(..taken);
        self.len -= head.len;
        head
    }

    /// Removes the last byte; returns its address.
    pub fn pop_last_byte(&mut self) -> Option<GuestAddress> {
        let last = self.ranges.last_mut()?;
        let addr = GuestAddress(last.end() - 1);
        last.len -= 1;
        if last.len == 0 {
            self.ranges.pop();
        }
        self.len -= 1;
        Some(addr)
    }

    /// The pieces of the stream's bytes `[offset, offset + len)`, in order, as
    /// `(guest address, length)`. Parts beyond the stream's end are left out.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (GuestAddress, u32)> + '_ {
        let end = offset.saturating_add(len);
        let mut pos = 0u64;
        self.ranges.iter().filter_map(move |r| {
            let (start, stop) = (pos, pos + u64::from(r.len));
            pos = stop;
            let (a, b) = (start.max(offset), stop.min(end));
            // Within one range: start <= a < b <= stop = start + r.len, so b - a <= r.len.
            if a >= b {
                return None;
            }
            #[allow(clippy::cast_possible_truncation)] // b - a <= r.len, a u32
            let len = (b - a) as u32;
            Some((GuestAddress(r.addr.0 + (a - start)), len))
        })
    }

    /// Copies the stream's bytes from `offset` into `dst` (all of `dst` must be covered).
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        if offset.saturating_add(dst.len() as u64) > self.len {
            return Err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: dst.len(),
                completed: 0,
            });
        }
        let mut at = 0usize;
        for (addr, n) in self.pieces(offset, dst.len() as u64) {
            let n = n as usize;
            mem.read_slice(&mut dst[at..at + n], addr)?;
            at += n;
        }
        Ok(())
    }

    /// Copies `src` into the start of the stream (as much as fits); returns the bytes copied.
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        src: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut at = 0usize;
        for (addr, n) in self.pieces(0, src.len() as u64) {
            let n = n as usize;
            mem.write_slice(&src[at..at + n], addr)?;
            at += n;
        }
        Ok(at)
    }

    /// Whether no two ranges overlap in guest memory (a well-behaved driver's never do), so
    /// that they can be handed to the image as separate mutable buffers.
    pub fn disjoint(&self) -> bool {
        let mut spans: Vec<(u64, u64)> = self.ranges.iter().map(|r| (r.addr.0, r.end())).collect();
        spans.sort_unstable();
        spans.windows(2).all(|w| w[0].1 <= w[1].0)
    }

    /// Appends the stream's bytes `[offset, offset + len)` to `bufs` as [`IoBuf`]s over guest
    /// memory (one per RAM region each piece touches); false if some of it is not in RAM.
    ///
    /// The buffers stay valid as long as `mem`'s regions are mapped: the caller keeps a
    /// clone of the guest memory (and so its mappings) until every I/O on them has completed.
    /// The guest may change the bytes meanwhile; the image only hands them to the kernel or
    /// reads them with volatile and atomic accesses, never as Rust slices.
    pub fn io_bufs(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        len: u64,
        bufs: &mut Vec<IoBuf>,
    ) -> bool {
        self.pieces(offset, len).all(|(addr, n)| {
            for_each_host_piece(mem, addr, n as usize, |ptr, take| {
                // SAFETY: `ptr` is valid for `take` bytes of mapped, writable guest RAM for as
                // long as the regions of `mem` are mapped (see `for_each_host_piece`), which
                // the caller keeps until the I/O completes (above).
                bufs.push(unsafe { IoBuf::new(ptr, take) });
            })
        })
    }
}

/// Calls `piece` with the host address and length of each part of `len` bytes of guest
/// memory at `addr` (one per RAM region the range touches); false if any of it lies
/// outside guest RAM. `get_slice` checks that each part lies inside its mapped region, and
/// guest RAM is never unmapped, so the addresses stay valid while `mem` is borrowed.
fn for_each_host_piece(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    mut piece: impl FnMut(*mut u8, usize),
) -> bool {
    let mut at = addr;
    let mut left = len;
    while left > 0 {
        let Some(region) = mem.find_region(at) else {
            return false;
        };
        let off = at.0 - region.start_addr().0;
        // A region longer than a usize holds all of `left`.
        let take = usize::try_from(region.len() - off).map_or(left, |room| left.min(room));
        let Ok(vs) = region.get_slice(MemoryRegionAddress(off), take) else {
            return false;
        };
        piece(vs.ptr_guard_mut().as_ptr(), take);
        left -= take;
        at = GuestAddress(at.0 + take as u64);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(parts: &[(u64, u32)]) -> GuestRanges {
        let mut s = GuestRanges::new();
        for &(a, l) in parts {
            s.push(GuestRange::new(GuestAddress(a), l).unwrap());
        }
        s
    }

    #[test]
    fn ranges_reject_empty_and_wrapping() {
        assert!(GuestRange::new(GuestAddress(0x1000), 0).is_none());
        assert!(GuestRange::new(GuestAddress(u64::MAX - 10), 11).is_none());
        assert!(GuestRange::new(GuestAddress(u64::MAX - 10), 10).is_some());
    }

    #[test]
    fn split_pop_and_pieces_follow_the_stream() {
        // 10 + 4 + 6 bytes.
        let mut s = stream(&[(0x100, 10), (0x200, 4), (0x300, 6)]);
        let head = s.split_front(12);
        assert_eq!(head.ranges(), stream(&[(0x100, 10), (0x200, 2)]).ranges());
        assert_eq!(s.ranges(), stream(&[(0x202, 2), (0x300, 6)]).ranges());
        assert_eq!((head.len(), s.len()), (12, 8));
        assert_eq!(s.pop_last_byte(), Some(GuestAddress(0x305)));
        let p: Vec<_> = s.pieces(1, 4).collect();
        assert_eq!(p, [(GuestAddress(0x203), 1), (GuestAddress(0x300), 3)]);
        // Popping down to nothing.
        let mut t = stream(&[(0x10, 1)]);
        assert_eq!(t.pop_last_byte(), Some(GuestAddress(0x10)));
        assert_eq!((t.len(), t.ranges().len(), t.pop_last_byte()), (0, 0, None));
        // Splitting more than there is takes everything.
        let mut u = stream(&[(0x10, 3)]);
        assert_eq!(u.split_front(100).len(), 3);
        assert!(u.is_empty());
    }

    #[test]
    fn copies_cross_ranges_and_regions() {
        // Two regions with a hole between them; a range may span adjacent regions only.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let s = stream(&[(0xffe, 4), (0x4000, 4)]);
        assert_eq!(s.write_from(&mem, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap(), 8);
        let mut b = [0u8; 6];
        s.read_into(&mem, 1, &mut b).unwrap();
        assert_eq!(b, [2, 3, 4, 5, 6, 7]);
        assert!(s.read_into(&mem, 4, &mut [0u8; 5]).is_err(), "past the end");
        assert!(GuestRange::new(GuestAddress(0xffe), 4)
            .unwrap()
            .in_ram(&mem));
        assert!(!GuestRange::new(GuestAddress(0x1ffe), 4)
            .unwrap()
            .in_ram(&mem));
        let mut parts = Vec::new();
        assert!(s.io_bufs(&mem, 0, 8, &mut parts));
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 2, 4]);
        let mut b = [0u8; 2];
        parts[1].copy_to(&mut b);
        assert_eq!(b, [3, 4]);
        assert!(stream(&[(0x100, 8), (0x108, 8)]).disjoint());
        assert!(!stream(&[(0x100, 9), (0x108, 8)]).disjoint());
    }
}
