//! `vsock-bench`: the host end of thinvm's vsock benchmarks, against `thinvm-agent
//! bench-server` in the guest, through thinvm's Unix socket or a real `AF_VSOCK` socket
//! (QEMU's vhost-vsock), so both are measured the same way.
//!
//! ```text
//! vsock-bench (--uds PATH | --cid CID) --port N to-guest BYTES     host -> guest stream
//! vsock-bench (--uds PATH | --cid CID) --port N from-guest BYTES   guest -> host stream
//! vsock-bench (--uds PATH | --cid CID) --port N ping COUNT         1-byte round trips
//! ```
//! Prints one JSON line: bytes and seconds (MiB/s), or round-trip percentiles in µs.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use thinvm_agent::vsock;

enum Conn {
    Unix(UnixStream),
    Vsock(File),
}

impl Conn {
    fn rw(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Vsock(f) => f,
        }
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Vsock(f) => vsock::shutdown_write(f),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn connect(uds: Option<&str>, cid: Option<u32>, port: u32) -> Result<Conn, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = match (uds, cid) {
            (Some(p), _) => connect_uds(p, port).map(Conn::Unix),
            (None, Some(c)) => vsock::connect(c, port)
                .map(Conn::Vsock)
                .map_err(|e| e.to_string()),
            _ => return Err("--uds or --cid is needed".into()),
        };
        match r {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn connect_uds(path: &str, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s.try_clone().map_err(|e| e.to_string())?)
        .take(32)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if !line.starts_with("OK ") {
        return Err(format!("no listener on guest port {port}"));
    }
    Ok(s)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let port: u32 = opt("--port")
        .and_then(|p| p.parse().ok())
        .ok_or("--port N is needed")?;
    let cid = opt("--cid").and_then(|c| c.parse().ok());
    let uds = opt("--uds");
    let pos: Vec<&String> = {
        let mut v = Vec::new();
        let mut skip = false;
        for a in &args {
            if skip {
                skip = false;
            } else if a.starts_with("--") {
                skip = true;
            } else {
                v.push(a);
            }
        }
        v
    };
    let (what, n) = match pos.as_slice() {
        [w, n] => (w.as_str(), n.parse::<u64>().map_err(|_| "a count is needed")?),
        _ => return Err("usage: vsock-bench (--uds PATH | --cid CID) --port N (to-guest|from-guest BYTES | ping COUNT)".into()),
    };
    let mut c = connect(uds.as_deref(), cid, port)?;
    let io = |e: std::io::Error| e.to_string();
    match what {
        "to-guest" => {
            let buf = vec![0x5au8; 256 << 10];
            let t0 = Instant::now();
            c.rw().write_all(b"s").map_err(io)?;
            let mut left = n;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                c.rw().write_all(&buf[..k]).map_err(io)?;
                left -= k as u64;
            }
            c.shutdown_write().map_err(io)?;
            let mut got = [0u8; 8];
            c.rw().read_exact(&mut got).map_err(io)?;
            let s = t0.elapsed().as_secs_f64();
            if u64::from_le_bytes(got) != n {
                return Err(format!(
                    "the guest got {} bytes of {n}",
                    u64::from_le_bytes(got)
                ));
            }
            println!(
                "{{\"test\":\"to-guest\",\"bytes\":{n},\"secs\":{s:.3},\"mib_s\":{:.1}}}",
                n as f64 / s / 1048576.0
            );
        }
        "from-guest" => {
            let t0 = Instant::now();
            c.rw().write_all(b"o").map_err(io)?;
            c.rw().write_all(&n.to_le_bytes()).map_err(io)?;
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0u64;
            loop {
                let k = c.rw().read(&mut buf).map_err(io)?;
                if k == 0 {
                    break;
                }
                got += k as u64;
            }
            let s = t0.elapsed().as_secs_f64();
            if got != n {
                return Err(format!("got {got} bytes of {n}"));
            }
            println!(
                "{{\"test\":\"from-guest\",\"bytes\":{n},\"secs\":{s:.3},\"mib_s\":{:.1}}}",
                n as f64 / s / 1048576.0
            );
        }
        "ping" => {
            c.rw().write_all(b"e").map_err(io)?;
            let mut rtts = Vec::with_capacity(n as usize);
            let mut b = [0u8; 1];
            for i in 0..n {
                let t0 = Instant::now();
                c.rw().write_all(&[i as u8]).map_err(io)?;
                c.rw().read_exact(&mut b).map_err(io)?;
                rtts.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            rtts.sort_by(|a, b| a.total_cmp(b));
            let pct = |p: f64| {
                rtts.get(((rtts.len() as f64 - 1.0) * p) as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            println!("{{\"test\":\"ping\",\"count\":{n},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1}}}", pct(0.5), pct(0.9), pct(0.99));
        }
        other => return Err(format!("unknown test {other}")),
    }
    Ok(())
}
