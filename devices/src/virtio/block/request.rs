//! virtio-blk requests: parsing a descriptor chain (with every check a hostile guest needs)
//! and executing it against the disk image.

use std::time::Instant;

use block::DiskImage;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::stats::BlockStats;

pub const SECTOR: u64 = 512;
/// Header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u32 = 16;
/// Discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
const SEGMENT_LEN: u32 = 16;
/// Bytes moved through the bounce buffer per image call.
const CHUNK: usize = 8 << 20;
/// Flag bit of write-zeroes segments.
const FLAG_UNMAP: u32 = 1;

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
    /// `discard=unmap` (otherwise discards are ignored and write-zeroes never unmap).
    pub discard_unmap: bool,
}

/// A request ready to execute.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Data descriptors (address, length, device-writable).
    pub data: Vec<(GuestAddress, u32, bool)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total length of the data descriptors.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|d| u64::from(d.1)).sum()
    }
}

/// Why a chain cannot be answered normally.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// No usable status descriptor: the chain is returned without a status.
    Drop(&'static str),
    /// Answer with this status.
    Status(u8, String),
}

/// Logs at most a few lines per second, so a hostile guest cannot flood the host's logs.
pub fn ratelimited_warn(msg: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = START.get_or_init(Instant::now).elapsed().as_secs();
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        let suppressed = COUNT.swap(0, Ordering::Relaxed).saturating_sub(5);
        if suppressed > 0 {
            tracing::warn!("virtio-blk: {suppressed} similar messages suppressed");
        }
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < 5 {
        tracing::warn!("virtio-blk: {msg}");
    }
}

/// Parses a descriptor chain (already collected, at most queue-size descriptors; `truncated`
/// says the chain went on beyond that: a loop or an over-long chain).
pub fn parse(
    descs: &[Descriptor],
    truncated: bool,
    mem: &GuestMemoryMmap,
) -> Result<Request, Invalid> {
    if truncated {
        return Err(Invalid::Drop(
            "descriptor chain loops or exceeds the queue size",
        ));
    }
    let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
        return Err(Invalid::Drop("empty descriptor chain"));
    };
    if descs.len() < 2 {
        return Err(Invalid::Drop("chain has no status descriptor"));
    }
    if !last.is_write_only() || last.len() < 1 {
        return Err(Invalid::Drop(
            "status descriptor missing, read-only or empty",
        ));
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(Invalid::Drop("status descriptor wraps around"))?;
    if mem.check_address(status).is_none() {
        return Err(Invalid::Drop("status descriptor outside guest memory"));
    }
    let fail = |m: String| Invalid::Status(VIRTIO_BLK_S_IOERR as u8, m);
    if first.is_write_only() {
        return Err(fail("request header is device-writable".into()));
    }
    if first.len() < HEADER_LEN {
        return Err(fail(format!(
            "request header too short ({} bytes)",
            first.len()
        )));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut hdr, first.addr())
        .map_err(|_| fail("request header outside guest memory".into()))?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector);
    let mut data = Vec::with_capacity(descs.len() - 2);
    for d in &descs[1..descs.len() - 1] {
        if d.len() > 0 && !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(fail(format!(
                "data descriptor {:#x}+{:#x} outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
        data.push((d.addr(), d.len(), d.is_write_only()));
    }
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// What executing a request produced.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub status: u8,
    /// Bytes written into device-writable buffers (data, not counting the status byte).
    pub written: u32,
}

fn ok(written: u32) -> Outcome {
    Outcome {
        status: VIRTIO_BLK_S_OK as u8,
        written,
    }
}

fn ioerr(msg: String) -> Outcome {
    ratelimited_warn(&msg);
    Outcome {
        status: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
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
        let take = left.min((region.len() - off) as usize);
        let Ok(vs) = region.get_slice(MemoryRegionAddress(off), take) else {
            return false;
        };
        piece(vs.ptr_guard_mut().as_ptr(), take);
        left -= take;
        at = GuestAddress(at.0 + take as u64);
    }
    true
}

/// Appends `len` bytes of guest memory at `addr` to `parts` as writable byte slices (one per
/// RAM region the range touches); false if any of it lies outside guest RAM.
///
/// # Safety
/// The range must not overlap any other slice of guest memory the caller holds while the
/// returned slices live.
unsafe fn guest_parts_mut<'m>(
    mem: &'m GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    parts: &mut Vec<&'m mut [u8]>,
) -> bool {
    for_each_host_piece(mem, addr, len, |ptr, take| {
        // SAFETY: `ptr` is valid for `take` bytes of mapped, writable guest RAM while `mem`
        // is borrowed (see `for_each_host_piece`), and the caller guarantees no other slice
        // of ours overlaps it. The guest itself may touch the bytes meanwhile (a driver
        // reusing a buffer it handed to the device): they are only written by the image
        // (pread, fill, copy), and the guest then sees some mix of its own and the disk's
        // bytes, all it can expect from that.
        parts.push(unsafe { std::slice::from_raw_parts_mut(ptr, take) });
    })
}

/// Appends `len` bytes of guest memory at `addr` to `parts` as byte slices (one per RAM
/// region the range touches); false if any of it lies outside guest RAM.
fn guest_parts<'m>(
    mem: &'m GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    parts: &mut Vec<&'m [u8]>,
) -> bool {
    for_each_host_piece(mem, addr, len, |ptr, take| {
        // SAFETY: `ptr` is valid for `take` bytes of mapped guest RAM while `mem` is
        // borrowed (see `for_each_host_piece`). The guest may change the bytes while they
        // are being written (a driver modifying a buffer it handed to the device): the
        // slice is only read (zero detection, pwritev), and the disk then holds some mix of
        // old and new bytes, all the guest can expect from that.
        parts.push(unsafe { std::slice::from_raw_parts(ptr as *const u8, take) });
    })
}

