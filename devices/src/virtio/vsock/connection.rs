//! One vsock connection between a guest socket and a host Unix stream: its state machine,
//! credit-based flow control (virtio 1.2 §5.10.6.3) and the packets it owes the guest.
//!
//! Flow control, both ways:
//! * guest → host: the device advertises `buf_alloc` ([`CONN_BUF`]) and `fwd_cnt` (bytes it
//!   has written to the host stream). The guest may have at most `buf_alloc` bytes sent but not
//!   forwarded; what the host stream does not take at once waits in the connection's buffer,
//!   which can therefore never hold more than `buf_alloc` bytes. A guest that sends beyond
//!   its credit is reset. A credit update goes out once the guest's view of the free space
//!   drops below half the buffer.
//! * host → guest: the device reads the host stream only while the guest's advertised
//!   credit (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`) is above zero, and never more than
//!   that credit into one packet.
//!
//! Shutdown: a guest `SHUTDOWN` with SEND half-closes the host stream (once buffered data is
//! written); with both flags the connection ends: the device answers `RST` (what a closing
//! Linux socket waits for). End of file on the host stream becomes a `SHUTDOWN` with SEND
//! ("no more data from here"); a host stream that fails becomes a `RST`. A guest that does
//! not answer a connection request or a full shutdown within [`REQUEST_TIMEOUT`] /
//! [`CLOSE_TIMEOUT`] gets a `RST`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, WriteVolatile};

use super::header::{Header, Op, MAX_PKT_LEN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::packet::{RxBuffer, TxPacket};

/// The receive buffer the device advertises per connection (`buf_alloc`): the most guest
/// data it ever holds for one connection.
pub const CONN_BUF: u32 = 256 << 10;
/// How long a guest has to answer a host's connection request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may wait for its end (buffered data written, the guest's `RST`).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the request is (to be) sent, the guest has not answered.
    LocalInit,
    /// Data flows (each way until that way is shut down).
    Established,
    /// Ending: buffered guest data is being written out, or the guest's `RST` awaited.
    Closing,
}

/// Packets the connection owes the guest, as bits.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_SHUTDOWN: u8 = 4;
const P_RW: u8 = 8;
const P_CREDIT_UPDATE: u8 = 16;

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove it without telling the guest (the guest reset it).
    Drop,
    /// Remove it and send the guest a `RST`.
    Reset,
}

/// One connection.
pub struct Connection {
    pub host_port: u32,
    pub guest_port: u32,
    stream: UnixStream,
    state: State,
    // guest -> host
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// Bytes for the host that are not guest data (the "OK <port>\n" answer), written first.
    ctl_out: Vec<u8>,
    // host -> guest
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    pending: u8,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// SHUTDOWN flags sent (or to be sent) to the guest.
    local_shutdown: u32,
    /// The host stream may have data or end of file to read (it is watched edge-triggered:
    /// set on each readiness event, cleared when a read finds nothing).
    readable: bool,
    /// When the connection gives up waiting (request or close).
    pub deadline: Option<Instant>,
}

impl Connection {
    /// A connection the host asked for (`CONNECT <guest_port>`): a request goes to the guest.
    pub fn host_initiated(stream: UnixStream, host_port: u32, guest_port: u32) -> Connection {
        let mut c = Connection::new(stream, host_port, guest_port, State::LocalInit);
        c.pending = P_REQUEST;
        c.deadline = Some(Instant::now() + REQUEST_TIMEOUT);
        c
    }

    /// A connection the guest asked for (its `REQUEST`), already connected on the host: a
    /// response goes to the guest.
    pub fn guest_initiated(stream: UnixStream, req: &Header) -> Connection {
        let mut c = Connection::new(stream, req.dst_port(), req.src_port(), State::Established);
        c.update_peer_credit(req);
        c.pending = P_RESPONSE;
        c
    }

    fn new(stream: UnixStream, host_port: u32, guest_port: u32, state: State) -> Connection {
        Connection {
            host_port,
            guest_port,
            stream,
            state,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            ctl_out: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            pending: 0,
            peer_shutdown: 0,
            local_shutdown: 0,
            readable: false,
            deadline: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Guest bytes held for the host.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Whether the connection owes the guest a packet.
    pub fn wants_rx(&self) -> bool {
        self.pending != 0
    }

    /// The guest's free receive space for this connection.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc();
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt());
    }

