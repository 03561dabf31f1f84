//! I/O engines: what runs the data reads and writes of a [`crate::plan::Plan`].
//!
//! The image formats decide what must be read and written where (plans of [`DataOp`]s);
//! an engine does it, as Cloud Hypervisor separates its qcow2 metadata from its
//! `engine_sync` / `engine_uring`. Three engines, with QEMU's `aio=` names:
//! * [`Aio::IoUring`] ([`uring::UringEngine`]): many operations in flight on one io_uring,
//!   completions signalled on an eventfd; the default where the kernel allows io_uring;
//! * [`Aio::Threads`] ([`threads::ThreadEngine`]): the operations run on a pool of I/O
//!   threads (QEMU's thread-pool AIO), the fallback where io_uring is missing or refused;
//! * [`Aio::Sync`] ([`sync::SyncEngine`]): each operation runs at once on the calling thread.
//!
//! Under `O_DIRECT`, an operation whose offset, buffers or lengths are not block-aligned goes
//! through a bounce buffer with a read-modify-write of its partial blocks: every engine runs
//! those at once on the calling thread, one after another, so two of them never race on a
//! shared block.

mod api;
mod eventfd;
pub mod sync;
pub mod threads;
pub mod uring;

use std::io;
use std::sync::OnceLock;

use crate::Error;

pub use api::{run_sync, Aio, Completion, DataOp, Engine};

/// The engine for `aio`, or an error saying why it cannot run here.
pub fn new_engine(aio: Aio) -> io::Result<Box<dyn Engine>> {
    Ok(match aio {
        Aio::IoUring => Box::new(uring::UringEngine::new(uring::RING_ENTRIES)?),
        Aio::Threads => Box::new(threads::ThreadEngine::new(crate::parallel::MAX_THREADS)?),
        Aio::Sync => Box::new(sync::SyncEngine::default()),
    })
}

/// Why the io_uring probe failed, kept so every later call can build its own error (an
/// `io::Error` cannot be cloned).
#[derive(Clone, Debug)]
enum ProbeFailure {
    /// A system call's errno (the usual case: ENOSYS, EPERM, ...).
    Os(i32),
    /// An error without an errno: its kind and message.
    Other(io::ErrorKind, String),
}

impl ProbeFailure {
    fn of(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => ProbeFailure::Os(errno),
            None => ProbeFailure::Other(e.kind(), e.to_string()),
        }
    }

    fn to_error(&self) -> io::Error {
        match self {
            ProbeFailure::Os(errno) => io::Error::from_raw_os_error(*errno),
            ProbeFailure::Other(kind, msg) => io::Error::new(*kind, msg.clone()),
        }
    }
}

/// Whether io_uring works in this process (probed once: a ring is set up and dropped), and
/// why not if it does not ([`Error::IoUringUnavailable`]).
pub fn io_uring_available() -> crate::Result<()> {
    static PROBE: OnceLock<std::result::Result<(), ProbeFailure>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            uring::UringEngine::new(4)
                .map(drop)
                .map_err(|e| ProbeFailure::of(&e))
        })
        .as_ref()
        .map_err(|f| Error::IoUringUnavailable(f.to_error()))
        .copied()
}

