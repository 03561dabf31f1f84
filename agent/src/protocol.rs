//! The agent protocol: length-prefixed frames over one vsock stream per command.
//!
//! A frame is `kind: u8`, `len: u32` little endian, then `len` payload bytes (at most
//! [`MAX_PAYLOAD`]). The agent speaks first ([`Kind::Hello`], payload [`VERSION_TEXT`]); the
//! host sends one [`Kind::Exec`] (the command, run with `/bin/sh -c`), then any number of
//! [`Kind::Stdin`] frames (an empty one closes the command's standard input); the agent sends
//! [`Kind::Stdout`] / [`Kind::Stderr`] frames as output arrives and ends with one
//! [`Kind::Exit`] (payload: i32 LE, the exit status 0..=255, or -N when the command was
//! killed by signal N) or [`Kind::Error`] (the command could not be started; payload: a
//! message). Then the agent closes the stream.

use std::io::{Read, Write};

/// The protocol's version, in the agent's hello.
pub const VERSION_TEXT: &str = "thinvm-agent 1";
/// Largest payload of one frame.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 0,
    Exec = 1,
    Stdin = 2,
    Stdout = 3,
    Stderr = 4,
    Exit = 5,
    Error = 6,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Hello,
            1 => Kind::Exec,
            2 => Kind::Stdin,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            5 => Kind::Exit,
            6 => Kind::Error,
            _ => return None,
        })
    }
}

/// Errors of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(u32),
    #[error("the other side is not a thinvm agent of this version (said {0:?})")]
    Version(String),
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Writes one frame (`payload` at most [`MAX_PAYLOAD`] bytes).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), ProtocolError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(ProtocolError::TooLong(u32::MAX))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of the stream (between frames).
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let kind = Kind::from_u8(head[0]).ok_or(ProtocolError::Kind(head[0]))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame { kind, payload }))
}

/// The exit status a process should report for an [`Kind::Exit`] payload: the status, or
/// 128 + N for a command killed by signal N (the shell's convention).
pub fn exit_code(payload: &[u8]) -> Option<u8> {
    let v = i32::from_le_bytes(payload.try_into().ok()?);
    Some(if v < 0 {
        (128 + v.unsigned_abs().min(127)) as u8
    } else {
        v.min(255) as u8
    })
}

/// Checks the agent's hello.
pub fn check_hello(f: &Frame) -> Result<(), ProtocolError> {
    if f.kind != Kind::Hello {
        return Err(ProtocolError::Unexpected(f.kind));
    }
    if f.payload != VERSION_TEXT.as_bytes() {
        return Err(ProtocolError::Version(
            String::from_utf8_lossy(&f.payload).into_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Exec, b"echo hi").unwrap();
        write_frame(&mut buf, Kind::Stdin, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some(Frame {
                kind: Kind::Exec,
                payload: b"echo hi".to_vec()
            })
        );
        assert_eq!(read_frame(&mut r).unwrap().unwrap().payload, b"");
        assert!(read_frame(&mut r).unwrap().is_none());
        assert!(matches!(
            read_frame(&mut &[9u8, 0, 0, 0, 0][..]),
            Err(ProtocolError::Kind(9))
        ));
        assert!(matches!(
            read_frame(&mut &[3u8, 0xff, 0xff, 0xff, 0xff][..]),
            Err(ProtocolError::TooLong(_))
        ));
        assert!(read_frame(&mut &[3u8, 4, 0][..]).is_err());
        assert!(read_frame(&mut &[3u8, 4, 0, 0, 0, 1][..]).is_err());
        assert_eq!(exit_code(&3i32.to_le_bytes()), Some(3));
        assert_eq!(exit_code(&(-9i32).to_le_bytes()), Some(137));
        assert_eq!(exit_code(&[1, 2]), None);
    }
}