    /// Whether host data may flow to the guest (both ends still open that way).
    fn host_to_guest_open(&self) -> bool {
        self.state == State::Established
            && self.local_shutdown & SHUTDOWN_SEND == 0
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Owes the guest a data packet when the host stream may have data and the guest room.
    fn refresh_rw(&mut self) {
        if self.readable && self.host_to_guest_open() && self.peer_free() > 0 {
            self.pending |= P_RW;
        }
    }

    /// A packet from the guest for this connection.
    pub fn on_packet(&mut self, pkt: &TxPacket, mem: &GuestMemoryMmap) -> Verdict {
        let h = &pkt.hdr;
        self.update_peer_credit(h);
        let verdict = self.dispatch(pkt, mem);
        // New credit may let host data flow again.
        self.refresh_rw();
        verdict
    }

    fn dispatch(&mut self, pkt: &TxPacket, mem: &GuestMemoryMmap) -> Verdict {
        let h = &pkt.hdr;
        match (h.op(), self.state) {
            (Some(Op::Rst), _) => Verdict::Drop,
            (Some(Op::Response), State::LocalInit) if self.pending & P_REQUEST == 0 => {
                self.state = State::Established;
                self.deadline = None;
                self.ctl_out = format!("OK {}\n", self.host_port).into_bytes();
                self.flush()
            }
            (Some(Op::Rw), State::Established) => self.accept_data(pkt, mem),
            // Data racing with our shutdown or close is dropped (the guest did not know yet).
            (Some(Op::Rw), State::Closing) => Verdict::Keep,
            (Some(Op::CreditUpdate), _) => Verdict::Keep,
            (Some(Op::CreditRequest), _) => {
                self.pending |= P_CREDIT_UPDATE;
                Verdict::Keep
            }
            (Some(Op::Shutdown), State::Established | State::Closing) => {
                self.peer_shutdown |= h.flags() & SHUTDOWN_BOTH;
                self.after_peer_shutdown()
            }
            // A request for an existing connection, a response nobody asked for, data before
            // the connection is up, an unknown operation: the connection is broken.
            _ => Verdict::Reset,
        }
    }

    fn after_peer_shutdown(&mut self) -> Verdict {
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket: finish writing, then answer RST.
            self.state = State::Closing;
            self.pending &= !P_RW;
            self.deadline.get_or_insert(Instant::now() + CLOSE_TIMEOUT);
            if self.tx_buf.is_empty() {
                return Verdict::Reset;
            }
            return Verdict::Keep;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Verdict::Keep
    }

    /// Guest data: written to the host stream, the rest buffered within the credit.
    fn accept_data(&mut self, pkt: &TxPacket, mem: &GuestMemoryMmap) -> Verdict {
        let len = pkt.hdr.len();
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Reset;
        }
        if self.tx_buf.len() as u64 + u64::from(len) > u64::from(CONN_BUF) {
            crate::virtio::ratelimited_warn(&format!(
                "virtio-vsock: guest port {} sent beyond its credit; connection reset",
                self.guest_port
            ));
            return Verdict::Reset;
        }
        self.rx_cnt += Wrapping(len);
        for &(addr, plen) in &pkt.payload {
            let mut off = 0u32;
            if self.tx_buf.is_empty() && self.ctl_out.is_empty() {
                // Straight from guest memory to the host stream.
                let Ok(slice) = mem.get_slice(addr, plen as usize) else {
                    return Verdict::Reset;
                };
                match (&self.stream).write_volatile(&slice) {
                    Ok(n) => {
                        // `n` <= `plen`, a u32; anything else is a broken stream.
                        let Ok(n) = u32::try_from(n) else {
                            return Verdict::Reset;
                        };
                        off = n;
                        self.fwd_cnt += Wrapping(off);
                    }
                    Err(vm_memory::VolatileMemoryError::IOError(e))
                        if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return Verdict::Reset,
                }
            }
            if off < plen {
                let start = self.tx_buf.len();
                let n = (plen - off) as usize;
                self.tx_buf.resize(start + n, 0);
                let (a, b) = self.tx_buf.as_mut_slices();
                // `resize` made room at the end: copy into the tail, in at most two parts.
                let from = vm_memory::GuestAddress(addr.0 + u64::from(off));
                if copy_into_tail(mem, from, n, a, b).is_err() {
                    return Verdict::Reset;
                }
            }
        }
        self.check_credit_update();
        Verdict::Keep
    }

