//! virtio-blk requests: one descriptor chain parsed, once, into a typed [`Request`], with
//! every check a hostile guest needs in this one place.
//!
//! The chain is a byte stream (virtio 1.x "any layout", §2.7.4): its device-readable part
//! starts with the 16-byte `virtio_blk_outhdr` and, for writes, discards and write-zeroes,
//! carries the data; its device-writable part carries a read's data or a GET_ID's buffer and
//! ends with the 1-byte status. How the driver spreads those bytes over descriptors does not
//! matter (a header and data in one descriptor, data and status in one, a header split in
//! two are all legal). Zero-length descriptors carry no bytes and are allowed, but count
//! towards the limit on descriptors per chain (`seg_max` data segments + header + status,
//! what Linux sends at most).

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::guest_ranges::{GuestRange, GuestRanges};

pub const SECTOR: u64 = 512;
/// Bytes of the request header.
const HEADER_LEN: u64 = std::mem::size_of::<virtio_blk_outhdr>() as u64;
/// Bytes of one discard / write-zeroes segment.
const SEGMENT_LEN: u64 = std::mem::size_of::<virtio_blk_discard_write_zeroes>() as u64;

/// `code` as the status byte the device writes, checked to fit when the constant is built.
const fn status_byte(code: u32) -> u8 {
    assert!(code <= 0xff);
    #[allow(clippy::cast_possible_truncation)] // checked just above: code <= 0xff
    {
        code as u8
    }
}
/// The status bytes the device writes (`VIRTIO_BLK_S_*`).
pub const STATUS_OK: u8 = status_byte(VIRTIO_BLK_S_OK);
pub const STATUS_IOERR: u8 = status_byte(VIRTIO_BLK_S_IOERR);
pub const STATUS_UNSUPP: u8 = status_byte(VIRTIO_BLK_S_UNSUPP);

/// The request header (`virtio_blk_outhdr`), readable from guest bytes.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct RequestHeader(pub virtio_blk_outhdr);

// SAFETY: `virtio_blk_outhdr` is `repr(C)` with two u32 and a u64 field: no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One discard / write-zeroes segment (`virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct SegmentDescriptor(pub virtio_blk_discard_write_zeroes);

// SAFETY: `virtio_blk_discard_write_zeroes` is `repr(C)` with a u64 and two u32 fields: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for SegmentDescriptor {}

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// `seg_max`: data descriptors per request. A chain may have this many + 2 descriptors.
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub read_only: bool,
    /// `discard=unmap` (otherwise discards are ignored and write-zeroes never unmap).
    pub discard_unmap: bool,
}

impl Limits {
    /// Most descriptors of one chain (indirect tables included): data segments, a header
    /// and a status descriptor.
    pub fn max_descriptors(&self) -> usize {
        self.seg_max as usize + 2
    }
}

/// A validated discard / write-zeroes range, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    /// Write-zeroes may release the space (the segment's unmap flag).
    pub unmap: bool,
}

/// What a request asks for. Every variant has passed all checks: sizes, directions,
/// capacity, read-only, flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data.len()` bytes at `offset` into `data`.
    Read {
        offset: u64,
        data: GuestRanges,
    },
    /// Write `data` at `offset`.
    Write {
        offset: u64,
        data: GuestRanges,
    },
    Flush,
    /// Write the serial number into `buf` (at most 20 bytes).
    GetId {
        buf: GuestRanges,
    },
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

impl RequestKind {
    /// Bytes of data a read or write moves (0 for the others).
    pub fn data_len(&self) -> u64 {
        match self {
            RequestKind::Read { data, .. } | RequestKind::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Whether the request changes the disk (and so can fail for lack of host space).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            RequestKind::Write { .. } | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        )
    }
}

/// A parsed request: what to do, and where its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub status: GuestAddress,
}

/// Why a chain cannot be executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// No usable status byte: the chain is returned without a status.
    Drop(String),
    /// Answer with `code` (IOERR or UNSUPP) at `status`.
    Status {
        status: GuestAddress,
        code: u8,
        msg: String,
    },
}

