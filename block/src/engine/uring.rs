//! The io_uring engine (`aio=io_uring`): reads and writes are `readv` / `writev` entries on
//! one ring, many in flight at once; the kernel signals completions on an eventfd registered
//! with the ring. A short transfer is resubmitted for the rest; a read that reaches the end
//! of the file fills the rest with zeros. Operations that need a bounce buffer (O_DIRECT,
//! unaligned) or have more buffers than one `readv` takes run at once on the calling thread.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

use super::api::{run_sync, Aio, Completion, DataOp, Engine};
use super::eventfd::{drain_eventfd, new_eventfd, signal};
use crate::cast::usize_from;
use crate::host_file::DIRECT_ALIGN;

/// Submission queue entries of a ring (the completion queue has twice as many; the kernel
/// keeps overflowing completions rather than drop them).
pub const RING_ENTRIES: u32 = 256;
/// Most iovecs of one `readv` / `writev` (IOV_MAX).
const MAX_IOVECS: usize = 1024;
/// Buffered reads of at least this many bytes go to the kernel's I/O workers
/// (`IOSQE_ASYNC`) rather than being copied inline at submission.
const ASYNC_READ_MIN: u64 = 128 * 1024;

/// One operation in flight.
struct Slot {
    tag: u64,
    op: DataOp,
    /// The iovecs of the part not yet transferred (the kernel reads them while in flight).
    iov: Vec<libc::iovec>,
    /// Bytes transferred so far.
    done: u64,
    total: u64,
}

// SAFETY: the iovecs point into the operation's own buffers (IoBufs, which are Send); the
// slot is only touched by the thread that owns the engine.
unsafe impl Send for Slot {}

/// An io_uring and the operations in flight on it.
pub struct UringEngine {
    ring: IoUring,
    event: OwnedFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Finished on the calling thread, or after an error before submission.
    ready: Vec<Completion>,
    in_kernel: usize,
}

impl UringEngine {
    /// A ring with `entries` submission entries, its completions signalled on an eventfd.
    ///
    /// The ring accepts only `readv` and `writev` entries and no further registrations
    /// (`IORING_REGISTER_RESTRICTIONS`, Linux 5.10): the thread that submits may be confined
    /// by seccomp (thinvm's block worker), and a ring would otherwise let it open files or
    /// sockets the filter forbids. A kernel without restrictions fails here, and the caller
    /// falls back to another engine.
    ///
    /// `IORING_SETUP_SUBMIT_ALL` (Linux 5.18) where the kernel has it: an entry the kernel
    /// refuses as it takes it does not stop it from taking the ones behind it (which would
    /// otherwise sit in the submission queue until the next submission). Without it, what the
    /// kernel left in the queue is counted and handed over again at the next chance.
    pub fn new(entries: u32) -> io::Result<Self> {
        match Self::with_setup(entries, true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Self::with_setup(entries, false),
            r => r,
        }
    }

    fn with_setup(entries: u32, submit_all: bool) -> io::Result<Self> {
        let mut builder = IoUring::builder();
        builder.setup_r_disabled();
        if submit_all {
            builder.setup_submit_all();
        }
        let ring = builder.build(entries)?;
        let event = new_eventfd()?;
        let submitter = ring.submitter();
        submitter.register_eventfd(event.as_raw_fd())?;
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::ASYNC.bits()),
        ])?;
        submitter.register_enable_rings()?;
        Ok(UringEngine {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            in_kernel: 0,
        })
    }

    /// Queues the submission entry for the untransferred part of slot `idx`.
    fn push(&mut self, idx: usize) -> io::Result<()> {
        let Some(slot) = self.slots[idx].as_mut() else {
            return Ok(());
        };
        let at = slot.op.offset + slot.done;
        slot.iov = remaining_iovecs(&slot.op, slot.done);
        let fd = types::Fd(slot.op.file.as_raw_fd());
        // At most MAX_IOVECS (checked in `submit`).
        let iovecs = u32::try_from(slot.iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let entry = if slot.op.write {
            opcode::Writev::new(fd, slot.iov.as_ptr(), iovecs)
                .offset(at)
                .build()
        } else {
            opcode::Readv::new(fd, slot.iov.as_ptr(), iovecs)
                .offset(at)
                .build()
        }
        .user_data(idx as u64);
        // A large buffered read is a copy out of the page cache that the kernel would do
        // inline, on this thread, at submission: handed to the kernel's I/O workers instead,
        // the copies of many requests run in parallel (on idle CPUs: a guest waiting for its
        // reads leaves its vCPU's). Small reads stay inline (cheaper than a hand-off);
        // O_DIRECT reads are asynchronous anyway; buffered writes of one file are serialised
        // by the kernel's workers, so they gain nothing.
        let entry = if !slot.op.write
            && !slot.op.file.is_direct()
            && slot.total - slot.done >= ASYNC_READ_MIN
        {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        loop {
            // SAFETY: the entry's iovecs live in the slot, and the buffers they describe in
            // the operation (valid until reaped, `Engine::submit`'s contract); the slot is
            // kept until its completion arrives.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and try again.
            self.ring.submit()?;
        }
    }

    /// Entries in the submission queue the kernel has not taken yet (queued since the last
    /// submission, or left there by a submission that stopped early).
    fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    fn finish(&mut self, idx: usize, r: io::Result<()>) {
        if let Some(slot) = self.slots[idx].take() {
            self.ready.push((slot.tag, r));
            self.free.push(idx);
        }
    }

    /// Handles one completion entry: done, resubmitted for the rest, or failed.
    fn complete(&mut self, idx: usize, res: i32) {
        self.in_kernel -= 1;
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                self.resubmit(idx);
            } else {
                self.finish(idx, Err(e));
            }
            return;
        }
        // `res` is not negative here.
        slot.done += u64::from(res.unsigned_abs());
        if slot.done >= slot.total {
            self.finish(idx, Ok(()));
            return;
        }
        let end_of_file = res == 0
            || (slot.op.file.is_direct() && (slot.op.offset + slot.done) % DIRECT_ALIGN != 0);
        if end_of_file {
            if slot.op.write {
                self.finish(
                    idx,
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "writev stopped short",
                    )),
                );
            } else {
                // The rest of a read past the end of the file reads as zeros.
                let done = slot.done;
                crate::iobuf::zero_range(&slot.op.bufs, done..slot.total);
                self.finish(idx, Ok(()));
            }
            return;
        }
        self.resubmit(idx);
    }

    fn resubmit(&mut self, idx: usize) {
        match self.push(idx) {
            Ok(()) => self.in_kernel += 1,
            Err(e) => self.finish(idx, Err(e)),
        }
    }
}

