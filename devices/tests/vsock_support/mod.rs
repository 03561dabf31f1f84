//! A test "guest driver" for virtio-vsock: guest memory, the device behind the MMIO
//! transport, the three split rings, receive buffers kept posted, and packets sent and
//! received the way Linux's driver does (header and payload in two descriptors), with nothing
//! checked on the driver's side so tests can send hostile chains.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use devices::virtio::mmio::MmioTransport;
use devices::virtio::vsock::header::{Header, HEADER_LEN};
use devices::virtio::vsock::{Vsock, VsockConfig};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{r, setup_queue_at, w, write_desc, Ring, TempDir, F_NEXT, F_WRITE, MEM_SIZE};

pub const GUEST_CID: u64 = 3;
/// Receive buffers the driver keeps posted, each a header and 4 KiB (as Linux 6.1).
pub const RX_BUFS: u16 = 64;
pub const RX_BUF_LEN: u32 = 4096;
const RX_AREA: u64 = 0x50_0000;
const TX_AREA: u64 = 0x20_0000;
/// Transmit buffers in flight at once (each a header and up to 64 KiB).
const TX_SLOTS: u16 = 32;
const EV_AREA: u64 = 0x80_0000;
/// Queue size of the test rings.
pub const QSZ: u16 = 256;

pub struct VsockVm {
    pub mem: GuestMemoryMmap,
    pub t: MmioTransport,
    pub irq: EventFd,
    pub dir: TempDir,
    pub uds: PathBuf,
    pub rx: Ring,
    pub tx: Ring,
    pub ev: Ring,
    rx_seen: u16,
    tx_next: u16,
    ev_seen: u16,
    /// Receive buffers are posted at initialisation.
    post_rx: bool,
}

pub fn vm() -> VsockVm {
    vm_opts(false, true)
}

/// A VM with the device; `announce_reset` as after a restore.
pub fn vm_with(announce_reset: bool) -> VsockVm {
    vm_opts(announce_reset, true)
}

/// A VM whose driver posts no receive buffers until [`VsockVm::post_rx_buffers`].
pub fn vm_without_rx_buffers() -> VsockVm {
    vm_opts(false, false)
}

fn vm_opts(announce_reset: bool, post_rx: bool) -> VsockVm {
    let dir = TempDir::new("vsock");
    let uds = dir.join("v.sock");
    let dev = Vsock::new(
        VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
            announce_reset,
        },
        None,
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let mut vm = VsockVm {
        mem,
        t,
        irq,
        dir,
        uds,
        rx: Ring::at(0x1000, QSZ),
        tx: Ring::at(0x6000, QSZ),
        ev: Ring::at(0xb000, QSZ),
        rx_seen: 0,
        tx_next: 0,
        ev_seen: 0,
        post_rx,
    };
    vm.init();
    vm
}

impl VsockVm {
    /// Negotiates VERSION_1, sets the three queues up, posts the receive and event buffers.
    pub fn init(&mut self) {
        let t = &mut self.t;
        w(t, 0x70, 0);
        w(t, 0x70, 1);
        w(t, 0x70, 1 | 2);
        assert_eq!(r(t, 0x08), 19, "device id");
        w(t, 0x24, 0);
        w(t, 0x20, 0);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(t, 0x70, 1 | 2 | 8);
        assert_eq!(r(t, 0x70) & 8, 8, "FEATURES_OK");
        for (i, ring) in (0u32..).zip([self.rx, self.tx, self.ev].iter()) {
            ring.clear(&self.mem);
            setup_queue_at(t, i, ring);
        }
        self.rx_seen = 0;
        self.tx_next = 0;
        self.ev_seen = 0;
        for i in 0..RX_BUFS {
            self.rx.set_desc(
                &self.mem,
                2 * i,
                rx_buf(i),
                HEADER_LEN as u32,
                F_WRITE | F_NEXT,
                2 * i + 1,
            );
            self.rx.set_desc(
                &self.mem,
                2 * i + 1,
                rx_buf(i) + HEADER_LEN as u64,
                RX_BUF_LEN,
                F_WRITE,
                0,
            );
            if self.post_rx {
                self.rx.publish(&self.mem, 2 * i);
            }
        }
        for i in 0..8u16 {
            self.ev
                .set_desc(&self.mem, i, EV_AREA + 8 * u64::from(i), 4, F_WRITE, 0);
            self.ev.publish(&self.mem, i);
        }
        w(&mut self.t, 0x70, 1 | 2 | 8 | 4);
        assert_eq!(r(&mut self.t, 0x70) & 0x40, 0, "no NEEDS_RESET");
        self.kick(0);
        self.kick(2);
    }

