//! The host side of the vsock device, Firecracker's scheme (its `docs/vsock.md`): one Unix
//! socket per VM at `PATH`.
//! * Host → guest: a host process connects to `PATH` and writes `CONNECT <port>\n`; the
//!   device asks the guest for a connection to `<port>` and, once the guest accepts, writes
//!   `OK <host port>\n` (the port the device gave the host end) and the stream carries data.
//!   No listener in the guest: the host stream is closed.
//! * Guest → host: a guest connection to host port `P` (CID 2) is connected to the Unix
//!   socket `PATH_P`; nobody listening there: the guest gets a `RST`.
//!
//! The muxer owns the connections and decides what the guest is owed next. Everything is
//! bounded: at most [`MAX_CONNECTIONS`] connections (pending `CONNECT` lines included), each
//! holding at most its advertised credit of guest data; connections owing the guest a
//! packet sit once each in a ready list; resets for packets that match no connection are
//! capped ([`MAX_RST_REPLIES`]) and all queued resets too ([`MAX_RST`]); a host stream must
//! send its `CONNECT` line within [`CONNECT_LINE_TIMEOUT`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{peek_connect_line, Connection, Verdict};
use super::header::{Header, Op, HOST_CID, TYPE_STREAM};
use super::packet::{RxBuffer, TxPacket};
use crate::virtio::ratelimited_warn;

/// Connections at once (established, being set up, or waiting for a `CONNECT` line).
pub const MAX_CONNECTIONS: usize = 1024;
/// Resets queued for the guest at most.
pub const MAX_RST: usize = MAX_CONNECTIONS;
/// Of those, resets answering guest packets that match no connection.
pub const MAX_RST_REPLIES: usize = 256;
/// How long a host stream has to send its `CONNECT` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// First port the device gives host ends of host-initiated connections (as Firecracker).
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;
/// Host connections accepted per listener event.
const ACCEPT_BATCH: usize = 64;
/// Epoll tokens from here on belong to the muxer's streams.
pub const FIRST_STREAM_TOKEN: u64 = 16;

/// A connection's identity: (host port, guest port).
pub type ConnKey = (u32, u32);

/// A host stream that has not sent its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    deadline: Instant,
}

struct Entry {
    conn: Connection,
    token: u64,
    /// In the ready list.
    queued: bool,
}

/// The host side: Unix sockets and connections.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Entry>,
    tokens: HashMap<u64, ConnKey>,
    pending: HashMap<u64, PendingHost>,
    next_token: u64,
    ready: VecDeque<ConnKey>,
    rst: VecDeque<Header>,
    next_port: u32,
    ephemeral: HashSet<u32>,
    /// Host `CONNECT` lines are left unread (the streams wait in `pending`) until
    /// [`Muxer::release_host_connects`]: a restored guest resets every connection it has
    /// when it handles the transport-reset event, so a connection it accepted before that
    /// would be reset without a word to the device.
    hold_host_connects: bool,
}

