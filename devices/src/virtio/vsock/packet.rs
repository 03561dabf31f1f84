//! Descriptor chains of the vsock queues, parsed once with every check a hostile guest needs:
//! a transmit chain into a [`TxPacket`] (header + payload, device-readable), a receive chain
//! into an [`RxBuffer`] (device-writable room for a header and a payload).
//!
//! A chain is a byte stream ("any layout", virtio 1.2 §2.7.4): Linux 6.1 puts the header and
//! the payload in two descriptors, later kernels in one; both are accepted. A chain has at
//! most [`MAX_DESCRIPTORS`] descriptors (indirect tables included); every buffer lies wholly
//! in guest RAM without wrapping around the address space; the header's `len` is at most
//! [`MAX_PKT_LEN`] and at most what the chain carries. Guest memory is only ever touched
//! through vm-memory's volatile accessors.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::header::{Header, HEADER_LEN, MAX_PKT_LEN};

/// Most descriptors a vsock chain may have (Linux uses 2, or 1 + the fragments of one
/// socket buffer: at most 18).
pub const MAX_DESCRIPTORS: usize = 64;

/// A guest buffer: `len` bytes at `addr`, in RAM, not wrapping.
pub type Piece = (GuestAddress, u32);

/// Why a chain is not usable. It is returned to the guest unanswered (used length 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadChain {
    TooManyDescriptors,
    /// The chain does not end (a descriptor loop) or names a descriptor beyond the table.
    CutShort,
    /// A buffer outside guest RAM or wrapping around.
    OutsideRam(u64, u32),
    /// A device-writable buffer in a transmit chain, or a device-readable one in a receive
    /// chain.
    WrongDirection,
    /// Fewer bytes than a header.
    Short(u64),
    /// The header's payload length is above [`MAX_PKT_LEN`] or beyond the chain's bytes.
    BadLength {
        len: u32,
        carried: u64,
    },
}

impl std::fmt::Display for BadChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadChain::TooManyDescriptors => {
                write!(f, "more than {MAX_DESCRIPTORS} descriptors in a chain")
            }
            BadChain::CutShort => write!(f, "a descriptor loop or a next index out of range"),
            BadChain::OutsideRam(a, l) => write!(f, "buffer {a:#x}+{l:#x} outside guest RAM"),
            BadChain::WrongDirection => write!(f, "a buffer of the wrong direction"),
            BadChain::Short(n) => write!(f, "chain of {n} bytes is shorter than a header"),
            BadChain::BadLength { len, carried } => write!(
                f,
                "header length {len} (at most {MAX_PKT_LEN}, and the chain carries {carried})"
            ),
        }
    }
}

/// The buffers of a chain, checked, in order, all of one direction.
fn collect(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<(Vec<Piece>, u64), BadChain> {
    let mut pieces = Vec::new();
    let mut total = 0u64;
    let mut last_has_next = false;
    // One more than allowed is read, to tell a long chain from one at the limit.
    for (n, d) in chain.enumerate() {
        if n >= MAX_DESCRIPTORS {
            return Err(BadChain::TooManyDescriptors);
        }
        last_has_next = d.has_next();
        if d.is_write_only() != writable {
            return Err(BadChain::WrongDirection);
        }
        let (addr, len) = (d.addr(), d.len());
        if len == 0 {
            continue;
        }
        if addr.0.checked_add(u64::from(len)).is_none()
            || !GuestMemoryBackend::check_range(mem, addr, len as usize)
        {
            return Err(BadChain::OutsideRam(addr.0, len));
        }
        total += u64::from(len);
        pieces.push((addr, len));
    }
    // virtio-queue ends a chain quietly where it cannot follow it (a loop that ran out of the
    // queue's size, a next index beyond the table): the chain is broken.
    if last_has_next {
        return Err(BadChain::CutShort);
    }
    Ok((pieces, total))
}

/// `n` bytes from the front of `pieces` (all of them if fewer), split off.
fn split_front(pieces: &mut Vec<Piece>, mut n: u64) -> Vec<Piece> {
    let mut head = Vec::new();
    let mut taken = 0;
    for p in pieces.iter_mut() {
        if n == 0 {
            break;
        }
        match u32::try_from(n) {
            // k < p.1: p.0 + k stays inside the checked range.
            Ok(k) if k < p.1 => {
                head.push((p.0, k));
                *p = (GuestAddress(p.0 .0 + u64::from(k)), p.1 - k);
                n = 0;
            }
            // n >= p.1 (a u32 or more): the whole piece.
            _ => {
                n -= u64::from(p.1);
                head.push(*p);
                taken += 1;
            }
        }
    }
    pieces.drain(..taken);
    head
}

/// Copies the bytes of `pieces` into `dst` (which they must cover).
fn read_pieces(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    dst: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0usize;
    for &(addr, len) in pieces {
        let n = (len as usize).min(dst.len() - at);
        mem.read_slice(&mut dst[at..at + n], addr)?;
        at += n;
        if at == dst.len() {
            break;
        }
    }
    Ok(())
}

/// A packet the guest sent: its header and the guest buffers holding exactly `hdr.len()`
/// payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub payload: Vec<Piece>,
}

