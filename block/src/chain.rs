//! What a file must be to be opened as an image, and the limits of a backing chain.
//!
//! Backing file names come from the images, so they are hostile: a name can point at any
//! host file, at a FIFO or a terminal, or back up the chain. Here:
//! * every image file is opened with `O_NONBLOCK | O_NOCTTY` and must be a regular file or a
//!   block device (QEMU's `file` / `host_device`): a FIFO, a terminal or other character
//!   device, a socket or a directory is refused at once, never waited on; `O_NONBLOCK` is
//!   cleared on the files that stay open;
//! * every file of a chain is a different file, by device and inode: a loop is found at its
//!   first repeat, whatever names, symlinks or hard links it goes through;
//! * a chain is at most [`MAX_CHAIN_DEPTH`] backing files deep;
//! * the metadata memory a whole chain may take is bounded ([`MAX_CHAIN_METADATA_BYTES`]):
//!   the L1 and refcount tables each layer reads at open (and its decompression buffer) are
//!   charged in full, and an image whose tables do not fit fails with a clear error; the L2
//!   and refcount-block caches (filled on use) get what is left, lower layers less, each at
//!   least [`MIN_CACHE_TABLES`] tables. So 64 layers that each claim 32 MiB L1 tables and
//!   caches cannot add up to gigabytes.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest backing chain opened below an image (QEMU has no fixed limit).
pub const MAX_CHAIN_DEPTH: u32 = 64;

/// Metadata memory a whole chain may take: tables read at open plus cache capacity. One
/// image of the largest kind QEMU opens (32 MiB L1, 8 MiB refcount table, full caches)
/// needs about 80 MiB.
pub const MAX_CHAIN_METADATA_BYTES: u64 = 256 << 20;

/// Fewest tables an L2 or refcount-block cache gets, however little budget is left.
pub const MIN_CACHE_TABLES: u64 = 4;

/// Flags every image file is opened with: a FIFO or a terminal must not block the open,
/// and a terminal must not become the process's controlling terminal.
pub(crate) const OPEN_FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;

/// What kind of file `meta` describes, for messages.
fn kind_name(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Checks a file just opened with [`OPEN_FLAGS`]: a regular file or a block device, else an
/// `InvalidInput` error naming what it is. Clears `O_NONBLOCK` on success.
pub(crate) fn check_opened_file(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let t = meta.file_type();
    if !t.is_file() && !t.is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be a disk image (only regular files and block devices can)",
                kind_name(&meta)
            ),
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the flags of `fd`, which `file` keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of `fd`, which `file` keeps open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A file's identity: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The files of one chain opened so far, and the metadata memory they were given.
#[derive(Debug)]
pub(crate) struct Chain {
    files: Vec<(FileId, PathBuf)>,
    metadata_bytes: u64,
    /// Whether a backing file whose format its overlay does not record may be probed into a
    /// format that names further files ([`crate::probe::ProbePolicy`]).
    pub(crate) follows_probed_names: bool,
}

impl Chain {
    /// An empty chain.
    pub(crate) fn new(follows_probed_names: bool) -> Self {
        Chain {
            files: Vec::new(),
            metadata_bytes: 0,
            follows_probed_names,
        }
    }

    /// Adds the next file of the chain (the top image first). Refuses a file that is already
    /// in the chain (a loop) and a chain deeper than [`MAX_CHAIN_DEPTH`].
    pub(crate) fn enter(&mut self, path: &Path, meta: &Metadata) -> Result<()> {
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some((_, first)) = self.files.iter().find(|(f, _)| *f == id) {
            return Err(Error::Chain(format!(
                "backing chain loop: {} is the same file as {} (device {:#x}, inode {}), which is already in the chain",
                path.display(),
                first.display(),
                id.dev,
                id.ino
            )));
        }
        if self.files.len() as u64 > u64::from(MAX_CHAIN_DEPTH) {
            return Err(Error::Chain(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} images (at {})",
                path.display()
            )));
        }
        self.files.push((id, path.to_path_buf()));
        Ok(())
    }

    /// Charges `bytes` that `path` allocates at open (`what` names them); refuses them when
    /// the chain's budget cannot hold them.
    pub(crate) fn charge(&mut self, path: &Path, what: &str, bytes: u64) -> Result<()> {
        match self.metadata_bytes.checked_add(bytes) {
            Some(total) if total <= MAX_CHAIN_METADATA_BYTES => {
                self.metadata_bytes = total;
                Ok(())
            }
            _ => Err(Error::Chain(format!(
                "{}: its {what} ({bytes} bytes) do not fit in the {} MiB of metadata memory a backing chain may use ({} bytes taken by the {} image(s) above and this one so far)",
                path.display(),
                MAX_CHAIN_METADATA_BYTES >> 20,
                self.metadata_bytes,
                self.files.len()
            ))),
        }
    }

    /// The capacities (in tables of `table_bytes`) of the L2 and refcount-block caches of
    /// `path`: what they want if the budget holds it, else what is left (the L2 cache first),
    /// but at least [`MIN_CACHE_TABLES`] each (an error when even those do not fit). The
    /// capacities granted are charged.
    pub(crate) fn grant_caches(
        &mut self,
        path: &Path,
        l2_wanted: u64,
        rc_wanted: u64,
        table_bytes: u64,
    ) -> Result<(u64, u64)> {
        let table_bytes = table_bytes.max(1);
        self.charge(
            path,
            "L2 and refcount block caches (their smallest size)",
            2 * MIN_CACHE_TABLES * table_bytes,
        )?;
        let mut more = |wanted: u64| {
            let left = MAX_CHAIN_METADATA_BYTES.saturating_sub(self.metadata_bytes);
            let extra = wanted
                .saturating_sub(MIN_CACHE_TABLES)
                .min(left / table_bytes);
            self.metadata_bytes += extra * table_bytes;
            MIN_CACHE_TABLES + extra
        };
        let l2 = more(l2_wanted);
        let rc = more(rc_wanted);
        Ok((l2, rc))
    }
}