    /// The guest needs fresh credit once its view of our free space is below half the buffer
    /// and we have forwarded something since we last told it.
    fn check_credit_update(&mut self) {
        let seen_free = CONN_BUF.saturating_sub((self.rx_cnt - self.last_fwd_cnt_sent).0);
        if seen_free < CONN_BUF / 2 && self.fwd_cnt != self.last_fwd_cnt_sent {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Writes buffered bytes to the host stream (it became writable).
    pub fn flush(&mut self) -> Verdict {
        while !self.ctl_out.is_empty() {
            match (&self.stream).write(&self.ctl_out) {
                Ok(n) => {
                    self.ctl_out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Verdict::Keep,
                Err(_) => return Verdict::Reset,
            }
        }
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match (&self.stream).write(a) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    // `n` <= the buffer, which credit bounds by CONN_BUF (a u32).
                    let Ok(n32) = u32::try_from(n) else {
                        return Verdict::Reset;
                    };
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Verdict::Reset,
            }
        }
        self.check_credit_update();
        if self.tx_buf.is_empty() {
            if self.state == State::Closing && self.peer_shutdown == SHUTDOWN_BOTH {
                return Verdict::Reset;
            }
            if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Verdict::Keep
    }

    /// The host stream has data, end of file, hung up or failed: what it has is read (in
    /// data packets, as the guest's credit allows) until a read says end of file or error.
    pub fn on_readable(&mut self) -> Verdict {
        self.readable = true;
        match self.state {
            // A host that gives up before the guest answered: nothing to deliver.
            State::LocalInit => Verdict::Reset,
            _ => {
                self.refresh_rw();
                Verdict::Keep
            }
        }
    }

    /// Whether the deadline passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// The guest port's reset packet (after the connection is removed).
    pub fn rst_header(&self, guest_cid: u64) -> Header {
        Header::to_guest(
            guest_cid,
            self.host_port,
            self.guest_port,
            Op::Rst,
            CONN_BUF,
            self.fwd_cnt.0,
        )
    }

    fn header(&mut self, guest_cid: u64, op: Op) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header::to_guest(
            guest_cid,
            self.host_port,
            self.guest_port,
            op,
            CONN_BUF,
            self.fwd_cnt.0,
        )
    }

    /// Fills `buf` with the next packet owed to the guest; returns the bytes written (header
    /// + payload), or `None` when nothing could be put there (the buffer stays unused), and
    ///   the verdict on the connection.
    pub fn next_rx(
        &mut self,
        buf: &RxBuffer,
        mem: &GuestMemoryMmap,
        guest_cid: u64,
    ) -> (Option<u32>, Verdict) {
        let hdr_only = |c: &mut Connection, op: Op, flags: u32| {
            let h = c.header(guest_cid, op).with_flags(flags);
            match buf.write_header(mem, &h) {
                Ok(()) => (Some(super::header::HEADER_LEN_U32), Verdict::Keep),
                Err(_) => (None, Verdict::Reset),
            }
        };
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return hdr_only(self, Op::Request, 0);
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            return hdr_only(self, Op::Response, 0);
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            return hdr_only(self, Op::Shutdown, self.local_shutdown);
        }
        if self.pending & P_RW != 0 {
            self.pending &= !P_RW;
            if let Some(done) = self.read_into(buf, mem, guest_cid) {
                return done;
            }
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            self.pending &= !P_CREDIT_UPDATE;
            return hdr_only(self, Op::CreditUpdate, 0);
        }
        (None, Verdict::Keep)
    }