/// Edge-triggered readiness of a stream: read and write until the call says "would block".
fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Accepts a connection as a non-blocking stream (one system call: the device's thread may
/// not change descriptor flags with ioctl).
fn accept_nonblocking(listener: &UnixListener) -> std::io::Result<UnixStream> {
    // SAFETY: accept4 on a listening socket; no address is asked for; the new descriptor is
    // owned below.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connects to the Unix socket at `path` without blocking (a full backlog is a refusal).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| std::io::Error::from(ErrorKind::Unsupported))?;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a new socket; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "socket path too long"))?;
    // SAFETY: `addr` is a valid sockaddr_un and `len` covers the family and the path.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Muxer {
    /// Binds the VM's Unix socket at `path` (a stale socket there is replaced; any other file
    /// is an error).
    pub fn new(guest_cid: u64, path: &Path) -> std::io::Result<Muxer> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            ready: VecDeque::new(),
            rst: VecDeque::new(),
            next_port: FIRST_EPHEMERAL_PORT,
            ephemeral: HashSet::new(),
            hold_host_connects: false,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections (and pending host streams) open now.
    pub fn connections(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Drops every connection (a device reset): host streams are closed, queued packets
    /// forgotten.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.tokens.clear();
        self.pending.clear();
        self.ready.clear();
        self.rst.clear();
        self.ephemeral.clear();
        self.hold_host_connects = false;
    }

    /// Leaves host `CONNECT` lines unread until [`Muxer::release_host_connects`].
    pub fn hold_host_connects(&mut self) {
        self.hold_host_connects = true;
    }

    /// Takes the `CONNECT` lines of the host streams that waited (each asks the guest for
    /// its connection now).
    pub fn release_host_connects(&mut self) {
        if !std::mem::take(&mut self.hold_host_connects) {
            return;
        }
        let waiting: Vec<u64> = self.pending.keys().copied().collect();
        for token in waiting {
            self.on_pending(token);
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Accepts waiting host connections (the listener is readable).
    pub fn on_listener(&mut self, epoll: &Epoll) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match accept_nonblocking(&self.listener) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    ratelimited_warn(&format!("virtio-vsock: accept: {e}"));
                    return;
                }
            };
            if self.connections() >= MAX_CONNECTIONS {
                ratelimited_warn(&format!(
                    "virtio-vsock: {MAX_CONNECTIONS} connections open; a host connection is refused"
                ));
                continue;
            }
            let token = self.token();
            if epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(stream_events(), token),
                )
                .is_err()
            {
                continue;
            }
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    deadline: Instant::now() + CONNECT_LINE_TIMEOUT,
                },
            );
            // The line may be there already (edge-triggered: no event for it later).
            self.on_pending(token);
        }
    }

    /// A host stream waiting for its `CONNECT` line had an event.
    fn on_pending(&mut self, token: u64) {
        if self.hold_host_connects {
            // (Read once released; the deadline for the line still runs.)
            return;
        }
        let Some(p) = self.pending.get(&token) else {
            return;
        };
        match peek_connect_line(&p.stream) {
            Ok(None) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!("virtio-vsock: host connection closed: {e}");
                self.pending.remove(&token);
            }
            Ok(Some(guest_port)) => {
                let Some(p) = self.pending.remove(&token) else {
                    return;
                };
                let Some(host_port) = self.ephemeral_port() else {
                    return;
                };
                let key = (host_port, guest_port);
                self.ephemeral.insert(host_port);
                let conn = Connection::host_initiated(p.stream, host_port, guest_port);
                self.tokens.insert(token, key);
                self.conns.insert(
                    key,
                    Entry {
                        conn,
                        token,
                        queued: false,
                    },
                );
                self.schedule(key);
            }
        }
    }

    /// A free host port for a host-initiated connection.
    fn ephemeral_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = if p == u32::MAX {
                FIRST_EPHEMERAL_PORT
            } else {
                p + 1
            };
            if !self.ephemeral.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// A stream the muxer owns had `events`.
    pub fn on_stream_event(&mut self, token: u64, events: EventSet) {
        if self.pending.contains_key(&token) {
            self.on_pending(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        let mut verdict = Verdict::Keep;
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            verdict = e.conn.flush();
        }
        if verdict == Verdict::Keep
            && events.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            )
        {
            verdict = e.conn.on_readable();
        }
        self.apply(key, verdict);
    }

    /// Acts on a verdict about connection `key`.
    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Drop => self.remove(key),
            Verdict::Reset => {
                if let Some(e) = self.conns.get(&key) {
                    let h = e.conn.rst_header(self.guest_cid);
                    self.push_rst(h, false);
                }
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(e) = self.conns.remove(&key) {
            self.tokens.remove(&e.token);
            self.ephemeral.remove(&key.0);
            if e.queued {
                self.ready.retain(|k| *k != key);
            }
            // Dropping the stream closes it (and takes it out of the epoll set).
        }
    }

    /// Puts `key` in the ready list if it owes the guest a packet.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(e) = self.conns.get_mut(&key) {
            if e.conn.wants_rx() && !e.queued {
                e.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn push_rst(&mut self, h: Header, reply_to_unknown: bool) {
        let cap = if reply_to_unknown {
            MAX_RST_REPLIES
        } else {
            MAX_RST
        };
        if self.rst.len() >= cap {
            ratelimited_warn("virtio-vsock: too many resets waiting for the guest's receive buffers; one dropped");
            return;
        }
        self.rst.push_back(h);
    }

    /// A packet from the guest.
    pub fn on_packet(&mut self, pkt: &TxPacket, mem: &GuestMemoryMmap, epoll: &Epoll) {
        let h = &pkt.hdr;
        if h.src_cid() != self.guest_cid || h.dst_cid() != HOST_CID {
            ratelimited_warn(&format!(
                "virtio-vsock: packet from CID {} to CID {} dropped (guest is {}, host {HOST_CID})",
                h.src_cid(),
                h.dst_cid(),
                self.guest_cid
            ));
            return;
        }
        let key = (h.dst_port(), h.src_port());
        let reply_rst = |m: &mut Muxer| {
            if h.op() != Some(Op::Rst) {
                let r = Header::to_guest(m.guest_cid, key.0, key.1, Op::Rst, 0, 0);
                m.push_rst(r, true);
            }
        };
        if h.type_() != TYPE_STREAM {
            reply_rst(self);
            return;
        }
        if let Some(e) = self.conns.get_mut(&key) {
            let v = e.conn.on_packet(pkt, mem);
            self.apply(key, v);
            return;
        }
        if h.op() != Some(Op::Request) {
            reply_rst(self);
            return;
        }
        // A guest connection to host port P: the Unix socket PATH_P.
        if self.connections() >= MAX_CONNECTIONS {
            ratelimited_warn(&format!(
                "virtio-vsock: {MAX_CONNECTIONS} connections open; guest connection to port {} refused",
                key.0
            ));
            reply_rst(self);
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), key.0));
        let stream = match connect_nonblocking(&target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "virtio-vsock: guest connection to port {}: {}: {e}",
                    key.0,
                    target.display()
                );
                reply_rst(self);
                return;
            }
        };
        let token = self.token();
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(stream_events(), token),
        ) {
            ratelimited_warn(&format!("virtio-vsock: epoll: {e}"));
            reply_rst(self);
            return;
        }
        let conn = Connection::guest_initiated(stream, h);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                token,
                queued: false,
            },
        );
        self.schedule(key);
    }

    /// Whether a packet is owed to the guest.
    pub fn has_rx(&self) -> bool {
        !self.rst.is_empty() || !self.ready.is_empty()
    }

    /// Puts the next packet owed to the guest into `buf`; returns its length, or `None` when
    /// nothing was written (the buffer is not used).
    pub fn fill_rx(&mut self, buf: &RxBuffer, mem: &GuestMemoryMmap) -> Option<u32> {
        if let Some(h) = self.rst.pop_front() {
            return match buf.write_header(mem, &h) {
                Ok(()) => Some(super::header::HEADER_LEN_U32),
                Err(_) => None,
            };
        }
        for _ in 0..self.ready.len() {
            let key = self.ready.pop_front()?;
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.queued = false;
            let (len, verdict) = e.conn.next_rx(buf, mem, self.guest_cid);
            self.apply(key, verdict);
            if len.is_some() {
                return len;
            }
        }
        None
    }

    /// Ends what waited too long: host streams without a `CONNECT` line, requests the guest
    /// did not answer, closes that did not finish.
    pub fn sweep(&mut self, now: Instant) {
        self.pending.retain(|_, p| now < p.deadline);
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.expired(now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.apply(key, Verdict::Reset);
        }
    }

    /// Whether something has a deadline (the worker then wakes up now and then).
    pub fn has_deadlines(&self) -> bool {
        !self.pending.is_empty() || self.conns.values().any(|e| e.conn.deadline.is_some())
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