/// Parses the descriptors of one chain (as virtio-queue yields them, indirect tables
/// followed). Reads at most [`Limits::max_descriptors`] + 1 descriptors of it.
pub fn parse(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Result<Request, Invalid> {
    let (mut readable, mut writable, shape) = split_chain(chain, limits.max_descriptors());
    if let Shape::Broken(msg) = shape {
        return Err(Invalid::Drop(msg.into()));
    }
    // The status byte: the last byte of the device-writable part.
    let status_in_ram = writable.ranges().last().is_some_and(|r| {
        GuestRange::new(GuestAddress(r.end() - 1), 1).is_some_and(|b| b.in_ram(mem))
    });
    let Some(status) = writable.pop_last_byte() else {
        return Err(Invalid::Drop("no device-writable status byte".into()));
    };
    if !status_in_ram {
        return Err(Invalid::Drop(format!(
            "status byte at {:#x} outside guest memory",
            status.0
        )));
    }
    let fail = |code: u8, msg: String| Invalid::Status { status, code, msg };
    let ioerr = |msg: String| fail(STATUS_IOERR, msg);
    match shape {
        Shape::Ok => {}
        Shape::Wrapping => {
            return Err(ioerr(
                "a device-readable buffer wraps around the address space".into(),
            ))
        }
        Shape::WritableFirst => {
            return Err(ioerr(
                "a device-readable descriptor follows a device-writable one".into(),
            ))
        }
        Shape::Broken(_) => {}
    }
    if let Some(r) = readable
        .ranges()
        .iter()
        .chain(writable.ranges())
        .find(|r| !r.in_ram(mem))
    {
        return Err(ioerr(format!(
            "buffer {:#x}+{:#x} outside guest memory",
            r.addr.0, r.len
        )));
    }
    if readable.len() < HEADER_LEN {
        return Err(ioerr(format!(
            "request header too short ({} bytes)",
            readable.len()
        )));
    }
    let header_bytes = readable.split_front(HEADER_LEN);
    let mut hdr = RequestHeader::default();
    header_bytes
        .read_into(mem, 0, hdr.as_mut_slice())
        .map_err(|e| ioerr(format!("request header: {e}")))?;
    let kind = u32::from_le(hdr.0.type_);
    let sector = u64::from_le(hdr.0.sector);
    let only_readable = |what: &str, data: &GuestRanges| {
        if data.is_empty() {
            Ok(())
        } else {
            Err(ioerr(format!(
                "{what}: {} device-writable bytes before the status",
                data.len()
            )))
        }
    };
    let only_writable = |what: &str, data: &GuestRanges| {
        if data.is_empty() {
            Ok(())
        } else {
            Err(ioerr(format!(
                "{what}: {} device-readable bytes after the header",
                data.len()
            )))
        }
    };
    let kind = match kind {
        VIRTIO_BLK_T_IN => {
            only_writable("read", &readable)?;
            let offset = data_offset(sector, writable.len(), limits)
                .map_err(|m| ioerr(format!("read: {m}")))?;
            RequestKind::Read {
                offset,
                data: writable,
            }
        }
        VIRTIO_BLK_T_OUT => {
            only_readable("write", &writable)?;
            if limits.read_only {
                return Err(ioerr("write to a read-only disk".into()));
            }
            let offset = data_offset(sector, readable.len(), limits)
                .map_err(|m| ioerr(format!("write: {m}")))?;
            RequestKind::Write {
                offset,
                data: readable,
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            // A flush's data, if any, means nothing (QEMU ignores it too).
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            only_writable("get-id", &readable)?;
            if writable.is_empty() {
                return Err(ioerr("get-id without a buffer".into()));
            }
            RequestKind::GetId { buf: writable }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let what = if discard { "discard" } else { "write-zeroes" };
            only_readable(what, &writable)?;
            if limits.read_only {
                return Err(ioerr(format!("{what} on a read-only disk")));
            }
            let segs = segments(&readable, mem, limits, discard).map_err(|e| match e {
                SegmentError::Unsupported(m) => fail(STATUS_UNSUPP, format!("{what}: {m}")),
                SegmentError::Invalid(m) => ioerr(format!("{what}: {m}")),
            })?;
            if discard {
                RequestKind::Discard(segs)
            } else {
                RequestKind::WriteZeroes(segs)
            }
        }
        other => {
            return Err(fail(
                STATUS_UNSUPP,
                format!("unsupported request type {other}"),
            ))
        }
    };
    Ok(Request { kind, status })
}

/// How a chain's descriptors are arranged.
#[derive(Debug, PartialEq, Eq)]
enum Shape {
    Ok,
    /// Not answerable: a loop, a broken link, too many descriptors.
    Broken(&'static str),
    /// A device-readable buffer wraps around the address space.
    Wrapping,
    /// A device-readable byte after a device-writable one.
    WritableFirst,
}

/// Splits a chain into its device-readable and device-writable byte streams, reading at most
/// `max + 1` descriptors.
fn split_chain(
    chain: impl Iterator<Item = Descriptor>,
    max: usize,
) -> (GuestRanges, GuestRanges, Shape) {
    let mut readable = GuestRanges::new();
    let mut writable = GuestRanges::new();
    let mut shape = Shape::Ok;
    let mut count = 0usize;
    let mut last_has_next = false;
    let mut writable_wraps = false;
    for d in chain.take(max + 1) {
        count += 1;
        last_has_next = d.has_next();
        if d.len() == 0 {
            continue;
        }
        let Some(r) = GuestRange::new(d.addr(), d.len()) else {
            if d.is_write_only() {
                // Where its last byte (the status, if it is the last one) would be is not
                // an address.
                writable_wraps = true;
            } else if shape == Shape::Ok {
                shape = Shape::Wrapping;
            }
            continue;
        };
        if d.is_write_only() {
            writable.push(r);
        } else {
            if !writable.is_empty() && shape == Shape::Ok {
                shape = Shape::WritableFirst;
            }
            readable.push(r);
        }
    }
    if writable_wraps {
        shape = Shape::Broken("a device-writable buffer wraps around the address space");
    }
    if count > max {
        shape = Shape::Broken("descriptor chain longer than seg_max + 2 descriptors");
    } else if count == 0 {
        shape = Shape::Broken("empty descriptor chain");
    } else if last_has_next {
        // virtio-queue ends a chain early on a loop (its length reached the queue or table
        // size), a next index out of range, a nested or misaligned indirect table, or more
        // than 4 GiB in total.
        shape = Shape::Broken("descriptor chain loops or is broken");
    }
    (readable, writable, shape)
}

/// Why a read's or write's data cannot be where the header puts it.
#[derive(Debug, thiserror::Error)]
enum DataRangeError {
    #[error("data length {len} is not a multiple of 512")]
    PartialSector { len: u64 },
    #[error("sectors {sector}+{sectors} beyond the capacity ({capacity} sectors)")]
    BeyondCapacity {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
}

/// The byte offset of `len` bytes at `sector`, checked: whole sectors, within the capacity.
fn data_offset(sector: u64, len: u64, limits: &Limits) -> Result<u64, DataRangeError> {
    if len % SECTOR != 0 {
        return Err(DataRangeError::PartialSector { len });
    }
    match sector.checked_add(len / SECTOR) {
        Some(end) if end <= limits.capacity_sectors => Ok(sector * SECTOR),
        _ => Err(DataRangeError::BeyondCapacity {
            sector,
            sectors: len / SECTOR,
            capacity: limits.capacity_sectors,
        }),
    }
}

enum SegmentError {
    /// Answered with UNSUPP (reserved flags).
    Unsupported(String),
    /// Answered with IOERR.
    Invalid(String),
}

/// Reads and checks the segments of a discard / write-zeroes request.
fn segments(
    data: &GuestRanges,
    mem: &GuestMemoryMmap,
    limits: &Limits,
    discard: bool,
) -> Result<Vec<Segment>, SegmentError> {
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let total = data.len();
    if total == 0 || total % SEGMENT_LEN != 0 {
        return Err(SegmentError::Invalid(format!(
            "segment data of {total} bytes"
        )));
    }
    let n = total / SEGMENT_LEN;
    if n > u64::from(max_seg) {
        return Err(SegmentError::Invalid(format!(
            "{n} segments, more than {max_seg}"
        )));
    }
    let mut segs = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut s = SegmentDescriptor::default();
        data.read_into(mem, i * SEGMENT_LEN, s.as_mut_slice())
            .map_err(|e| SegmentError::Invalid(format!("segment {i}: {e}")))?;
        let sector = u64::from_le(s.0.sector);
        let num = u32::from_le(s.0.num_sectors);
        let flags = u32::from_le(s.0.flags);
        // The unmap flag is defined for write-zeroes; on a discard QEMU accepts it too (the
        // spec asks for UNSUPP there), and so do we: a discard may unmap anyway.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(SegmentError::Unsupported(format!(
                "reserved flags {flags:#x}"
            )));
        }
        if num > max_sectors {
            return Err(SegmentError::Invalid(format!(
                "{num} sectors exceed the limit {max_sectors}"
            )));
        }
        match sector.checked_add(u64::from(num)) {
            Some(end) if end <= limits.capacity_sectors => {}
            _ => {
                return Err(SegmentError::Invalid(format!(
                    "sectors {sector}+{num} beyond the capacity"
                )))
            }
        }
        segs.push(Segment {
            offset: sector * SECTOR,
            len: u64::from(num) * SECTOR,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segs)
}