    /// Reads host data into `buf` as one data packet; `None` when there was nothing to read
    /// after all.
    fn read_into(
        &mut self,
        buf: &RxBuffer,
        mem: &GuestMemoryMmap,
        guest_cid: u64,
    ) -> Option<(Option<u32>, Verdict)> {
        if !self.host_to_guest_open() {
            return None;
        }
        let want = self.peer_free().min(buf.capacity()).min(MAX_PKT_LEN);
        if want == 0 {
            // No credit left: the guest's next credit update brings more.
            return None;
        }
        let mut got = 0u32;
        let mut eof = false;
        for &(addr, plen) in buf.payload() {
            if got == want {
                break;
            }
            let n = plen.min(want - got);
            let Ok(mut slice) = mem.get_slice(addr, n as usize) else {
                return Some((None, Verdict::Reset));
            };
            match (&self.stream).read_volatile(&mut slice) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(k) => {
                    // `k` <= the slice's `n` bytes, a u32.
                    let Ok(k) = u32::try_from(k) else {
                        return Some((None, Verdict::Reset));
                    };
                    got += k;
                    if k < n {
                        break;
                    }
                }
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == ErrorKind::WouldBlock =>
                {
                    self.readable = false;
                    break;
                }
                Err(_) if got == 0 => return Some((None, Verdict::Reset)),
                Err(_) => break,
            }
        }
        if got > 0 {
            self.tx_cnt += Wrapping(got);
            let h = self.header(guest_cid, Op::Rw).with_len(got);
            if buf.write_header(mem, &h).is_err() {
                return Some((None, Verdict::Reset));
            }
            if eof {
                self.host_eof();
            }
            // More may be waiting: keep pumping while the guest has room.
            self.refresh_rw();
            return Some((Some(super::header::HEADER_LEN_U32 + got), Verdict::Keep));
        }
        if eof {
            // The host will send nothing more: tell the guest in this very buffer.
            self.readable = false;
            self.local_shutdown |= SHUTDOWN_SEND;
            if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                // Both sides are done.
                return Some((None, Verdict::Reset));
            }
            return Some(hdr_shutdown(self, buf, mem, guest_cid));
        }
        None
    }

    /// The host stream reached end of file after data: a shutdown follows.
    fn host_eof(&mut self) {
        self.local_shutdown |= SHUTDOWN_SEND;
        self.pending |= P_SHUTDOWN;
    }
}

fn hdr_shutdown(
    c: &mut Connection,
    buf: &RxBuffer,
    mem: &GuestMemoryMmap,
    guest_cid: u64,
) -> (Option<u32>, Verdict) {
    let h = c
        .header(guest_cid, Op::Shutdown)
        .with_flags(c.local_shutdown);
    match buf.write_header(mem, &h) {
        Ok(()) => (Some(super::header::HEADER_LEN_U32), Verdict::Keep),
        Err(_) => (None, Verdict::Reset),
    }
}

/// Copies `n` guest bytes at `from` into the last `n` bytes of the ring buffer whose two
/// parts are `a` and `b`.
fn copy_into_tail(
    mem: &GuestMemoryMmap,
    from: vm_memory::GuestAddress,
    n: usize,
    a: &mut [u8],
    b: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    let total = a.len() + b.len();
    let start = total - n;
    if start >= a.len() {
        let s = start - a.len();
        mem.read_slice(&mut b[s..s + n], from)
    } else {
        let first = a.len() - start;
        mem.read_slice(&mut a[start..], from)?;
        mem.read_slice(
            &mut b[..n - first],
            vm_memory::GuestAddress(from.0 + first as u64),
        )
    }
}

/// Reads the next "CONNECT <port>\n" line of a host stream without consuming more than the
/// line; `Ok(None)` when the line is not complete yet.
pub fn peek_connect_line(stream: &UnixStream) -> std::io::Result<Option<u32>> {
    use std::os::unix::io::AsRawFd;
    const MAX_LINE: usize = 32;
    let mut buf = [0u8; MAX_LINE];
    // SAFETY: recv into a valid buffer of MAX_LINE bytes from an open socket; MSG_PEEK leaves
    // the data in the socket.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            MAX_LINE,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let Ok(n) = usize::try_from(n) else {
        return Err(std::io::Error::last_os_error());
    };
    if n == 0 {
        return Err(std::io::Error::from(ErrorKind::UnexpectedEof));
    }
    let Some(nl) = buf[..n].iter().position(|&b| b == b'\n') else {
        if n == MAX_LINE {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "no CONNECT line in the first 32 bytes",
            ));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..nl])
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "CONNECT line is not text"))?;
    let port = line
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidData, format!("bad command '{line}'"))
        })?;
    // Consume exactly the line.
    let mut line_buf = [0u8; MAX_LINE];
    let mut s = stream;
    s.read_exact(&mut line_buf[..nl + 1])?;
    Ok(Some(port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn connect_lines() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (&a).write_all(b"CONN").unwrap();
        assert_eq!(peek_connect_line(&b).unwrap(), None);
        (&a).write_all(b"ECT 52\nhello").unwrap();
        assert_eq!(peek_connect_line(&b).unwrap(), Some(52));
        let mut rest = [0u8; 5];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"CONNECT x\n").unwrap();
        assert!(peek_connect_line(&b).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[b'A'; 40]).unwrap();
        assert!(peek_connect_line(&b).is_err());
        drop(a);
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(peek_connect_line(&b).is_err());
    }
}