    /// Posts every receive buffer (after [`vm_without_rx_buffers`]).
    pub fn post_rx_buffers(&mut self) {
        for i in 0..RX_BUFS {
            self.rx.publish(&self.mem, 2 * i);
        }
        self.kick(0);
    }

    /// Publishes receive descriptor `head` (written by the test) and notifies.
    pub fn post_rx_head(&mut self, head: u16) {
        self.rx.publish(&self.mem, head);
        self.kick(0);
    }

    pub fn kick(&mut self, q: u32) {
        w(&mut self.t, 0x50, q);
    }

    /// Sends one packet (header and payload in two descriptors, as Linux 6.1); waits until
    /// the device has taken it.
    pub fn send(&mut self, hdr: Header, payload: &[u8]) {
        let n = self.tx_next;
        let base = TX_AREA + u64::from(n % TX_SLOTS) * 0x1_1000;
        self.mem
            .write_slice(hdr.as_slice(), GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        let d = (n % (QSZ / 2)) * 2;
        if payload.is_empty() {
            self.tx
                .set_desc(&self.mem, d, base, HEADER_LEN as u32, 0, 0);
        } else {
            self.tx
                .set_desc(&self.mem, d, base, HEADER_LEN as u32, F_NEXT, d + 1);
            self.tx
                .set_desc(&self.mem, d + 1, base + 0x100, payload.len() as u32, 0, 0);
        }
        self.send_head(d);
    }

    /// Publishes `head` (descriptors already written) on the transmit ring and waits for it.
    pub fn send_head(&mut self, head: u16) {
        self.tx_next = self.tx_next.wrapping_add(1);
        self.tx.publish(&self.mem, head);
        self.kick(1);
        assert!(
            self.tx
                .wait_used(&self.mem, self.tx_next, Duration::from_secs(5)),
            "the device did not take transmit chain {}",
            self.tx_next
        );
    }

    /// Writes the descriptors of a hostile chain into the transmit table from `first`.
    pub fn raw_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            &self.mem,
            self.tx.desc + 16 * u64::from(i),
            addr,
            len,
            flags,
            next,
        );
    }

    /// The next packet from the device within `timeout` (its buffer is posted again).
    pub fn recv_within(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let t0 = Instant::now();
        while self.rx.used_idx(&self.mem) == self.rx_seen {
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let (head, len) = self.rx.used_elem(&self.mem, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let i = (head / 2) as u16;
        let hdr: Header = self.mem.read_obj(GuestAddress(rx_buf(i))).unwrap();
        assert!(len as usize >= HEADER_LEN, "used length {len}");
        assert_eq!(
            len as usize,
            HEADER_LEN + hdr.len() as usize,
            "used length vs header"
        );
        let mut data = vec![0u8; hdr.len() as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(rx_buf(i) + HEADER_LEN as u64))
            .unwrap();
        self.rx.publish(&self.mem, head as u16);
        self.kick(0);
        Some((hdr, data))
    }

    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(Duration::from_secs(5))
            .expect("no packet from the device within 5 s")
    }

    /// Whether a packet arrives within `d` (it is consumed).
    pub fn nothing_within(&mut self, d: Duration) -> bool {
        self.recv_within(d).is_none()
    }

    /// Transport-reset events received on the event queue.
    pub fn events(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while self.ev.used_idx(&self.mem) != self.ev_seen {
            let (head, len) = self.ev.used_elem(&self.mem, self.ev_seen);
            self.ev_seen = self.ev_seen.wrapping_add(1);
            assert_eq!(len, 4);
            out.push(
                self.mem
                    .read_obj(GuestAddress(EV_AREA + 8 * u64::from(head)))
                    .unwrap(),
            );
        }
        out
    }

    /// A host process connecting to the VM's socket and asking for guest port `port`
    /// (Firecracker's `CONNECT <port>` line): its end of the stream.
    pub fn host_connect(&self, port: u32) -> std::os::unix::net::UnixStream {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        s
    }

    pub fn host_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }
}

fn rx_buf(i: u16) -> u64 {
    RX_AREA + u64::from(i) * 0x1100
}

/// A guest packet header (guest CID, generous credit unless given).
/// Whether the host stream was closed by the device (end of file, or a reset when the device
/// closed it with unread bytes).
pub fn closed(s: &mut std::os::unix::net::UnixStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

pub fn gh(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header::from_guest(GUEST_CID, src_port, dst_port, op, len, 0, 256 << 10, 0)
}
