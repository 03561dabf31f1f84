//! Guest RAM in a snapshot: one file, the regions one after another. Pages of zeros are left
//! as holes (a guest that touched little makes a small file). A clone maps the file
//! copy-on-write (`MAP_PRIVATE`): pages it only reads stay shared in the page cache with every
//! other clone of the same snapshot; a page it writes becomes its own.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::error::{Result, VmmError};

const PAGE: usize = 4096;
/// Bytes copied out of guest memory at a time.
const CHUNK: usize = 1 << 20;

/// Writes every region of `mem` into `file` (which must be empty), zero pages as holes.
pub fn write(mem: &GuestMemoryMmap, file: &File) -> io::Result<u64> {
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = usize::try_from(len - at).map_or(CHUNK, |left| left.min(CHUNK));
            // A volatile copy: the vCPUs are parked, but guest memory is never a Rust slice.
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(at))
                .map_err(io::Error::other)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, offset + at + (i * PAGE) as u64)?;
                }
            }
            at += n as u64;
        }
        offset += len;
    }
    // The file's size covers the holes at the end too.
    file.set_len(offset)?;
    Ok(offset)
}

/// Maps the file at `path` copy-on-write as guest memory of `ranges` (guest address,
/// length), laid out as [`write`] writes it.
pub fn map(path: &Path, ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap> {
    let file_err = |source| VmmError::SnapshotMemoryFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let total = ranges
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.1 as u64));
    if total != Some(size) {
        return Err(VmmError::SnapshotMemorySize {
            path: path.to_path_buf(),
            size,
            ram: total.unwrap_or(u64::MAX),
        });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset: libc::off_t = 0;
    for &(addr, len) in ranges {
        // SAFETY: a new private mapping of `len` bytes of our open file at `offset` (a
        // multiple of the page size: regions are whole MiBs); no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VmmError::MemoryMmap {
                addr: addr.0,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `ptr..ptr+len` is the live private mapping made above, never unmapped (guest
        // RAM lives as long as the process), used for nothing else.
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(ptr as *mut u8) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| VmmError::MemoryRegion {
                addr: addr.0,
                source,
            })?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or(VmmError::MemoryRegionOverflow { addr: addr.0, len })?,
        );
        offset = libc::off_t::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .ok_or(VmmError::MemoryRegionOverflow { addr: addr.0, len })?;
    }
    GuestMemoryMmap::from_regions(regions).map_err(VmmError::MemoryRegions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_memory_maps_back_with_holes_and_private_writes() {
        let mem = crate::vstate::memory::create(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress((1 << 32) + (2 << 20) - 1))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("thinvm-memfile-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        assert_eq!(write(&mem, &f).unwrap(), 4 << 20);
        use std::os::unix::fs::MetadataExt;
        // Two non-zero pages: the rest are holes.
        assert!(f.metadata().unwrap().blocks() * 512 <= 64 << 10);
        let ranges = [(GuestAddress(0), 2 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let a = map(&dir, &ranges).unwrap();
        let b = map(&dir, &ranges).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            a.read_obj::<u8>(GuestAddress((1 << 32) + (2 << 20) - 1))
                .unwrap(),
            0x55
        );
        // A clone's write stays its own, and never reaches the file.
        a.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        let mut four = [0u8; 4];
        f.read_exact_at(&mut four, 0x5000).unwrap();
        assert_eq!(u32::from_le_bytes(four), 0x1122_3344);
        assert!(matches!(
            map(&dir, &ranges[..1]),
            Err(VmmError::SnapshotMemorySize { size, ram, .. }) if size == 4 << 20 && ram == 2 << 20
        ));
        let _ = std::fs::remove_file(&dir);
    }
}