impl TxPacket {
    /// Parses a transmit chain.
    pub fn parse(
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<TxPacket, BadChain> {
        let (mut pieces, total) = collect(chain, mem, false)?;
        if total < HEADER_LEN as u64 {
            return Err(BadChain::Short(total));
        }
        let head = split_front(&mut pieces, HEADER_LEN as u64);
        let mut hdr = Header::default();
        read_pieces(mem, &head, vm_memory::ByteValued::as_mut_slice(&mut hdr))
            .map_err(|_| BadChain::Short(total))?;
        let carried = total - HEADER_LEN as u64;
        let len = hdr.len();
        if len > MAX_PKT_LEN || u64::from(len) > carried {
            return Err(BadChain::BadLength { len, carried });
        }
        let payload = split_front(&mut pieces, u64::from(len));
        Ok(TxPacket { hdr, payload })
    }
}

/// Room the guest gave for one packet to it: the header's bytes and the payload's (at least
/// one byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    header: Vec<Piece>,
    payload: Vec<Piece>,
}

impl RxBuffer {
    /// Parses a receive chain.
    pub fn parse(
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<RxBuffer, BadChain> {
        let (mut pieces, total) = collect(chain, mem, true)?;
        // Room for a header and at least one payload byte (Linux gives 4 KiB): a buffer that
        // could carry control packets only would block data behind it.
        if total <= HEADER_LEN as u64 {
            return Err(BadChain::Short(total));
        }
        let header = split_front(&mut pieces, HEADER_LEN as u64);
        // No packet carries more than MAX_PKT_LEN: the rest of a larger buffer stays unused.
        let payload = split_front(&mut pieces, u64::from(MAX_PKT_LEN));
        Ok(RxBuffer { header, payload })
    }

    /// Payload bytes this buffer can take.
    pub fn capacity(&self) -> u32 {
        // At most MAX_PKT_LEN (split_front above).
        self.payload.iter().map(|p| p.1).sum()
    }

    /// The payload buffers, in order.
    pub fn payload(&self) -> &[Piece] {
        &self.payload
    }

    /// Writes `hdr` into the header bytes.
    pub fn write_header(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let bytes = vm_memory::ByteValued::as_slice(hdr);
        let mut at = 0usize;
        for &(addr, len) in &self.header {
            let n = len as usize;
            mem.write_slice(&bytes[at..at + n], addr)?;
            at += n;
        }
        Ok(())
    }

    /// Copies `data` (at most [`RxBuffer::capacity`] bytes) into the payload buffers.
    pub fn write_payload(
        &self,
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut at = 0usize;
        for &(addr, len) in &self.payload {
            if at == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - at);
            mem.write_slice(&data[at..at + n], addr)?;
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn d(addr: u64, len: u32, write: bool) -> Descriptor {
        Descriptor::new(addr, len, if write { 2 } else { 0 }, 0)
    }

    #[test]
    fn a_chain_that_does_not_end_is_broken() {
        let m = mem();
        let h = Header::from_guest(3, 1, 2, 5, 4, 0, 0, 0);
        m.write_obj(h, GuestAddress(0x1000)).unwrap();
        // What virtio-queue yields for a loop: descriptors until the queue size, the last one
        // still pointing on.
        let looped = (0..16).map(|_| Descriptor::new(0x1000, 44, 1, 0));
        assert_eq!(TxPacket::parse(looped, &m), Err(BadChain::CutShort));
    }

    #[test]
    fn header_and_payload_in_any_layout() {
        let m = mem();
        let h = Header::from_guest(3, 1000, 52, 5, 10, 0, 4096, 0);
        let b = vm_memory::ByteValued::as_slice(&h).to_vec();
        // Header split 6 + 38, payload 10 after it in the second buffer.
        m.write_slice(&b[..6], GuestAddress(0x1000)).unwrap();
        m.write_slice(&b[6..], GuestAddress(0x2000)).unwrap();
        let p = TxPacket::parse(
            [d(0x1000, 6, false), d(0x2000, 38 + 16, false)].into_iter(),
            &m,
        )
        .unwrap();
        assert_eq!(p.hdr, h);
        assert_eq!(p.payload, vec![(GuestAddress(0x2000 + 38), 10)]);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = mem();
        let h = Header::from_guest(3, 1, 2, 5, 100, 0, 0, 0);
        m.write_obj(h, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            TxPacket::parse([d(0x1000, 44 + 50, false)].into_iter(), &m),
            Err(BadChain::BadLength {
                len: 100,
                carried: 50
            })
        );
        let big = Header::from_guest(3, 1, 2, 5, MAX_PKT_LEN + 1, 0, 0, 0);
        m.write_obj(big, GuestAddress(0x1000)).unwrap();
        assert!(matches!(
            TxPacket::parse([d(0x1000, 44, false), d(0, 1 << 19, false)].into_iter(), &m),
            Err(BadChain::BadLength { .. })
        ));
        assert_eq!(
            TxPacket::parse([d(0x1000, 43, false)].into_iter(), &m),
            Err(BadChain::Short(43))
        );
        assert_eq!(
            TxPacket::parse([d(0x1000, 44, true)].into_iter(), &m),
            Err(BadChain::WrongDirection)
        );
        assert_eq!(
            TxPacket::parse([d(u64::MAX - 4, 44, false)].into_iter(), &m),
            Err(BadChain::OutsideRam(u64::MAX - 4, 44))
        );
        assert_eq!(
            TxPacket::parse([d((1 << 20) - 8, 44, false)].into_iter(), &m),
            Err(BadChain::OutsideRam((1 << 20) - 8, 44))
        );
        let many = (0..=MAX_DESCRIPTORS).map(|_| d(0x1000, 1, false));
        assert_eq!(TxPacket::parse(many, &m), Err(BadChain::TooManyDescriptors));
        assert_eq!(
            RxBuffer::parse([d(0x1000, 44, false)].into_iter(), &m),
            Err(BadChain::WrongDirection)
        );
    }

    #[test]
    fn rx_buffers_take_a_header_and_at_most_one_packet() {
        let m = mem();
        let rx = RxBuffer::parse([d(0x1000, 44 + 4096, true)].into_iter(), &m).unwrap();
        assert_eq!(rx.capacity(), 4096);
        assert_eq!(
            RxBuffer::parse([d(0x1000, 20, true), d(0x3000, 24, true)].into_iter(), &m),
            Err(BadChain::Short(44))
        );
        let rx = RxBuffer::parse(
            [d(0x1000, 20, true), d(0x3000, 24, true), d(0x4000, 1, true)].into_iter(),
            &m,
        )
        .unwrap();
        assert_eq!(rx.capacity(), 1);
        let h = Header::to_guest(3, 5, 6, super::super::header::Op::Rst, 1, 2);
        rx.write_header(&m, &h).unwrap();
        let mut got = [0u8; 44];
        m.read_slice(&mut got[..20], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut got[20..], GuestAddress(0x3000)).unwrap();
        assert_eq!(&got[..], vm_memory::ByteValued::as_slice(&h));
        let rx = RxBuffer::parse([d(0, 1 << 20, true)].into_iter(), &m).unwrap();
        assert_eq!(rx.capacity(), MAX_PKT_LEN);
    }
}
