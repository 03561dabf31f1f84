//! `AF_VSOCK` stream sockets (libc), wrapped as std files.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

/// The address of any CID (`VMADDR_CID_ANY`).
pub const CID_ANY: u32 = u32::MAX;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: a new socket; owned below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket.
pub struct Listener(OwnedFd);

impl Listener {
    /// Listens on `port` of any CID.
    pub fn bind(port: u32) -> io::Result<Listener> {
        let fd = socket()?;
        let a = addr(CID_ANY, port);
        // SAFETY: `a` is a valid sockaddr_vm of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &a as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listening on our socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener(fd))
    }

    /// The next connection.
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: accept on our listening socket; no address asked for.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is new and ours.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Connects to `port` of `cid` (the host's vhost-vsock side in benchmarks).
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let fd = socket()?;
    let a = addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &a as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// Half-closes the sending side of a socket.
pub fn shutdown_write(f: &File) -> io::Result<()> {
    // SAFETY: shutdown on an open socket.
    if unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
