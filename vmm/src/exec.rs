//! `--exec`: the host side of the agent protocol (`thinvm_agent::protocol`). A thread
//! connects to the VM's vsock Unix socket, asks for the agent's port (`CONNECT 1025`; until
//! the guest's agent listens the device closes the stream at once, so it retries), sends the
//! command, streams its output to thinvm's stdout / stderr and thinvm's stdin to it, and ends
//! the VM with the command's status.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use thinvm_agent::protocol::{
    check_hello, exit_code, read_frame, write_frame, Kind, ProtocolError,
};
use thinvm_agent::AGENT_PORT;

use crate::error::{Result, VmmError};
use crate::lifecycle::{ExitReason, ExitState};

/// How long to wait between attempts while the agent is not up yet.
const RETRY: Duration = Duration::from_millis(50);
/// How long the agent may take to say hello once the guest accepted the connection: the
/// first attempt waits [`FIRST_HELLO_WAIT`], each silent one doubles it up to [`HELLO_WAIT`].
/// A restored guest resets its vsock connections when it handles the device's transport-reset
/// event; a connection it accepted just before is reset without a word to the device and
/// stays silent, so the first wait is short (it cost 10 s of every restored `--exec`).
const HELLO_WAIT: Duration = Duration::from_secs(10);
const FIRST_HELLO_WAIT: Duration = Duration::from_millis(250);
/// How many connections may end before the agent's hello (about 10 s of retries).
const HELLO_ATTEMPTS: u32 = 200;
/// How long one attempt waits for the device's answer to `CONNECT` (no answer while the
/// guest's vsock driver is not up).
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// What the thread needs.
pub struct ExecClient {
    pub uds: PathBuf,
    pub command: String,
    pub exit: Arc<ExitState>,
    /// Forward thinvm's standard input (not when the console reads it).
    pub forward_stdin: bool,
}

/// One attempt to reach the agent: the stream once the agent said hello.
fn connect(uds: &PathBuf, hello_wait: Duration) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(ANSWER_WAIT)).ok()?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .ok()?;
    // The answer line, byte by byte (what follows belongs to the agent).
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    if !line.starts_with(b"OK ") {
        return None;
    }
    // The agent says hello as soon as it accepts; a connection that stays silent (reset in
    // the guest without the device hearing of it) is given up and tried again.
    s.set_read_timeout(Some(hello_wait)).ok()?;
    Some(s)
}

