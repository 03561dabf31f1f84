//! Image locking with QEMU's lock bytes, so thinvm, QEMU, `qemu-nbd`, `qemu-io` and
//! `qemu-img` exclude each other the way two QEMU processes do.
//!
//! # QEMU's scheme (block/file-posix.c, util/osdep.c; the same bytes in QEMU 7.2 and today)
//!
//! Every open of an image file takes *permissions* and *shares* some of them with other
//! users. The permissions are bits (include/block/block-common.h): `CONSISTENT_READ` 0x01,
//! `WRITE` 0x02, `WRITE_UNCHANGED` 0x04, `RESIZE` 0x08 (QEMU 6.1 and older also had
//! `GRAPH_MOD` 0x10; QEMU 6.2 dropped it, and so do we). For bit `i` the file has two lock
//! bytes: `100 + i` (RAW_LOCK_PERM_BASE: "I hold permission i") and `200 + i`
//! (RAW_LOCK_SHARED_BASE: "nobody else may hold permission i"). An open:
//!
//! 1. takes a *shared* (read, `F_RDLCK`) OFD lock on the single byte `100 + i` for every
//!    permission it holds and on `200 + i` for every permission it does not share
//!    (`raw_apply_lock_bytes`; `F_OFD_SETLK`), then
//! 2. tests, with `F_OFD_GETLK` for an exclusive (`F_WRLCK`) lock, byte `200 + i` for every
//!    permission it holds and byte `100 + i` for every permission it does not share
//!    (`raw_check_lock_bytes`). A lock held by any *other* open file description means a
//!    conflict: "Failed to get "write" lock" (someone refuses to share a permission we want)
//!    or "Failed to get shared "write" lock" (someone holds a permission we refuse to share),
//!    "Is another process using the image \[PATH\]?".
//!
//! Only shared locks are ever taken, so taking them never fails because of another user;
//! the test in step 2 finds the conflicts. Two openers racing both see each other's bytes
//! and both fail, never both succeed. OFD locks belong to the open file description: they
//! go away when the file is closed or the process dies, and two opens inside one process
//! conflict just as two processes do. Locks are taken on read-only descriptors too (a read
//! lock needs only read access).
//!
//! What QEMU's users take, seen in /proc/locks and `strace -e fcntl` with QEMU 7.2
//! (qemu-io, qemu-nbd, qemu-img, qemu-system-x86_64 with a virtio-blk disk):
//!
//! | user | perm bytes | unshared bytes |
//! |---|---|---|
//! | writable qcow2: VM disk, `qemu-io`, `qemu-nbd` (no `-r`), `qemu-img check -r` | 100 101 103 (read, write, resize) | 201 203 (write, resize) |
//! | read-only qcow2: VM `readonly=on`, `qemu-io -r`, `qemu-nbd -r`, `qemu-img check`/`map`/`compare` | 100 | 201 203 |
//! | a qcow2 backing file, at any depth, whatever the top's mode | 100 | 201 203 |
//! | a raw backing file under a VM disk | 100 | 201 203 |
//! | a raw backing file under `qemu-io` (which shares writes of its image, and a raw node passes that down) | 100 | — |
//! | `qemu-img info` | — | 201 203 |
//! | `-U` / force-share (`qemu-io -r -U`, `qemu-img info -U`) | 100 (or none) | — |
//! | `qemu-img create` on the new file | 101 103 | 203 |
//! | `qemu-img create -b BASE`: the backing file, read for its size | no locks (force-share) | |
//! | raw, VM disk | 100 101 | 201 |
//! | raw, `qemu-io` / `qemu-nbd` writable | 100 101 | — / 203 |
//!
//! So a writer excludes every other writer and every reader of the same file (the qcow2
//! driver does not share WRITE or RESIZE of its file: the metadata would change under the
//! other user); readers of one file coexist; a backing file shares reads with any number of
//! overlays' chains but refuses writers. Force-share is QEMU's "I accept inconsistent
//! reads": it locks no shared bytes and tests none of the perm bytes, and QEMU allows it
//! only read-only ("force-share=on requires read-only=on").
//!
//! # thinvm's modes ([`LockMode`])
//!
//! * [`LockMode::Write`] — every writable open (qcow2 or raw): QEMU's writable qcow2 set.
//!   For raw, QEMU's tools share writes, but a raw VM disk does not; thinvm never shares
//!   them (its drivers cache the file's size and layout).
//! * [`LockMode::Read`] — read-only opens and every backing file. `thinvm image info` uses
//!   it too: it holds `CONSISTENT_READ`, which `qemu-img info` does not, but no user refuses
//!   to share that permission, so both conflict with exactly the same users. (On a raw file
//!   `info` only reads the size and, like `qemu-img info`, does not refuse anyone.)
//! * [`LockMode::ForceShare`] — read-only inspection while another process uses the image
//!   (`thinvm image info|map|check -U`): holds `CONSISTENT_READ`, shares everything.
//! * [`LockMode::Create`] — `create` over an existing file: QEMU's creation set, so creating
//!   over an image in use is refused before the file is truncated.
//!
//! Two opens of one file inside one process conflict like two processes. To say which it
//! is, the process keeps a record of the files it has locked (device and inode, while their
//! [`ImageLock`] lives): a conflict on a file in that record reads "already open in this
//! process" (the same image given twice, or a backing chain that leads back to its top —
//! QEMU fails the same way there, with its lock error).
//!
//! A conflict can also be a ghost: a child that another thread of this process is spawning
//! holds copies of all the process's descriptors from fork until exec (O_CLOEXEC closes
//! them only at exec), maybe one of an image this process has just closed, whose locks then
//! live on for that long. Measured here, with one thread spawning `true` in a loop, 299 of
//! 300 reopens of a just-closed image saw such a conflict, and on a loaded machine (load 18
//! on 2 cores) a child took longer than 0.25 s to reach its exec. So a conflict on a file
//! this process has locked and closed since (the record keeps the last 256 of them; a
//! force-share lock, which conflicts with nobody, does not count) counts only once it has
//! lasted for about 2 s (tested after 1, 2, 4 ... 1024 ms). A conflict on any other file
//! cannot be a ghost and counts at once, as in QEMU.
//!
//! # File systems without locks
//!
//! QEMU's `locking=auto` locks only where the kernel has OFD locks. Here a lock call that
//! fails because the kernel or the file system has no (OFD) locks — `EINVAL`, `ENOLCK`,
//! `EOPNOTSUPP`, `ENOSYS` — logs one warning per process and the open goes on unlocked.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// QEMU's block permission bits (include/block/block-common.h); bit `i` owns lock bytes
/// `100 + i` and `200 + i`.
pub mod perm {
    /// A consistent view of the contents.
    pub const CONSISTENT_READ: u8 = 0x01;
    /// Changing the visible contents.
    pub const WRITE: u8 = 0x02;
    /// Writes that leave the visible contents as they are.
    pub const WRITE_UNCHANGED: u8 = 0x04;
    /// Changing the size of the file.
    pub const RESIZE: u8 = 0x08;
    /// Every permission.
    pub const ALL: u8 = 0x0f;
}