/// The default engine: io_uring where the kernel allows it, else the I/O threads. The
/// second value says why io_uring was not used (for a one-line notice at start).
pub fn default_aio() -> (Aio, Option<Error>) {
    match io_uring_available() {
        Ok(()) => (Aio::IoUring, None),
        Err(why) => (Aio::Threads, Some(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::usize_from;
    use crate::host_file::HostFile;
    use crate::iobuf::IoBuf;
    use std::sync::Arc;

    /// The same mix of reads and writes through every engine, buffered and O_DIRECT, with
    /// unaligned 512-byte writes sharing blocks (a read-modify-write each): every byte lands
    /// where it was asked, reads past the end of the file read zeros.
    #[test]
    fn every_engine_reads_and_writes_where_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for aio in [Aio::Sync, Aio::Threads, Aio::IoUring] {
            for direct in [false, true] {
                let p = dir.join(format!("f-{}-{direct}", aio.name()));
                std::fs::write(&p, vec![0u8; 64 * 4096]).unwrap();
                let Ok(file) = HostFile::open(&p, false, direct) else {
                    eprintln!("skipping O_DIRECT: not supported in {}", dir.display());
                    continue;
                };
                let file = Arc::new(file);
                let mut engine = match new_engine(aio) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("skipping {}: {e}", aio.name());
                        continue;
                    }
                };
                let mut store = crate::host_file::AlignedBuf::new(64 * 4096 + 64 * 512);
                let bytes = store.as_mut_slice();
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = u8::try_from(i / 512 % 256).unwrap() ^ 0x5a;
                }
                // SAFETY: `store` outlives every operation (all reaped below).
                let whole = unsafe { IoBuf::from_mut_slice(bytes) };
                // 32 whole blocks in reverse order, each in two pieces; 64 small writes.
                for i in 0..32u64 {
                    let b = whole.sub(usize_from(i) * 4096, 4096);
                    let op = DataOp {
                        file: file.clone(),
                        write: true,
                        offset: (63 - i) * 4096,
                        bufs: vec![b.sub(0, 1000), b.sub(1000, 4096)],
                    };
                    // SAFETY: `store` outlives every operation (all reaped below).
                    unsafe { engine.submit(i, op) };
                }
                for i in 0..64u64 {
                    let op = DataOp {
                        file: file.clone(),
                        write: true,
                        offset: i * 512,
                        bufs: vec![whole.sub(64 * 4096 + usize_from(i) * 512, 512)],
                    };
                    // SAFETY: as above.
                    unsafe { engine.submit(100 + i, op) };
                }
                engine.kick().unwrap();
                let mut done = Vec::new();
                while engine.in_flight() > 0 {
                    engine.reap(true, &mut done);
                }
                assert_eq!(done.len(), 96, "{aio:?} {direct}");
                assert!(done.iter().all(|(_, r)| r.is_ok()), "{aio:?} {direct}");
                let back = std::fs::read(&p).unwrap();
                for i in 0..32usize {
                    let at = (63 - i) * 4096;
                    let want = &store.as_slice()[i * 4096..(i + 1) * 4096];
                    assert_eq!(&back[at..at + 4096], want, "{aio:?} {direct} block {i}");
                }
                for i in 0..64usize {
                    let want = &store.as_slice()[64 * 4096 + i * 512..64 * 4096 + (i + 1) * 512];
                    assert_eq!(&back[i * 512..(i + 1) * 512], want, "{aio:?} {direct} {i}");
                }
                // Reads: one straddling the end of the file, one aligned.
                let mut rbuf = crate::host_file::AlignedBuf::new(3 * 4096);
                // SAFETY: `rbuf` outlives the operations (all reaped below).
                let r = unsafe { IoBuf::from_mut_slice(rbuf.as_mut_slice()) };
                let ops = [(63 * 4096, r.sub(0, 8192)), (8 * 512, r.sub(8192, 4096))];
                for (k, (off, b)) in ops.into_iter().enumerate() {
                    let op = DataOp {
                        file: file.clone(),
                        write: false,
                        offset: off,
                        bufs: vec![b],
                    };
                    // SAFETY: `rbuf` outlives the operations (reaped below).
                    unsafe { engine.submit(k as u64, op) };
                }
                engine.kick().unwrap();
                let mut done = Vec::new();
                while engine.in_flight() > 0 {
                    engine.reap(true, &mut done);
                }
                assert!(done.iter().all(|(_, r)| r.is_ok()), "{aio:?} {direct}");
                let got = rbuf.as_slice();
                assert_eq!(&got[..4096], &back[63 * 4096..], "{aio:?} {direct}");
                assert!(got[4096..8192].iter().all(|&b| b == 0), "past the end");
                assert_eq!(&got[8192..], &back[4096..8192], "{aio:?} {direct}");
            }
        }
    }
}
