//! The one error type of the image crate.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while opening, reading or writing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host I/O call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A guest-visible request lies (partly) beyond the image's virtual size.
    #[error("request at offset {offset} length {len} is beyond the virtual size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write-type request on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// The image is not in the format it was expected to be in, or is damaged.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The image uses a feature this crate refuses to handle.
    #[error("unsupported image feature: {0}")]
    Unsupported(String),
    /// The image's metadata is inconsistent (it has been marked corrupt where possible).
    #[error("image corrupt: {0}")]
    Corrupt(String),
    /// Another open of the image (QEMU, qemu-nbd, qemu-io, another thinvm) holds QEMU's lock
    /// bytes in a way that conflicts with this open (see [`crate::lock`]). `shared`: the
    /// other user holds `permission`, which this open refuses to share; otherwise the other
    /// user refuses to share `permission`, which this open needs. `in_this_process`: this
    /// process has the file open (locked) too.
    #[error("{}", locked_message(path, permission, *shared, *in_this_process))]
    Locked {
        path: PathBuf,
        permission: &'static str,
        shared: bool,
        in_this_process: bool,
    },
    /// A backing file (`name`, as the overlay or the caller names it) failed to open: the
    /// error it failed with. `what` says which step ("backing file", "cannot open backing
    /// file", ...).
    #[error("{what} '{name}': {source}")]
    Backing {
        what: &'static str,
        name: String,
        #[source]
        source: Box<Error>,
    },
    /// Invalid argument from the caller (CLI, device layer).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Refused because the image's format was probed, not given (see `probe`): a probed
    /// image that names another file, or a write that would change what a probed-raw image
    /// probes as.
    #[error("{0}")]
    Probe(String),
    /// The backing chain is not one the crate opens (see `chain`): a loop, too deep, or more
    /// metadata than a chain may hold in memory.
    #[error("{0}")]
    Chain(String),
    /// io_uring cannot be set up in this process (a kernel without it, or one, a container or
    /// a seccomp filter that refuses it): the probe's error (see
    /// [`crate::engine::io_uring_available`]).
    #[error("{0}")]
    IoUringUnavailable(#[source] std::io::Error),
    /// [`crate::start_pool`] after the I/O thread pool started (it starts once per process).
    #[error("the block I/O thread pool is already running")]
    IoPoolRunning,
    /// The I/O thread pool could not be built (its threads could not be created).
    #[error("cannot start the block I/O threads: {0}")]
    IoPoolBuild(#[source] std::io::Error),
    /// An I/O thread's start code (see [`crate::ThreadStart`]) failed, e.g. installing its
    /// seccomp filter.
    #[error("I/O thread {thread}: {source}")]
    IoThreadStart {
        thread: usize,
        #[source]
        source: crate::parallel::ThreadStartError,
    },
    /// An I/O thread panicked while the pool was starting.
    #[error("an I/O thread panicked while starting")]
    IoPoolPanicked,
}

fn locked_message(path: &Path, permission: &str, shared: bool, in_this_process: bool) -> String {
    let lock = format!(
        "{}: failed to get {}\"{permission}\" lock",
        path.display(),
        if shared { "shared " } else { "" }
    );
    if in_this_process {
        format!("{lock}: the image is already open in this process (given twice, or a backing chain that leads back to it)")
    } else {
        format!("{lock}: the image is in use by another process (QEMU, qemu-nbd or another thinvm); to inspect it while it is in use, open it read-only with force-share (thinvm image info|map|check -U)")
    }
}

impl Error {
    /// Whether opening with O_DIRECT failed because the file system does not support it.
    pub fn is_direct_io_unsupported(&self) -> bool {
        matches!(self, Error::Open { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
    }

    /// Whether a host call failed because the file system is full (ENOSPC) or the user is
    /// over quota (EDQUOT): the request may succeed later, once space is freed.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                    || source.kind() == std::io::ErrorKind::StorageFull
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an `std::io::Error` with a short description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