/// First "holds permission i" byte (QEMU's RAW_LOCK_PERM_BASE).
pub const PERM_BASE: i64 = 100;
/// First "does not share permission i" byte (QEMU's RAW_LOCK_SHARED_BASE).
pub const SHARED_BASE: i64 = 200;

/// The permission names QEMU prints (`bdrv_perm_names`), by bit number.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What an open holds, and which of those permissions it lets other users hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Permissions held ([`perm`] bits).
    pub perm: u8,
    /// Permissions other users may hold at the same time.
    pub shared: u8,
}

/// How an image file is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// A writable image: consistent read, write and resize; shares consistent read and
    /// unchanged writes only.
    Write,
    /// A read-only image or a backing file: consistent read; refuses to share write and resize.
    Read,
    /// Read-only, accepting that another process may change the image (`-U`): consistent
    /// read; shares everything.
    ForceShare,
    /// Creating (and truncating) the file: write and resize; refuses to share resize.
    Create,
}

impl LockMode {
    /// The mode of an ordinary open. Force-share is refused for writable opens, as QEMU does.
    pub fn for_open(read_only: bool, force_share: bool) -> Result<Self> {
        match (read_only, force_share) {
            (false, true) => Err(Error::InvalidArgument(
                "force-share (-U) is only allowed for read-only opens".into(),
            )),
            (false, false) => Ok(LockMode::Write),
            (true, false) => Ok(LockMode::Read),
            (true, true) => Ok(LockMode::ForceShare),
        }
    }

