//! The virtio-vsock device's guest-facing path against a hostile guest: the input lays out
//! guest memory (descriptor tables, headers with any ports, operations, lengths and credit,
//! payload bytes), publishes transmit and receive chains on real virtio-queue `Queue`s, and
//! mixes in host activity (connections to the VM's socket with any command line, listeners
//! that accept and write, streams closed). Transmit chains are parsed by `TxPacket::parse`
//! and handed to the `Muxer`; receive chains parsed by `RxBuffer::parse` are filled by it;
//! stream events come from the same epoll set the device's thread uses. Nothing may panic or
//! hang; the muxer never holds more than `MAX_CONNECTIONS`; a filled buffer never claims more
//! than it has room for.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use devices::virtio::vsock::header::{Header, HEADER_LEN};
use devices::virtio::vsock::muxer::{Muxer, MAX_CONNECTIONS};
use devices::virtio::vsock::packet::{RxBuffer, TxPacket};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const MEM: u64 = 2 << 20;
const CID: u64 = 3;
const TX_RING: u64 = 0x1000;
const RX_RING: u64 = 0x8000;
const LISTENER_TOKEN: u64 = 4;

fn queue(base: u64, size: u16) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(base)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(base + 16 * 256)).ok()?;
    q.try_set_used_ring_address(GuestAddress(base + 16 * 256 + 1024)).ok()?;
    q.set_ready(true);
    Some(q)
}

fn publish(mem: &GuestMemoryMmap, base: u64, size: u16, head: u16) {
    let avail = base + 16 * 256;
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
    let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % size)));
    let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
}