/// The iovecs of `op`'s buffers from byte `skip` on.
fn remaining_iovecs(op: &DataOp, skip: u64) -> Vec<libc::iovec> {
    let total = op.len();
    crate::iobuf::pieces(&op.bufs, skip..total)
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

impl Engine for UringEngine {
    fn aio(&self) -> Aio {
        Aio::IoUring
    }

    unsafe fn submit(&mut self, tag: u64, op: DataOp) {
        let total = op.len();
        if op.needs_bounce() || op.bufs.len() > MAX_IOVECS || total == 0 {
            self.ready.push((tag, run_sync(&op)));
            signal(self.event.as_raw_fd());
            return;
        }
        let slot = Slot {
            tag,
            op,
            iov: Vec::new(),
            done: 0,
            total,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        match self.push(idx) {
            Ok(()) => self.in_kernel += 1,
            Err(e) => {
                self.finish(idx, Err(e));
                signal(self.event.as_raw_fd());
            }
        }
    }

    fn kick(&mut self) -> io::Result<()> {
        if self.unsubmitted() > 0 {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn reap(&mut self, wait: bool, out: &mut Vec<Completion>) {
        drain_eventfd(self.event.as_raw_fd());
        loop {
            let before = self.ready.len();
            let want = usize::from(wait && self.ready.is_empty() && self.in_kernel > 0);
            let submitted = if want > 0 || self.unsubmitted() > 0 {
                self.ring.submit_and_wait(want)
            } else {
                Ok(0)
            };
            match submitted {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The kernel could not take entries now (no memory for a request, or its
                // completion queue is full): what it did not take stays queued; reap what
                // completed (which makes room) and hand the rest over on the next round.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    // The ring is unusable: fail everything in flight rather than hang.
                    tracing::error!("io_uring: {e}");
                    for idx in 0..self.slots.len() {
                        if self.slots[idx].is_some() {
                            // (The same errno for each; io::Error is not Clone.)
                            let each = e.raw_os_error().map_or_else(
                                || io::Error::other(format!("io_uring: {e}")),
                                io::Error::from_raw_os_error,
                            );
                            self.finish(idx, Err(each));
                        }
                    }
                    self.in_kernel = 0;
                    break;
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (idx, res) in cqes {
                self.complete(usize_from(idx), res);
            }
            // A resubmitted rest may still be on its way: wait for it too.
            if !(wait && self.ready.len() == before && self.in_kernel > 0) {
                break;
            }
        }
        out.append(&mut self.ready);
    }

    fn notifier(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.in_kernel + self.ready.len()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into buffers of operations in flight: wait for them.
        while self.in_kernel > 0 {
            let mut out = Vec::new();
            self.reap(true, &mut out);
            if self.in_kernel > 0 && out.is_empty() && self.ring.submit_and_wait(1).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring takes readv and writev entries only: anything else (here `openat`, which a
    /// seccomp-confined thread may not call itself) completes with EACCES, unexecuted.
    #[test]
    fn the_ring_refuses_entries_other_than_readv_and_writev() {
        let mut engine = match UringEngine::new(4) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("io_uring not available here ({e}): not tested");
                return;
            }
        };
        let path = c"/";
        let entry = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build()
            .user_data(7);
        // SAFETY: the entry names a static path and no buffers.
        unsafe { engine.ring.submission().push(&entry) }.unwrap();
        engine.ring.submit_and_wait(1).unwrap();
        let cqe = engine.ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 7);
        assert_eq!(cqe.result(), -libc::EACCES, "openat ran on the ring");
        // Readv still works.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let mut buf = [0u8; 16];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let entry = opcode::Readv::new(types::Fd(file.as_raw_fd()), &iov, 1)
            .offset(0)
            .build()
            .user_data(8);
        // SAFETY: `iov` and `buf` outlive the wait below.
        unsafe { engine.ring.submission().push(&entry) }.unwrap();
        engine.ring.submit_and_wait(1).unwrap();
        let cqe = engine.ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 8);
        assert!(cqe.result() > 0, "readv failed: {}", cqe.result());
    }

    /// An entry the kernel refuses as it takes it (here one with a flag the ring's
    /// restrictions forbid) must not leave the entries behind it waiting in the submission
    /// queue: a read queued after it completes with non-blocking reaps only (the worker's
    /// way, woken by the eventfd), with and without `IORING_SETUP_SUBMIT_ALL`.
    #[test]
    fn a_refused_entry_does_not_strand_the_entries_behind_it() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
        std::fs::write(&p, &data).unwrap();
        let file = std::sync::Arc::new(crate::host_file::HostFile::open(&p, true, false).unwrap());
        for submit_all in [true, false] {
            let mut engine = match UringEngine::with_setup(8, submit_all) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("io_uring (submit_all {submit_all}) not available: {e}");
                    continue;
                }
            };
            let mut buf = vec![0u8; 4096];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: 16,
            };
            let refused = opcode::Readv::new(types::Fd(file.as_raw_fd()), &iov, 1)
                .build()
                .flags(squeue::Flags::FIXED_FILE)
                .user_data(u64::MAX);
            // SAFETY: `iov` and `buf` outlive the engine's reaping below (the kernel refuses
            // the entry without touching them).
            unsafe { engine.ring.submission().push(&refused) }.unwrap();
            // (Counted as in the kernel's hands, like the engine's own entries.)
            engine.in_kernel += 1;
            let mut out = vec![0u8; 4096];
            // SAFETY: `out` outlives the operation (reaped below).
            let b = unsafe { crate::iobuf::IoBuf::from_mut_slice(&mut out) };
            let op = DataOp {
                file: file.clone(),
                write: false,
                offset: 4096,
                bufs: vec![b],
            };
            // SAFETY: as above.
            unsafe { engine.submit(5, op) };
            engine.kick().unwrap();
            let mut done = Vec::new();
            for _ in 0..200 {
                engine.reap(false, &mut done);
                if !done.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert_eq!(
                done.len(),
                1,
                "submit_all {submit_all}: the read never completed"
            );
            assert_eq!(done[0].0, 5);
            assert!(done[0].1.is_ok(), "{:?}", done[0].1);
            assert_eq!(&out[..], &data[4096..], "submit_all {submit_all}");
            assert_eq!(engine.in_flight(), 0, "submit_all {submit_all}");
        }
    }

    /// Large buffered reads go to the kernel's workers (`IOSQE_ASYNC`, allowed by the ring's
    /// restrictions): many of them at once, in pieces, each lands where asked.
    #[test]
    fn large_buffered_reads_in_flight_together_land_where_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let size = 8usize << 20;
        let data: Vec<u8> = (0..size)
            .map(|i| ((i / 4096 % 253) ^ (i % 7)).to_le_bytes()[0])
            .collect();
        std::fs::write(&p, &data).unwrap();
        let file = std::sync::Arc::new(crate::host_file::HostFile::open(&p, true, false).unwrap());
        let mut engine = match UringEngine::new(RING_ENTRIES) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("io_uring not available here ({e}): not tested");
                return;
            }
        };
        let mut out = vec![0u8; size];
        // SAFETY: `out` outlives every operation (all reaped below).
        let whole = unsafe { crate::iobuf::IoBuf::from_mut_slice(&mut out) };
        // Eight 1 MiB reads in reverse order, each in three uneven pieces.
        for i in 0..8usize {
            let at = (7 - i) << 20;
            let b = whole.sub(at, 1 << 20);
            let op = DataOp {
                file: file.clone(),
                write: false,
                offset: at as u64,
                bufs: vec![
                    b.sub(0, 4096),
                    b.sub(4096, 300_000),
                    b.sub(304_096, (1 << 20) - 304_096),
                ],
            };
            // SAFETY: as above.
            unsafe { engine.submit(i as u64, op) };
        }
        engine.kick().unwrap();
        let mut done = Vec::new();
        while engine.in_flight() > 0 {
            engine.reap(true, &mut done);
        }
        assert_eq!(done.len(), 8);
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        assert!(out == data, "a read landed elsewhere or not at all");
    }
}