    /// The permissions the mode takes and shares.
    pub fn permissions(self) -> Permissions {
        use perm::*;
        match self {
            LockMode::Write => Permissions {
                perm: CONSISTENT_READ | WRITE | RESIZE,
                shared: CONSISTENT_READ | WRITE_UNCHANGED,
            },
            LockMode::Read => Permissions {
                perm: CONSISTENT_READ,
                shared: CONSISTENT_READ | WRITE_UNCHANGED,
            },
            LockMode::ForceShare => Permissions {
                perm: CONSISTENT_READ,
                shared: ALL,
            },
            LockMode::Create => Permissions {
                perm: WRITE | RESIZE,
                shared: ALL & !RESIZE,
            },
        }
    }
}

/// A lock byte and the permission it stands for.
fn bytes(mask: u8, base: i64) -> impl Iterator<Item = (i64, &'static str)> {
    PERM_NAMES
        .iter()
        .enumerate()
        .filter(move |(i, _)| mask & (1 << i) != 0)
        .map(move |(i, name)| (base + i as i64, *name))
}

/// A file's identity: (device, inode).
type FileKey = (u64, u64);

/// What this process knows of its own locks.
struct Record {
    /// Files it holds locks on, with the number of [`ImageLock`]s of each.
    held: BTreeMap<FileKey, usize>,
    /// Files it held locks on and has closed since, most recent last (at most
    /// [`RELEASED_KEPT`]): only these can show ghost conflicts.
    released: VecDeque<FileKey>,
}

/// How many closed files [`Record::released`] remembers.
const RELEASED_KEPT: usize = 256;

static RECORD: Mutex<Record> = Mutex::new(Record {
    held: BTreeMap::new(),
    released: VecDeque::new(),
});

fn record() -> std::sync::MutexGuard<'static, Record> {
    RECORD.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's record of the locks of one open image file. The kernel drops the lock
/// bytes themselves when the file is closed; keep this next to the file and drop it with it.
#[derive(Debug)]
pub struct ImageLock {
    /// The file in [`Record::held`]; `None` where the file system has no locks.
    key: Option<FileKey>,
    /// Whether a leftover copy of this lock could conflict with anyone (force-share holds
    /// only the consistent-read byte, which nobody refuses to share).
    can_conflict: bool,
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut r = record();
            if let Some(n) = r.held.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    r.held.remove(&key);
                    r.released.retain(|k| *k != key);
                    if self.can_conflict {
                        if r.released.len() == RELEASED_KEPT {
                            r.released.pop_front();
                        }
                        r.released.push_back(key);
                    }
                }
            }
        }
    }
}

/// Takes the lock bytes of `mode` on `file` (the image at `path`) and checks that no other
/// open file description holds a conflicting one. On a conflict the error is
/// [`Error::Locked`]; the caller drops the file, which releases what was taken.
pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<ImageLock> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    let key = (meta.dev(), meta.ino());
    let p = mode.permissions();
    let fd = file.as_raw_fd();
    let locked = bytes(p.perm, PERM_BASE).chain(bytes(!p.shared & perm::ALL, SHARED_BASE));
    for (byte, name) in locked {
        match ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
            Ok(_) => {}
            Err(e) if unsupported(&e) => {
                warn_unlocked(path, &e);
                return Ok(ImageLock {
                    key: None,
                    can_conflict: false,
                });
            }
            // Only a write lock on the byte refuses a read lock: not QEMU's, but someone
            // else's claim on the file all the same.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Err(locked_error(path, key, name, false))
            }
            Err(e) => {
                return Err(Error::io(
                    format!("lock byte {byte} of {}", path.display()),
                    e,
                ))
            }
        }
    }
    // A conflict on a file this process has closed may be a spawning child's copy of the
    // closed descriptor (see the module documentation): it counts once it lasts.
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match find_conflict(fd, path, p)? {
            Test::Clear => break,
            Test::Unsupported => {
                return Ok(ImageLock {
                    key: None,
                    can_conflict: false,
                })
            }
            Test::Conflict(name, shared) => {
                let ghost_possible = record().released.contains(&key);
                if !ghost_possible || pause > RECHECK_UNTIL {
                    return Err(locked_error(path, key, name, shared));
                }
                std::thread::sleep(pause);
                pause *= 2;
            }
        }
    }
    *record().held.entry(key).or_insert(0) += 1;
    Ok(ImageLock {
        key: Some(key),
        can_conflict: mode != LockMode::ForceShare,
    })
}