fn run(u: &mut Unstructured, dir: &std::path::Path) -> Result<()> {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return Ok(());
    };
    let path = dir.join("v.sock");
    let Ok(mut muxer) = Muxer::new(CID, &path) else {
        return Ok(());
    };
    let Ok(epoll) = Epoll::new() else {
        return Ok(());
    };
    let _ = epoll.ctl(
        ControlOperation::Add,
        muxer.listener_fd(),
        EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
    );
    let listeners: Vec<UnixListener> = [1u32, 2]
        .iter()
        .filter_map(|p| {
            let l = UnixListener::bind(format!("{}_{p}", path.display())).ok()?;
            l.set_nonblocking(true).ok()?;
            Some(l)
        })
        .collect();
    let size = 1u16 << u.int_in_range(0u16..=8)?;
    let (Some(mut txq), Some(mut rxq)) = (queue(TX_RING, size), queue(RX_RING, size)) else {
        return Ok(());
    };
    let mut host_streams: Vec<UnixStream> = Vec::new();
    let mut events = vec![EpollEvent::default(); 64];
    for _ in 0..u.int_in_range(1usize..=200)? {
        match u.int_in_range(0u8..=9)? {
            // Guest memory: raw bytes anywhere.
            0 => {
                let at = u.int_in_range(0..=MEM - 1)?;
                let bytes: Vec<u8> = u.arbitrary()?;
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            // A descriptor of either table.
            1 => {
                let base = if u.arbitrary()? { TX_RING } else { RX_RING };
                let i = u.int_in_range(0..=size - 1)?;
                let addr: u64 = if u.ratio(1u8, 8)? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0x10_0000..=MEM - 1)?
                };
                let d: (u32, u16, u16) = u.arbitrary()?;
                let at = GuestAddress(base + 16 * u64::from(i));
                let _ = mem.write_obj(addr, at);
                let _ = mem.write_obj(d.0 % 0x1_2000, GuestAddress(at.0 + 8));
                let _ = mem.write_obj(d.1 & 7, GuestAddress(at.0 + 12));
                let _ = mem.write_obj(d.2 % size.max(1), GuestAddress(at.0 + 14));
            }
            // A well-formed guest header (often to the host, from our CID) somewhere.
            2 => {
                let at = u.int_in_range(0x10_0000..=MEM - 64)?;
                let h = Header::from_guest(
                    if u.ratio(7u8, 8)? { CID } else { u.arbitrary()? },
                    u.int_in_range(0u32..=8)?,
                    u.int_in_range(0u32..=3)? + if u.arbitrary()? { 1 << 30 } else { 0 },
                    u.int_in_range(0u16..=8)?,
                    u.int_in_range(0u32..=70_000)?,
                    u.int_in_range(0u32..=3)?,
                    u.arbitrary()?,
                    u.arbitrary()?,
                );
                let _ = mem.write_slice(h.as_slice(), GuestAddress(at));
            }
            // Publish and take a transmit chain.
            3 => {
                publish(&mem, TX_RING, size, u.int_in_range(0..=size - 1)?);
                if let Some(chain) = txq.pop_descriptor_chain(&mem) {
                    let head = chain.head_index();
                    if let Ok(pkt) = TxPacket::parse(chain, &mem) {
                        muxer.on_packet(&pkt, &mem, &epoll);
                    }
                    let _ = txq.add_used(&mem, head, 0);
                }
            }
            // Publish and fill a receive buffer.
            4 => {
                publish(&mem, RX_RING, size, u.int_in_range(0..=size - 1)?);
                if let Some(chain) = rxq.pop_descriptor_chain(&mem) {
                    let head = chain.head_index();
                    let len = match RxBuffer::parse(chain, &mem) {
                        Ok(buf) => match muxer.fill_rx(&buf, &mem) {
                            Some(len) => {
                                assert!(len as usize >= HEADER_LEN);
                                assert!(len - HEADER_LEN as u32 <= buf.capacity());
                                len
                            }
                            None => 0,
                        },
                        Err(_) => 0,
                    };
                    let _ = rxq.add_used(&mem, head, len);
                }
            }
            // The host connects with some command line and data.
            5 => {
                if let Ok(mut s) = UnixStream::connect(&path) {
                    let line: Vec<u8> = if u.arbitrary()? {
                        format!("CONNECT {}\n", u.int_in_range(0u32..=8)?).into_bytes()
                    } else {
                        u.arbitrary()?
                    };
                    let _ = s.set_nonblocking(true);
                    let _ = s.write(&line);
                    host_streams.push(s);
                }
            }
            // A host listener accepts and writes.
            6 => {
                for l in &listeners {
                    if let Ok((mut s, _)) = l.accept() {
                        let _ = s.set_nonblocking(true);
                        let data: Vec<u8> = u.arbitrary()?;
                        let _ = s.write(&data);
                        host_streams.push(s);
                    }
                }
            }
            // A host stream writes more, half-closes or goes away.
            7 => {
                if !host_streams.is_empty() {
                    let i = u.int_in_range(0..=host_streams.len() - 1)?;
                    match u.int_in_range(0u8..=2)? {
                        0 => {
                            let data: Vec<u8> = u.arbitrary()?;
                            let _ = host_streams[i].write(&data);
                        }
                        1 => {
                            let _ = host_streams[i].shutdown(std::net::Shutdown::Write);
                        }
                        _ => {
                            host_streams.swap_remove(i);
                        }
                    }
                }
            }
            // Deadlines pass.
            8 => muxer.sweep(Instant::now() + Duration::from_secs(u.int_in_range(0u64..=10)?)),
            // Stream events, as the device's thread would take them.
            _ => {}
        }
        if let Ok(n) = epoll.wait(0, &mut events) {
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER_TOKEN => muxer.on_listener(&epoll),
                    t => muxer.on_stream_event(t, ev.event_set()),
                }
            }
        }
        assert!(muxer.connections() <= MAX_CONNECTIONS);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let dir = std::path::Path::new("/dev/shm").join(format!(
        "thinvm-fuzz-vsock-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let _ = run(&mut Unstructured::new(data), &dir);
    let _ = std::fs::remove_dir_all(&dir);
});
