//! `--api-socket PATH`: a Unix socket on which the running VM takes one JSON request per
//! connection and answers one JSON line (`thinvm ctl` is the client):
//! `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"snapshot","dir":"/abs/dir"}`,
//! `{"cmd":"status"}` -> `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! Requests are served on the main thread, between the event loop's other events.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::Deserialize;

use crate::error::{Result, VmmError};
use crate::vm_control::VmControl;

/// Largest request line.
const MAX_REQUEST: u64 = 64 << 10;

/// A request.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub cmd: String,
    #[serde(default)]
    pub dir: Option<String>,
}

/// The API socket and the VM it controls.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    control: VmControl,
}

impl ApiServer {
    /// Binds `path` (a stale socket there is replaced; any other file is an error).
    pub fn bind(path: &Path, control: VmControl) -> Result<ApiServer> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            } else {
                return Err(VmmError::ApiSocketNotSocket {
                    path: path.to_path_buf(),
                });
            }
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| VmmError::io(format!("--api-socket {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VmmError::io("api socket", e))?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            control,
        })
    }

    fn answer(&mut self, req: &Request) -> serde_json::Value {
        let done = |r: Result<()>| r.map(|()| serde_json::json!({ "ok": true }));
        reply(match req.cmd.as_str() {
            "pause" => done(self.control.pause()),
            "resume" => done(self.control.resume()),
            "status" => Ok(serde_json::json!({
                "ok": true,
                "state": if self.control.is_paused() { "paused" } else { "running" },
            })),
            "snapshot" => match &req.dir {
                Some(d) if Path::new(d).is_absolute() => {
                    let t0 = std::time::Instant::now();
                    self.control.snapshot(Path::new(d)).map(|()| {
                        serde_json::json!({
                            "ok": true,
                            "dir": d,
                            "ms": u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                        })
                    })
                }
                _ => Err(VmmError::ApiSnapshotDir),
            },
            other => Err(VmmError::ApiUnknownCommand {
                cmd: other.to_string(),
            }),
        })
    }

    fn serve(&mut self, stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let reader = match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        };
        let reply = match BufReader::new(reader)
            .take(MAX_REQUEST)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => self.answer(&req),
                Err(e) => reply(Err(VmmError::ApiBadRequest(e))),
            },
        };
        let mut s = stream;
        let _ = writeln!(s, "{reply}");
    }
}

/// The answer to a request: its result, or `{"ok": false, "error": ...}` with the error's
/// message.
fn reply(r: Result<serde_json::Value>) -> serde_json::Value {
    r.unwrap_or_else(|e| serde_json::json!({ "ok": false, "error": e.to_string() }))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.listener.as_raw_fd(), EventSet::IN)) {
            tracing::error!("api socket: cannot watch it: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((s, _)) = self.listener.accept() {
            self.serve(s);
        }
    }
}