/// Whether the request's data segments are pairwise disjoint in guest memory (a well-behaved
/// driver's always are), so that they can be handed to the image as separate buffers.
fn segments_disjoint(data: &[(GuestAddress, u32, bool)]) -> bool {
    let mut spans: Vec<(u64, u64)> = data
        .iter()
        .map(|&(a, l, _)| (a.0, a.0.saturating_add(u64::from(l))))
        .collect();
    spans.sort_unstable();
    spans.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// A read straight into the guest's segments (no copy in between): the image gets the
/// request up to CHUNK at a time as a list of slices of guest memory. Returns the bytes
/// written into guest memory.
fn read_into_guest(
    req: &Request,
    offset: u64,
    image: &mut dyn DiskImage,
    mem: &GuestMemoryMmap,
    scratch: &mut Vec<u8>,
) -> Result<u32, Outcome> {
    let mut pos = offset;
    let mut parts: Vec<&mut [u8]> = Vec::with_capacity(req.data.len());
    let mut filled = 0usize;
    let mut written: u32 = 0;
    for &(addr, len, _) in &req.data {
        let mut done = 0usize;
        while done < len as usize {
            let n = (len as usize - done).min(CHUNK - filled);
            let Some(a) = addr.checked_add(done as u64) else {
                return Err(ioerr("read buffer wraps around".into()));
            };
            // SAFETY: `segments_disjoint` checked that no two segments of this request
            // overlap, and each segment is split into consecutive, non-overlapping parts, so
            // no two slices in `parts` alias; this thread holds no other guest-memory slice.
            let inside = unsafe { guest_parts_mut(mem, a, n, &mut parts) };
            if !inside {
                return Err(ioerr("read buffer outside guest memory".into()));
            }
            done += n;
            filled += n;
            if filled == CHUNK {
                if let Err(e) = image.read_vectored_at(pos, &mut parts, scratch) {
                    return Err(ioerr(format!("read at {pos}: {e}")));
                }
                pos += filled as u64;
                written = written.saturating_add(filled as u32);
                filled = 0;
                parts.clear();
            }
        }
    }
    if filled > 0 {
        if let Err(e) = image.read_vectored_at(pos, &mut parts, scratch) {
            return Err(ioerr(format!("read at {pos}: {e}")));
        }
        written = written.saturating_add(filled as u32);
    }
    Ok(written)
}

/// A read through the bounce buffer, one image read per CHUNK of the request scattered into
/// the guest's segments: for requests whose segments overlap each other in guest memory.
/// Returns the bytes written into guest memory.
fn read_through_bounce(
    req: &Request,
    offset: u64,
    image: &mut dyn DiskImage,
    mem: &GuestMemoryMmap,
    bounce: &mut Vec<u8>,
) -> Result<u32, Outcome> {
    let total = req.data_len();
    // One image read per CHUNK of the request, scattered into the guest's segments
    // (the guest's page cache splits a request into 4 KiB pages: one lookup and one
    // pread per page would cost far more than the copy).
    let mut segs = req.data.iter().map(|&(addr, len, _)| (addr, len as usize));
    let mut cur: Option<(GuestAddress, usize)> = None;
    let mut pos = offset;
    let mut left = total;
    let mut written: u32 = 0;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        let buf = sized(bounce, n);
        if let Err(e) = image.read_at(pos, buf) {
            return Err(ioerr(format!("read at {pos}: {e}")));
        }
        let mut done = 0;
        while done < n {
            let (addr, len) = match cur.take() {
                Some(c) if c.1 > 0 => c,
                _ => match segs.next() {
                    Some(c) => c,
                    None => break,
                },
            };
            let m = len.min(n - done);
            if mem.write_slice(&buf[done..done + m], addr).is_err() {
                return Err(ioerr("read buffer outside guest memory".into()));
            }
            done += m;
            written = written.saturating_add(m as u32);
            if m < len {
                let Some(next) = addr.checked_add(m as u64) else {
                    return Err(ioerr("read buffer wraps around".into()));
                };
                cur = Some((next, len - m));
            }
        }
        pos += n as u64;
        left -= n as u64;
    }
    Ok(written)
}