impl ExecClient {
    /// Starts the thread (and, when stdin is forwarded, its helper that reads stdin: threads
    /// cannot be created once confined); `seccomp` is installed in each first.
    pub fn start(self, seccomp: Option<seccompiler::BpfProgram>) -> Result<JoinHandle<()>> {
        let (give_writer, take_writer) = std::sync::mpsc::channel::<UnixStream>();
        if self.forward_stdin {
            let prog = seccomp.clone();
            std::thread::Builder::new()
                .name("exec-stdin".into())
                .spawn(move || {
                    if let Some(p) = prog {
                        if crate::seccomp::apply(crate::seccomp::ThreadKind::Exec, &p).is_err() {
                            return;
                        }
                    }
                    // The agent's stream, once the command was sent.
                    if let Ok(w) = take_writer.recv() {
                        forward_stdin(w);
                    }
                })
                .map_err(|e| VmmError::io("exec stdin thread", e))?;
        }
        std::thread::Builder::new()
            .name("exec".into())
            .spawn(move || {
                if let Some(prog) = seccomp {
                    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Exec, &prog) {
                        self.exit.set(ExitReason::Fatal {
                            vcpu: 0,
                            msg: format!("exec thread: cannot install its seccomp filter: {e}"),
                        });
                        return;
                    }
                }
                self.run(give_writer);
            })
            .map_err(|e| VmmError::io("exec thread", e))
    }

    fn run(self, give_writer: std::sync::mpsc::Sender<UnixStream>) {
        let mut closed_before_hello = 0;
        let mut hello_wait = FIRST_HELLO_WAIT;
        let mut stream = loop {
            if self.exit.get().is_some() {
                return;
            }
            let Some(mut s) = connect(&self.uds, hello_wait) else {
                std::thread::sleep(RETRY);
                continue;
            };
            let asked = std::time::Instant::now();
            // Nothing was sent yet, so a connection that ends before the agent's hello is
            // tried again: a restored guest resets the vsock connections it had (the
            // device's transport-reset event), which can take a new one that raced it.
            match read_frame(&mut s) {
                Ok(Some(hello)) => match check_hello(&hello) {
                    Ok(()) if s.set_read_timeout(None).is_ok() => {
                        crate::lifecycle::timing_mark("exec-hello");
                        break s;
                    }
                    Ok(()) => std::thread::sleep(RETRY),
                    Err(e) => {
                        self.exit
                            .set(ExitReason::CommandNotStarted(format!("the agent: {e}")));
                        return;
                    }
                },
                Ok(None) | Err(_) if closed_before_hello < HELLO_ATTEMPTS => {
                    closed_before_hello += 1;
                    if asked.elapsed() >= hello_wait {
                        // Silent until the wait ended: a slow agent gets longer next time.
                        hello_wait = (hello_wait * 2).min(HELLO_WAIT);
                    }
                    tracing::debug!("--exec: the agent's connection ended before its hello; again");
                    std::thread::sleep(RETRY);
                }
                Ok(None) | Err(_) => {
                    self.exit.set(ExitReason::AgentLost(format!(
                        "{HELLO_ATTEMPTS} connections ended before the agent's hello"
                    )));
                    return;
                }
            }
        };
        if let Err(e) = self.talk(&mut stream, give_writer) {
            // The command was sent: its status is lost (the agent died, or the guest's vsock
            // connection was reset); if the VM ended, its own reason was set first and wins.
            self.exit.set(ExitReason::AgentLost(e.to_string()));
        }
    }

    fn talk(
        &self,
        s: &mut UnixStream,
        give_writer: std::sync::mpsc::Sender<UnixStream>,
    ) -> Result<()> {
        let err = VmmError::Agent;
        let clone_err = |e| VmmError::Agent(ProtocolError::Io(e));
        write_frame(s, Kind::Exec, self.command.as_bytes()).map_err(err)?;
        if self.forward_stdin {
            let w = s.try_clone().map_err(clone_err)?;
            let _ = give_writer.send(w);
        } else {
            write_frame(s, Kind::Stdin, &[]).map_err(err)?;
        }
        let mut reader = BufReader::with_capacity(128 << 10, s.try_clone().map_err(clone_err)?);
        loop {
            let Some(f) = read_frame(&mut reader).map_err(err)? else {
                return Err(VmmError::AgentClosed);
            };
            match f.kind {
                // (Output that cannot be written, e.g. a closed pipe, is dropped.)
                Kind::Stdout => {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&f.payload);
                    let _ = o.flush();
                }
                Kind::Stderr => {
                    let _ = std::io::stderr().lock().write_all(&f.payload);
                }
                Kind::Exit => {
                    let code = exit_code(&f.payload).ok_or(VmmError::AgentExitStatus)?;
                    crate::lifecycle::timing_mark("exec-exit");
                    self.exit.set(ExitReason::CommandExited(code));
                    return Ok(());
                }
                Kind::Error => {
                    self.exit.set(ExitReason::CommandNotStarted(
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    ));
                    return Ok(());
                }
                other => return Err(VmmError::AgentUnexpectedFrame(other)),
            }
        }
    }
}

/// thinvm's standard input to the command, as Stdin frames; an empty one at its end.
fn forward_stdin(mut w: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = write_frame(&mut w, Kind::Stdin, &[]);
                return;
            }
            Ok(n) => {
                if write_frame(&mut w, Kind::Stdin, &buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
