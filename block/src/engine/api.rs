//! What every engine implements and runs: the [`Engine`] trait, the [`DataOp`]s it is
//! given and the [`Completion`]s it returns, and the engines' `aio=` names ([`Aio`]).

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host_file::{direct_ready, HostFile};
use crate::iobuf::IoBuf;

/// Which engine runs data I/O (`aio=` on the command line, QEMU's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Aio {
    IoUring,
    Threads,
    Sync,
}

impl Aio {
    pub fn name(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Threads => "threads",
            Aio::Sync => "sync",
        }
    }
}

impl std::str::FromStr for Aio {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "io_uring" => Ok(Aio::IoUring),
            "threads" => Ok(Aio::Threads),
            "sync" => Ok(Aio::Sync),
            other => Err(Error::InvalidArgument(format!(
                "unknown aio engine '{other}' (expected io_uring, threads or sync)"
            ))),
        }
    }
}

/// One data read or write: the concatenation of `bufs` at byte `offset` of `file`. A read
/// past the end of the file fills the rest with zeros.
#[derive(Clone, Debug)]
pub struct DataOp {
    pub file: Arc<HostFile>,
    pub write: bool,
    pub offset: u64,
    pub bufs: Vec<IoBuf>,
}

impl DataOp {
    pub fn len(&self) -> u64 {
        crate::iobuf::total_len(&self.bufs)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the operation must go through a bounce buffer (O_DIRECT, not aligned).
    pub fn needs_bounce(&self) -> bool {
        self.file.is_direct() && !direct_ready(&self.bufs, self.offset)
    }
}

/// A finished operation: its tag and result.
pub type Completion = (u64, io::Result<()>);

/// Runs data operations.
pub trait Engine: Send {
    fn aio(&self) -> Aio;

    /// Starts `op`; its completion is later returned by [`Engine::reap`] with `tag`.
    ///
    /// # Safety
    /// The memory of `op.bufs` must stay valid (see [`IoBuf::new`]) until the completion
    /// with `tag` has been reaped.
    unsafe fn submit(&mut self, tag: u64, op: DataOp);

    /// Hands submitted operations to the kernel (one system call for many on io_uring).
    fn kick(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Appends finished operations to `out`; with `wait`, blocks until at least one has
    /// finished (unless none is in flight).
    fn reap(&mut self, wait: bool, out: &mut Vec<Completion>);

    /// A file descriptor that becomes readable when completions are waiting to be reaped
    /// (`None`: operations complete inside [`Engine::submit`]).
    fn notifier(&self) -> Option<RawFd>;

    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
}

/// Runs `op` on the calling thread.
pub fn run_sync(op: &DataOp) -> io::Result<()> {
    if op.write {
        op.file.write_vectored_all_at(&op.bufs, op.offset)
    } else {
        op.file.read_vectored_or_zeros(&op.bufs, op.offset)
    }
}