/// The first `n` bytes of `bounce`, grown (never shrunk, so never re-zeroed) as needed.
fn sized(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
}

/// Checks a read (`device_writes`) or write request of `total` data bytes: direction of
/// every data descriptor, whole sectors, within the capacity. Returns its byte offset.
fn rw_offset(
    req: &Request,
    total: u64,
    limits: &Limits,
    device_writes: bool,
) -> Result<u64, String> {
    if req.data.iter().any(|d| d.2 != device_writes) {
        return Err("data descriptor has the wrong direction".into());
    }
    if total % SECTOR != 0 {
        return Err(format!("data length {total} is not a multiple of 512"));
    }
    let end = req
        .sector
        .checked_add(total / SECTOR)
        .ok_or_else(|| "sector overflow".to_string())?;
    if end > limits.capacity_sectors {
        return Err(format!(
            "sectors {}..{end} beyond the capacity ({} sectors)",
            req.sector, limits.capacity_sectors
        ));
    }
    Ok(req.sector * SECTOR)
}

/// A write request that can join a batch: its byte offset and its data as slices of guest
/// memory.
pub struct BatchWrite<'m> {
    pub offset: u64,
    pub parts: Vec<&'m [u8]>,
}

impl BatchWrite<'_> {
    /// Bytes to write.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }
}

/// Whether `req` is a valid write of at most [`CHUNK`] bytes, which can run in a batch
/// ([`execute_write_batch`]); anything else (other types, larger or bad writes, a
/// read-only disk) goes through [`execute`] alone, which answers it.
pub fn batch_write<'m>(
    req: &Request,
    mem: &'m GuestMemoryMmap,
    limits: &Limits,
) -> Option<BatchWrite<'m>> {
    if req.kind != VIRTIO_BLK_T_OUT || limits.read_only {
        return None;
    }
    let total = req.data_len();
    if total > CHUNK as u64 {
        return None;
    }
    let offset = rw_offset(req, total, limits, false).ok()?;
    let mut parts = Vec::with_capacity(req.data.len());
    for &(addr, len, _) in &req.data {
        if !guest_parts(mem, addr, len as usize, &mut parts) {
            return None;
        }
    }
    Some(BatchWrite { offset, parts })
}

