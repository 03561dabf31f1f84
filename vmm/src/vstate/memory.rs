//! Guest RAM: anonymous mappings aligned to 2 MiB and advised for transparent huge pages.
//!
//! KVM maps guest memory with 2 MiB (nested) page-table entries only where a 2 MiB-aligned
//! guest range is backed by a 2 MiB-aligned host range, so the host mapping must be aligned
//! like the guest addresses (plain `mmap` only guarantees 4 KiB). With huge pages the guest
//! takes ~500× fewer nested page faults while it first touches its memory, which matters most
//! under nested virtualization, where each such exit is expensive. QEMU aligns and advises its
//! RAM the same way.

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::error::{Result, VmmError};

/// Alignment of guest RAM in the host's address space.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of anonymous memory at a `HUGE_PAGE`-aligned address, advised for huge
/// pages. The mapping is never unmapped: guest RAM lives as long as the process (one VM per
/// `thinvm run`), and unmapping it while a device thread might still hold a reference to the
/// guest memory would be unsound.
fn map_aligned(len: usize) -> io::Result<*mut u8> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choice; no
    // existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the mapping made above and outside [aligned, aligned+len);
    // nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advising our own mapping; a refusal (no THP support) is harmless.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(aligned as *mut u8)
}

/// Guest memory for `ranges` (guest address, length), each range in its own aligned mapping.
pub fn create(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let ptr = map_aligned(len).map_err(|source| VmmError::MemoryMmap {
            addr: addr.0,
            len,
            source,
        })?;
        // SAFETY: `ptr..ptr+len` is a live anonymous read-write mapping made above, never
        // unmapped, and used for nothing else.
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(ptr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| VmmError::MemoryRegion {
                addr: addr.0,
                source,
            })?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or(VmmError::MemoryRegionOverflow { addr: addr.0, len })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(VmmError::MemoryRegions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn regions_are_huge_page_aligned_and_usable() {
        let mem = create(&[
            (GuestAddress(0), 6 << 20),
            (GuestAddress(1 << 32), (2 << 20) + 4096),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0);
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress((6 << 20) - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        mem.write_obj(7u8, GuestAddress((1 << 32) + (2 << 20) + 4095))
            .unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(6 << 20)).is_err());
        assert!(mem
            .read_obj::<u8>(GuestAddress((1 << 32) + (2 << 20) + 4096))
            .is_err());
    }
}
