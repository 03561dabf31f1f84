//! `thinvm-agent`: the test agent in thinvm's default guest (a static binary in its
//! initramfs and root file system).
//!
//! ```text
//! thinvm-agent serve [--port N]                 run commands for the host (vsock port 1025)
//! thinvm-agent debug-exit STATUS [--port P]     end the VM with STATUS (thinvm --debug-exit)
//! thinvm-agent bench-server [--port N]          peer of vsock-bench (echo, sink, source)
//! ```
//! The protocol is in `thinvm_agent::protocol` and `docs/agent-protocol.md`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use thinvm_agent::protocol::{read_frame, write_frame, Kind, VERSION_TEXT};
use thinvm_agent::{ports, vsock, AGENT_PORT};

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port_arg = |default: u32| -> Result<u32, String> {
        match args.iter().position(|a| a == "--port") {
            None => Ok(default),
            Some(i) => {
                let v = args.get(i + 1).ok_or("--port needs a value")?;
                parse_int(v).ok_or_else(|| format!("--port {v}: not a number"))
            }
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("serve") => port_arg(AGENT_PORT).and_then(serve),
        Some("bench-server") => port_arg(5201).and_then(bench_server),
        Some("debug-exit") => port_arg(0x501).and_then(|port| {
            let status = args
                .get(1)
                .and_then(|s| parse_int(s))
                .ok_or("debug-exit needs a status (a number)")?;
            let port = u16::try_from(port).map_err(|_| "--port: not an I/O port")?;
            ports::debug_exit(port, status as u16).map_err(|e| format!("ioperm: {e}"))?;
            Err(format!("no debug-exit device at port {port:#x}"))
        }),
        _ => Err("usage: thinvm-agent serve [--port N] | debug-exit STATUS [--port P] | bench-server [--port N]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thinvm-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_int(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Listens on `port`, once the vsock transport is there (it may probe after init starts).
fn listen(port: u32) -> Result<vsock::Listener, String> {
    let mut last = String::new();
    for _ in 0..100 {
        match vsock::Listener::bind(port) {
            Ok(l) => return Ok(l),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(format!("cannot listen on vsock port {port}: {last}"))
}

/// Whether `accept` may work again after this error (everything but a broken listener).
fn accept_error_is_transient(e: &std::io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

fn serve(port: u32) -> Result<(), String> {
    let l = listen(port)?;
    loop {
        match l.accept() {
            Ok(conn) => {
                std::thread::spawn(move || {
                    if let Err(e) = run_one(conn) {
                        eprintln!("thinvm-agent: {e}");
                    }
                });
            }
            // A connection that ended while it waited (ECONNRESET: the host's VMM reset the
            // guest's vsock connections, as a restored clone's device does) or a short lack of
            // resources is that connection's problem, not the listener's: go on serving.
            Err(e) if accept_error_is_transient(&e) => {
                eprintln!("thinvm-agent: accept: {e} (still listening)");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Serves one connection: hello, the command, its output and status.
fn run_one(mut conn: File) -> Result<(), String> {
    let err = |e: thinvm_agent::protocol::ProtocolError| e.to_string();
    write_frame(&mut conn, Kind::Hello, VERSION_TEXT.as_bytes()).map_err(err)?;
    let cmd = match read_frame(&mut conn).map_err(err)? {
        Some(f) if f.kind == Kind::Exec => String::from_utf8_lossy(&f.payload).into_owned(),
        Some(f) => return Err(format!("expected a command, got {:?}", f.kind)),
        None => return Ok(()),
    };
    let writer = Arc::new(Mutex::new(conn.try_clone().map_err(|e| e.to_string())?));
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .env("PATH", PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot run /bin/sh -c: {e}");
            let mut w = writer.lock().map_err(|_| "lock")?;
            return write_frame(&mut *w, Kind::Error, msg.as_bytes()).map_err(err);
        }
    };
    let pump = |src: Option<Box<dyn Read + Send>>, kind: Kind| {
        let writer = writer.clone();
        std::thread::spawn(move || {
            let Some(mut src) = src else { return };
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let Ok(mut w) = writer.lock() else { return };
                if write_frame(&mut *w, kind, &buf[..n]).is_err() {
                    return;
                }
            }
        })
    };
    let out = pump(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        Kind::Stdout,
    );
    let errs = pump(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        Kind::Stderr,
    );
    // The host's standard input, until it closes it (or the connection ends).
    let mut stdin = child.stdin.take();
    let mut reader = conn.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        while let Ok(Some(f)) = read_frame(&mut reader) {
            if f.kind != Kind::Stdin {
                continue;
            }
            if f.payload.is_empty() {
                stdin = None;
                continue;
            }
            if let Some(s) = stdin.as_mut() {
                if s.write_all(&f.payload).is_err() {
                    stdin = None;
                }
            }
        }
    });
    let _ = out.join();
    let _ = errs.join();
    let status = child.wait().map_err(|e| e.to_string())?;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => -s,
        (None, None) => 255,
    };
    let mut w = writer.lock().map_err(|_| "lock")?;
    write_frame(&mut *w, Kind::Exit, &code.to_le_bytes()).map_err(err)?;
    // The reader thread ends when the connection does.
    let _ = vsock::shutdown_write(&w);
    Ok(())
}

/// The guest end of `vsock-bench`: the first byte of a connection picks the mode.
/// `e`: echo every byte back; `s`: sink (read to end of file, answer the byte count as u64
/// LE); `o`: source (read a u64 LE count, write that many bytes, close).
fn bench_server(port: u32) -> Result<(), String> {
    let l = listen(port)?;
    loop {
        let conn = l.accept().map_err(|e| format!("accept: {e}"))?;
        std::thread::spawn(move || {
            let _ = bench_one(conn);
        });
    }
}

fn bench_one(mut c: File) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    c.read_exact(&mut mode)?;
    let mut buf = vec![0u8; 256 << 10];
    match mode[0] {
        b'e' => loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            c.write_all(&buf[..n])?;
        },
        b's' => {
            let mut total = 0u64;
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            c.write_all(&total.to_le_bytes())
        }
        b'o' => {
            let mut n = [0u8; 8];
            c.read_exact(&mut n)?;
            let mut left = u64::from_le_bytes(n);
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                c.write_all(&buf[..k])?;
                left -= k as u64;
            }
            vsock::shutdown_write(&c)
        }
        _ => Ok(()),
    }
}
