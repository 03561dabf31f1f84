//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2 §5.10.6) and the
//! protocol's constants. virtio-bindings has no vsock bindings, so the layout is declared
//! here, as Linux's uapi `linux/virtio_vsock.h` has it: 44 bytes, packed, little endian.

use vm_memory::ByteValued;

/// The header as it lies in guest memory (fields little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: `Header` is `repr(C, packed)` with only integer fields: no padding, and every bit
// pattern is a valid value.
unsafe impl ByteValued for Header {}

/// Bytes of a header.
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();
const _: () = assert!(HEADER_LEN == 44);
/// [`HEADER_LEN`] as the `u32` a used-ring length is.
pub const HEADER_LEN_U32: u32 = 44;
const _: () = assert!(HEADER_LEN == HEADER_LEN_U32 as usize);

/// The host's context id (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// The only socket type this device offers (`VIRTIO_VSOCK_TYPE_STREAM`).
pub const TYPE_STREAM: u16 = 1;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`): what a guest may
/// send in one packet, and what the device puts in one.
pub const MAX_PKT_LEN: u32 = 64 << 10;
/// `SHUTDOWN` flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// The event-queue event that tells the driver every connection is gone
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    /// The operation a header names, if it is one.
    pub fn from_raw(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

impl Header {
    /// A header from the host to the guest: `(host port, guest port)`, the operation and the
    /// connection's credit (`buf_alloc`, `fwd_cnt`).
    pub fn to_guest(
        guest_cid: u64,
        host_port: u32,
        guest_port: u32,
        op: Op,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Header {
        Header {
            src_cid: HOST_CID.to_le(),
            dst_cid: guest_cid.to_le(),
            src_port: host_port.to_le(),
            dst_port: guest_port.to_le(),
            len: 0,
            type_: TYPE_STREAM.to_le(),
            op: (op as u16).to_le(),
            flags: 0,
            buf_alloc: buf_alloc.to_le(),
            fwd_cnt: fwd_cnt.to_le(),
        }
    }

    /// A header from the guest to the host (tests and fuzzing build guest packets with it).
    #[allow(clippy::too_many_arguments)]
    pub fn from_guest(
        guest_cid: u64,
        guest_port: u32,
        host_port: u32,
        op: u16,
        len: u32,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Header {
        Header {
            src_cid: guest_cid.to_le(),
            dst_cid: HOST_CID.to_le(),
            src_port: guest_port.to_le(),
            dst_port: host_port.to_le(),
            len: len.to_le(),
            type_: TYPE_STREAM.to_le(),
            op: op.to_le(),
            flags: flags.to_le(),
            buf_alloc: buf_alloc.to_le(),
            fwd_cnt: fwd_cnt.to_le(),
        }
    }

    pub fn with_len(mut self, len: u32) -> Header {
        self.len = len.to_le();
        self
    }

    pub fn with_flags(mut self, flags: u32) -> Header {
        self.flags = flags.to_le();
        self
    }

    pub fn with_type(mut self, t: u16) -> Header {
        self.type_ = t.to_le();
        self
    }

    pub fn src_cid(&self) -> u64 {
        u64::from_le(self.src_cid)
    }
    pub fn dst_cid(&self) -> u64 {
        u64::from_le(self.dst_cid)
    }
    pub fn src_port(&self) -> u32 {
        u32::from_le(self.src_port)
    }
    pub fn dst_port(&self) -> u32 {
        u32::from_le(self.dst_port)
    }
    /// The payload's length.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        u32::from_le(self.len)
    }
    pub fn type_(&self) -> u16 {
        u16::from_le(self.type_)
    }
    pub fn op_raw(&self) -> u16 {
        u16::from_le(self.op)
    }
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op_raw())
    }
    pub fn flags(&self) -> u32 {
        u32::from_le(self.flags)
    }
    pub fn buf_alloc(&self) -> u32 {
        u32::from_le(self.buf_alloc)
    }
    pub fn fwd_cnt(&self) -> u32 {
        u32::from_le(self.fwd_cnt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_linux() {
        let h = Header::to_guest(3, 1 << 30, 52, Op::Response, 4096, 7).with_len(9);
        let b = h.as_slice();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[0..8], &2u64.to_le_bytes());
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &(1u32 << 30).to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[24..28], &9u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &2u16.to_le_bytes());
        assert_eq!(&b[36..40], &4096u32.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(Op::from_raw(8), None);
        assert_eq!(h.op(), Some(Op::Response));
    }
}