/// Longest pause between two tests of a possible ghost conflict before it counts (the
/// pauses double from 1 ms: about 2 s in all).
const RECHECK_UNTIL: std::time::Duration = std::time::Duration::from_millis(1024);

/// What the lock bytes of other users say.
enum Test {
    Clear,
    /// A conflict: the permission, and whether it is one we refuse to share.
    Conflict(&'static str, bool),
    /// The file system cannot test locks.
    Unsupported,
}

/// Tests for someone who refuses to share a permission `p` holds, then for someone who
/// holds a permission `p` refuses to share (QEMU's `raw_check_lock_bytes`).
fn find_conflict(fd: libc::c_int, path: &Path, p: Permissions) -> Result<Test> {
    let tests = bytes(p.perm, SHARED_BASE)
        .map(|(b, n)| (b, n, false))
        .chain(bytes(!p.shared & perm::ALL, PERM_BASE).map(|(b, n)| (b, n, true)));
    for (byte, name, shared) in tests {
        match ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte) {
            Ok(t) if libc::c_int::from(t) == libc::F_UNLCK => {}
            Ok(_) => return Ok(Test::Conflict(name, shared)),
            Err(e) if unsupported(&e) => {
                warn_unlocked(path, &e);
                return Ok(Test::Unsupported);
            }
            Err(e) => {
                return Err(Error::io(
                    format!("test lock byte {byte} of {}", path.display()),
                    e,
                ))
            }
        }
    }
    Ok(Test::Clear)
}

fn locked_error(path: &Path, key: (u64, u64), permission: &'static str, shared: bool) -> Error {
    Error::Locked {
        path: path.to_path_buf(),
        permission,
        shared,
        in_this_process: record().held.contains_key(&key),
    }
}

/// One `fcntl` lock call on the single byte `byte`: `F_OFD_SETLK` takes (or drops) a lock,
/// `F_OFD_GETLK` returns the type of a conflicting lock (`F_UNLCK` when there is none).
fn ofd(
    fd: libc::c_int,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: i64,
) -> std::io::Result<libc::c_short> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    let short = |v: libc::c_int| {
        libc::c_short::try_from(v).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    fl.l_type = short(kind)?;
    fl.l_whence = short(libc::SEEK_SET)?;
    fl.l_start = byte;
    fl.l_len = 1;
    // OFD locks require l_pid to be 0 on the way in (it is, from zeroed()).
    loop {
        // SAFETY: F_OFD_SETLK / F_OFD_GETLK read and (GETLK) write one `struct flock`,
        // which `fl` is, alive and exclusively borrowed for the call; `fd` is an open file.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(fl.l_type);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether a lock call failed because the kernel or file system has no (OFD) locks.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Logs (once per process) that images go unlocked.
fn warn_unlocked(path: &Path, e: &std::io::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "{}: cannot lock the image ({e}): the file system has no OFD locks; images on it \
             are not protected against concurrent use by QEMU, qemu-nbd or another thinvm",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_take_qemus_bytes() {
        let held = |m: LockMode| {
            let p = m.permissions();
            let mut v: Vec<i64> = bytes(p.perm, PERM_BASE)
                .chain(bytes(!p.shared & perm::ALL, SHARED_BASE))
                .map(|(b, _)| b)
                .collect();
            v.sort();
            v
        };
        // As QEMU 7.2 was seen to lock them (the table at the top).
        assert_eq!(held(LockMode::Write), [100, 101, 103, 201, 203]);
        assert_eq!(held(LockMode::Read), [100, 201, 203]);
        assert_eq!(held(LockMode::ForceShare), [100]);
        assert_eq!(held(LockMode::Create), [101, 103, 203]);
    }

    #[test]
    fn force_share_is_read_only() {
        assert!(LockMode::for_open(false, true).is_err());
        assert_eq!(
            LockMode::for_open(true, true).unwrap(),
            LockMode::ForceShare
        );
    }
}