/// Executes several writes at once ([`DiskImage::write_many`]: metadata in order, data in
/// parallel). One result for all: on failure every write of the batch reports an error.
pub fn execute_write_batch(
    writes: &[BatchWrite<'_>],
    image: &mut dyn DiskImage,
    stats: &BlockStats,
    bounce: &mut Vec<u8>,
) -> Outcome {
    let reqs: Vec<(u64, &[&[u8]])> = writes.iter().map(|w| (w.offset, &w.parts[..])).collect();
    if let Err(e) = image.write_many(&reqs, block::MAX_IO_THREADS, bounce) {
        return ioerr(format!("batch of {} writes: {e}", writes.len()));
    }
    BlockStats::add(&stats.batched_writes, writes.len() as u64);
    for w in writes {
        BlockStats::add(&stats.writes, 1);
        BlockStats::add(&stats.write_bytes, w.bytes());
    }
    ok(0)
}

/// Executes `req`; `bounce` is a reusable buffer.
pub fn execute(
    req: &Request,
    image: &mut dyn DiskImage,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    serial: &[u8; 20],
    stats: &BlockStats,
    bounce: &mut Vec<u8>,
) -> Outcome {
    let total = req.data_len();
    let rw_checks = |device_writes: bool| rw_offset(req, total, limits, device_writes);
    match req.kind {
        VIRTIO_BLK_T_IN => {
            let offset = match rw_checks(true) {
                Ok(o) => o,
                Err(m) => return ioerr(format!("read: {m}")),
            };
            let done = if segments_disjoint(&req.data) {
                read_into_guest(req, offset, image, mem, bounce)
            } else {
                read_through_bounce(req, offset, image, mem, bounce)
            };
            let written = match done {
                Ok(w) => w,
                Err(o) => return o,
            };
            BlockStats::add(&stats.reads, 1);
            BlockStats::add(&stats.read_bytes, total);
            ok(written)
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return ioerr("write to a read-only disk".into());
            }
            let offset = match rw_checks(false) {
                Ok(o) => o,
                Err(m) => return ioerr(format!("write: {m}")),
            };
            // The image gets the request up to CHUNK at a time as a list of slices of guest
            // memory, so zero detection sees whole clusters even when the guest split the
            // buffer into pages, and overwrites need no gathering copy.
            let mut pos = offset;
            let mut parts: Vec<&[u8]> = Vec::with_capacity(req.data.len());
            let mut filled = 0usize;
            for &(addr, len, _) in &req.data {
                let mut done = 0usize;
                while done < len as usize {
                    let n = (len as usize - done).min(CHUNK - filled);
                    let Some(a) = addr.checked_add(done as u64) else {
                        return ioerr("write buffer wraps around".into());
                    };
                    if !guest_parts(mem, a, n, &mut parts) {
                        return ioerr("write buffer outside guest memory".into());
                    }
                    done += n;
                    filled += n;
                    if filled == CHUNK {
                        if let Err(e) = image.write_vectored_at(pos, &parts, bounce) {
                            return ioerr(format!("write at {pos}: {e}"));
                        }
                        pos += filled as u64;
                        filled = 0;
                        parts.clear();
                    }
                }
            }
            if filled > 0 {
                if let Err(e) = image.write_vectored_at(pos, &parts, bounce) {
                    return ioerr(format!("write at {pos}: {e}"));
                }
            }
            BlockStats::add(&stats.writes, 1);
            BlockStats::add(&stats.write_bytes, total);
            ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if let Err(e) = image.flush() {
                return ioerr(format!("flush: {e}"));
            }
            BlockStats::add(&stats.flushes, 1);
            ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some(&(addr, len, writable)) = req.data.first() else {
                return ioerr("get-id without a buffer".into());
            };
            if !writable || req.data.len() != 1 {
                return ioerr("get-id buffer has the wrong direction".into());
            }
            let n = (len as usize).min(serial.len());
            if mem.write_slice(&serial[..n], addr).is_err() {
                return ioerr("get-id buffer outside guest memory".into());
            }
            BlockStats::add(&stats.get_ids, 1);
            ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            segments(req, image, mem, limits, stats)
        }
        other => {
            ratelimited_warn(&format!("unsupported request type {other}"));
            BlockStats::add(&stats.unsupported, 1);
            Outcome {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                written: 0,
            }
        }
    }
}

