//! `thinvm ctl PATH pause|resume|status|snapshot DIR`: one request to a VM's `--api-socket`
//! (see [`crate::api`]); the binary prints the answer
//! and exits 0 when it succeeded, 1 otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::error::{Result, VmmError};

/// A request to a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Stop the vCPUs.
    Pause,
    /// Let them run again.
    Resume,
    /// Whether the VM runs or is paused.
    Status,
    /// Take a snapshot into `dir` (new or empty); the VM goes on (on new disk overlays).
    Snapshot { dir: String },
}

/// Sends `cmd` to the VM at `socket` and returns its answer (`{"ok": true, ...}` or
/// `{"ok": false, "error": ...}`), or why no answer came.
pub fn request(socket: &Path, cmd: &Request) -> Result<serde_json::Value> {
    let req = match cmd {
        Request::Pause => serde_json::json!({ "cmd": "pause" }),
        Request::Resume => serde_json::json!({ "cmd": "resume" }),
        Request::Status => serde_json::json!({ "cmd": "status" }),
        Request::Snapshot { dir } => serde_json::json!({
            "cmd": "snapshot",
            "dir": crate::vm_control::absolute(dir).display().to_string(),
        }),
    };
    let io_err = |op: &'static str| {
        move |source| VmmError::Ctl {
            socket: socket.to_path_buf(),
            op,
            source,
        }
    };
    let mut s = UnixStream::connect(socket).map_err(io_err("connect"))?;
    writeln!(s, "{req}").map_err(io_err("send the request"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(io_err("read the answer"))?;
    serde_json::from_str(line.trim()).map_err(|source| VmmError::CtlBadAnswer {
        answer: line.trim().to_string(),
        source,
    })
}