/// Discard and write-zeroes: a list of segments.
fn segments(
    req: &Request,
    image: &mut dyn DiskImage,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    stats: &BlockStats,
) -> Outcome {
    let discard = req.kind == VIRTIO_BLK_T_DISCARD;
    let what = if discard { "discard" } else { "write-zeroes" };
    if limits.read_only {
        return ioerr(format!("{what} on a read-only disk"));
    }
    if req.data.iter().any(|d| d.2) {
        return ioerr(format!("{what}: segment buffer is device-writable"));
    }
    let total = req.data_len();
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    if total == 0 || total % u64::from(SEGMENT_LEN) != 0 {
        return ioerr(format!("{what}: segment data of {total} bytes"));
    }
    if total / u64::from(SEGMENT_LEN) > u64::from(max_seg) {
        return ioerr(format!("{what}: more than {max_seg} segments"));
    }
    let mut raw = Vec::with_capacity(total as usize);
    for &(addr, len, _) in &req.data {
        let start = raw.len();
        raw.resize(start + len as usize, 0);
        if mem.read_slice(&mut raw[start..], addr).is_err() {
            return ioerr(format!("{what}: segments outside guest memory"));
        }
    }
    // Validate every segment before touching the image.
    let mut segs = Vec::new();
    for s in raw.chunks_exact(SEGMENT_LEN as usize) {
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&s[0..8]);
        let sector = u64::from_le_bytes(b8);
        let num = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
        let allowed = if discard { 0 } else { FLAG_UNMAP };
        if flags & !allowed != 0 {
            ratelimited_warn(&format!("{what}: reserved flags {flags:#x}"));
            BlockStats::add(&stats.unsupported, 1);
            return Outcome {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                written: 0,
            };
        }
        if num > max_sectors {
            return ioerr(format!(
                "{what}: {num} sectors exceed the limit {max_sectors}"
            ));
        }
        let end = match sector.checked_add(u64::from(num)) {
            Some(e) if e <= limits.capacity_sectors => e,
            _ => {
                return ioerr(format!(
                    "{what}: sectors {sector}+{num} beyond the capacity"
                ))
            }
        };
        segs.push((sector, end, flags));
    }
    for (sector, end, flags) in segs {
        let (off, len) = (sector * SECTOR, (end - sector) * SECTOR);
        let r = if discard {
            if !limits.discard_unmap {
                Ok(())
            } else {
                image.discard(off, len)
            }
        } else {
            image.write_zeroes(off, len, flags & FLAG_UNMAP != 0 && limits.discard_unmap)
        };
        if let Err(e) = r {
            return ioerr(format!("{what} at {off}+{len}: {e}"));
        }
        if discard {
            BlockStats::add(&stats.discards, 1);
            BlockStats::add(&stats.discard_bytes, len);
        } else {
            BlockStats::add(&stats.write_zeroes, 1);
            BlockStats::add(&stats.write_zeroes_bytes, len);
        }
    }
    ok(0)
}

/// Writes the status byte.
pub fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, addr).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::raw::RawImage;
    use virtio_queue::desc::split::Descriptor;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;
    const MEM: usize = 1 << 20;

    struct Env {
        mem: GuestMemoryMmap,
        image: RawImage,
        limits: Limits,
        stats: BlockStats,
        _dir: std::path::PathBuf,
    }

    fn env(read_only: bool, discard_unmap: bool) -> Env {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "thinvm-req-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("disk.raw");
        std::fs::write(&p, vec![0x11u8; 1 << 20]).unwrap();
        let image = RawImage::open(&p, read_only).unwrap();
        Env {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            image,
            limits: Limits {
                capacity_sectors: 2048,
                max_discard_sectors: 1024,
                max_discard_seg: 2,
                max_write_zeroes_sectors: 1024,
                max_write_zeroes_seg: 2,
                read_only,
                discard_unmap,
            },
            stats: BlockStats::default(),
            _dir: dir,
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }

    fn header(e: &Env, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        e.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn chain(data: &[(u64, u32, bool)]) -> Vec<Descriptor> {
        let mut v = vec![Descriptor::new(HDR, 16, F_NEXT, 1)];
        for (i, &(a, l, w)) in data.iter().enumerate() {
            v.push(Descriptor::new(
                a,
                l,
                F_NEXT | if w { F_WRITE } else { 0 },
                i as u16 + 2,
            ));
        }
        v.push(Descriptor::new(STATUS, 1, F_WRITE, 0));
        v
    }

    /// Parses and executes; returns (status, written).
    fn run(e: &mut Env, descs: &[Descriptor]) -> Result<(u8, u32), Invalid> {
        let req = parse(descs, false, &e.mem)?;
        let mut bounce = Vec::new();
        let out = execute(
            &req,
            &mut e.image,
            &e.mem,
            &e.limits,
            b"serial-0123456789abc",
            &e.stats,
            &mut bounce,
        );
        Ok((out.status, out.written))
    }

    fn seg(e: &Env, at: u64, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        e.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn scattered_segments_gather_and_scatter_in_order() {
        let mut e = env(false, true);
        // 12 KiB of distinct bytes, written through five segments of uneven sizes placed
        // out of order in guest memory.
        let data: Vec<u8> = (0..12288u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let segs = [
            (0x3000u64, 512u32),
            (0x0, 1536),
            (0x8000, 4096),
            (0x5000, 2048),
            (0x1000, 4096),
        ];
        let mut at = 0usize;
        let mut descs = Vec::new();
        for &(off, len) in &segs {
            e.mem
                .write_slice(&data[at..at + len as usize], GuestAddress(DATA + off))
                .unwrap();
            descs.push((DATA + off, len, false));
            at += len as usize;
        }
        header(&e, VIRTIO_BLK_T_OUT, 3);
        let req = parse(&chain(&descs), false, &e.mem).unwrap();
        // A bounce buffer left over from a bigger request, full of stale bytes.
        let mut bounce = vec![0xeeu8; 64 << 10];
        let out = execute(
            &req,
            &mut e.image,
            &e.mem,
            &e.limits,
            &[0; 20],
            &e.stats,
            &mut bounce,
        );
        assert_eq!(out.status, 0);
        let mut on_disk = vec![0u8; 12288];
        e.image.read_at(3 * 512, &mut on_disk).unwrap();
        assert_eq!(on_disk, data);
        // Read it back through a different split, plus one sector before and after.
        let reads = [
            (0x20000u64, 1024u32),
            (0x10000, 4096),
            (0x18000, 512),
            (0x30000, 7680),
        ];
        header(&e, VIRTIO_BLK_T_IN, 2);
        let descs: Vec<_> = reads.iter().map(|&(o, l)| (DATA + o, l, true)).collect();
        let req = parse(&chain(&descs), false, &e.mem).unwrap();
        let out = execute(
            &req,
            &mut e.image,
            &e.mem,
            &e.limits,
            &[0; 20],
            &e.stats,
            &mut bounce,
        );
        assert_eq!((out.status, out.written), (0, 13312));
        let mut back = Vec::new();
        for &(o, l) in &reads {
            let mut b = vec![0u8; l as usize];
            e.mem.read_slice(&mut b, GuestAddress(DATA + o)).unwrap();
            back.extend_from_slice(&b);
        }
        assert_eq!(&back[..512], &[0x11u8; 512][..]);
        assert_eq!(&back[512..12800], &data[..]);
        assert_eq!(&back[12800..], &[0x11u8; 512][..]);
    }

    #[test]
    fn reads_into_overlapping_segments_land_in_segment_order() {
        let mut e = env(false, true);
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 13 + i / 256) as u8).collect();
        e.image.write_at(8 * 512, &data).unwrap();
        // Two segments sharing 512 bytes of guest memory (no driver does this; a hostile one
        // may): the request still reads as if the segments were filled one after the other.
        header(&e, VIRTIO_BLK_T_IN, 8);
        let descs = [(DATA + 0x40000, 1024, true), (DATA + 0x40200, 1024, true)];
        assert_eq!(run(&mut e, &chain(&descs)), Ok((0, 2048)));
        let mut back = vec![0u8; 1536];
        e.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x40000))
            .unwrap();
        assert_eq!(&back[..512], &data[..512]);
        assert_eq!(&back[512..], &data[1024..2048]);
    }

    #[test]
    fn out_in_flush_get_id() {
        let mut e = env(false, true);
        e.mem
            .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
            .unwrap();
        header(&e, VIRTIO_BLK_T_OUT, 4);
        assert_eq!(
            run(
                &mut e,
                &chain(&[(DATA, 512, false), (DATA + 512, 512, false)])
            ),
            Ok((0, 0))
        );
        header(&e, VIRTIO_BLK_T_IN, 4);
        e.mem
            .write_slice(&[0u8; 1024], GuestAddress(DATA + 0x10000))
            .unwrap();
        assert_eq!(
            run(&mut e, &chain(&[(DATA + 0x10000, 1024, true)])),
            Ok((0, 1024))
        );
        let mut back = [0u8; 1024];
        e.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x10000))
            .unwrap();
        assert_eq!(back, [0xab; 1024]);
        header(&e, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut e, &chain(&[])), Ok((0, 0)));
        header(&e, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 20, true)])), Ok((0, 20)));
        let mut id = [0u8; 20];
        e.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
        let s = e.stats.snapshot();
        assert_eq!(
            (
                s.writes,
                s.write_bytes,
                s.reads,
                s.read_bytes,
                s.flushes,
                s.get_ids
            ),
            (1, 1024, 1, 1024, 1, 1)
        );
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut e = env(false, true);
        seg(&e, DATA, 0, 8, 0);
        seg(&e, DATA + 16, 16, 8, 0);
        header(&e, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 32, false)])), Ok((0, 0)));
        seg(&e, DATA, 32, 8, 1);
        header(&e, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((0, 0)));
        let mut b = vec![0xffu8; 512 * 40];
        use block::DiskImage;
        e.image.read_at(0, &mut b).unwrap();
        assert!(
            b[32 * 512..40 * 512].iter().all(|&x| x == 0),
            "write-zeroes"
        );
        assert!(
            b[8 * 512..16 * 512].iter().all(|&x| x == 0x11),
            "untouched range"
        );
        let s = e.stats.snapshot();
        assert_eq!(
            (s.discards, s.discard_bytes, s.write_zeroes),
            (2, 16 * 512, 1)
        );
    }

    #[test]
    fn discard_ignore_leaves_data() {
        let mut e = env(false, false);
        seg(&e, DATA, 0, 8, 0);
        header(&e, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((0, 0)));
        let mut b = vec![0u8; 512];
        use block::DiskImage;
        e.image.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x11));
    }

    #[test]
    fn hostile_requests_get_the_right_status() {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        let mut e = env(false, true);
        // Beyond capacity, overflowing sector numbers, lengths not a multiple of 512.
        header(&e, VIRTIO_BLK_T_IN, 2047);
        assert_eq!(run(&mut e, &chain(&[(DATA, 1024, true)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_OUT, u64::MAX - 1);
        assert_eq!(run(&mut e, &chain(&[(DATA, 1024, false)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 100, false)])), Ok((ioerr, 0)));
        // Wrong directions.
        header(&e, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 512, false)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 512, true)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 20, false)])), Ok((ioerr, 0)));
        // Buffers outside guest RAM, or wrapping around.
        header(&e, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            run(&mut e, &chain(&[(MEM as u64 - 256, 512, true)])),
            Err(Invalid::Status(1, _))
        ));
        assert!(matches!(
            run(&mut e, &chain(&[(u64::MAX - 100, 512, true)])),
            Err(Invalid::Status(1, _))
        ));
        // Unknown type; discard/write-zeroes segment problems.
        header(&e, 42, 0);
        assert_eq!(run(&mut e, &chain(&[])), Ok((unsupp, 0)));
        header(&e, VIRTIO_BLK_T_DISCARD, 0);
        seg(&e, DATA, 0, 8, 1); // UNMAP flag is reserved for discard
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((unsupp, 0)));
        header(&e, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        seg(&e, DATA, 0, 8, 4);
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((unsupp, 0)));
        header(&e, VIRTIO_BLK_T_DISCARD, 0);
        seg(&e, DATA, 2040, 16, 0); // beyond capacity
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((ioerr, 0)));
        seg(&e, DATA, 0, 2000, 0); // more sectors than max_discard_sectors
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((ioerr, 0)));
        assert_eq!(
            run(&mut e, &chain(&[(DATA, 48, false)])),
            Ok((ioerr, 0)),
            "too many segments"
        );
        assert_eq!(
            run(&mut e, &chain(&[(DATA, 20, false)])),
            Ok((ioerr, 0)),
            "partial segment"
        );
        assert_eq!(
            run(&mut e, &chain(&[(DATA, 16, true)])),
            Ok((ioerr, 0)),
            "writable segments"
        );
        // Header problems: device-writable, too short.
        let mut d = chain(&[]);
        d[0] = Descriptor::new(HDR, 16, F_NEXT | F_WRITE, 1);
        assert!(matches!(
            parse(&d, false, &e.mem),
            Err(Invalid::Status(1, _))
        ));
        d[0] = Descriptor::new(HDR, 8, F_NEXT, 1);
        assert!(matches!(
            parse(&d, false, &e.mem),
            Err(Invalid::Status(1, _))
        ));
        // Unanswerable chains are dropped: missing / read-only / empty / outside status,
        // loops and over-long chains.
        assert!(matches!(
            parse(&[Descriptor::new(HDR, 16, 0, 0)], false, &e.mem),
            Err(Invalid::Drop(_))
        ));
        let mut d = chain(&[]);
        d[1] = Descriptor::new(STATUS, 1, 0, 0);
        assert!(matches!(parse(&d, false, &e.mem), Err(Invalid::Drop(_))));
        d[1] = Descriptor::new(STATUS, 0, F_WRITE, 0);
        assert!(matches!(parse(&d, false, &e.mem), Err(Invalid::Drop(_))));
        d[1] = Descriptor::new(MEM as u64 + 10, 1, F_WRITE, 0);
        assert!(matches!(parse(&d, false, &e.mem), Err(Invalid::Drop(_))));
        assert!(matches!(
            parse(&chain(&[]), true, &e.mem),
            Err(Invalid::Drop(_))
        ));
        assert!(matches!(parse(&[], false, &e.mem), Err(Invalid::Drop(_))));
    }

    #[test]
    fn read_only_refuses_write_types() {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let mut e = env(true, true);
        header(&e, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 512, false)])), Ok((ioerr, 0)));
        seg(&e, DATA, 0, 8, 0);
        header(&e, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 16, false)])), Ok((ioerr, 0)));
        header(&e, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut e, &chain(&[(DATA, 512, true)])), Ok((0, 512)));
    }
}
