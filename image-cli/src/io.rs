//! `thinvm image io`: qemu-io style scripted commands.

use std::path::Path;
use std::time::{Duration, Instant};

use block::pipeline::{IoRequest, Pipeline};
use block::{DiskImage, IoBuf};
use units::parse_size;

use crate::args::{AioArg, DetectZeroesArg};
use crate::error::{CliError, Result};
use crate::open::{open_image, pipeline, ImageAccess};

/// One parsed command.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Write {
        pattern: u8,
        zeroes: bool,
        unmap: bool,
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Read {
        pattern: Option<u8>,
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Discard {
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Flush,
}

fn parse_pattern(s: &str) -> Result<u8> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| CliError::Usage(format!("invalid pattern '{s}'")))?;
    u8::try_from(v).map_err(|_| CliError::Usage(format!("pattern '{s}' does not fit in a byte")))
}

fn parse(line: &str) -> Result<Cmd> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Err(CliError::Usage("empty command".into()));
    };
    let mut pattern = None;
    let mut zeroes = false;
    let mut unmap = false;
    let mut quiet = false;
    let mut pos: Vec<&str> = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                let p = it
                    .next()
                    .ok_or_else(|| CliError::Usage(format!("{name}: -P needs a pattern")))?;
                pattern = Some(parse_pattern(p)?);
            }
            "-z" if name == "write" => zeroes = true,
            "-u" if name == "write" => unmap = true,
            "-q" => quiet = true,
            w if w.starts_with('-')
                && w.len() > 1
                && !w[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                return Err(CliError::Usage(format!("{name}: unknown option '{w}'")))
            }
            w => pos.push(w),
        }
    }
    let off_len = |pos: &[&str]| -> Result<(u64, u64)> {
        match pos {
            [o, l] => Ok((parse_size(o)?, parse_size(l)?)),
            _ => Err(CliError::Usage(format!("{name}: expected OFFSET LENGTH"))),
        }
    };
    match name {
        "write" => {
            if unmap && !zeroes {
                return Err(CliError::Usage("write: -u requires -z".into()));
            }
            if zeroes && pattern.is_some() {
                return Err(CliError::Usage("write: -z and -P are exclusive".into()));
            }
            let (offset, len) = off_len(&pos)?;
            Ok(Cmd::Write {
                pattern: pattern.unwrap_or(0xcd),
                zeroes,
                unmap,
                offset,
                len,
                quiet,
            })
        }
        "read" => {
            let (offset, len) = off_len(&pos)?;
            Ok(Cmd::Read {
                pattern,
                offset,
                len,
                quiet,
            })
        }
        "discard" => {
            let (offset, len) = off_len(&pos)?;
            Ok(Cmd::Discard { offset, len, quiet })
        }
        "flush" => {
            if !pos.is_empty() {
                return Err(CliError::Usage("flush takes no arguments".into()));
            }
            Ok(Cmd::Flush)
        }
        other => Err(CliError::Usage(format!(
            "unknown command '{other}' (supported: write, read, discard, flush)"
        ))),
    }
}

/// qemu-io's `cvtstr`.
fn cvt(v: f64) -> String {
    const U: [(f64, &str); 4] = [
        (1099511627776.0, "TiB"),
        (1073741824.0, "GiB"),
        (1048576.0, "MiB"),
        (1024.0, "KiB"),
    ];
    for (d, u) in U {
        if v >= d {
            return format!("{:.3} {u}", v / d).replace(".000 ", " ");
        }
    }
    format!("{v:.0} bytes")
}

fn report(verb: &str, len: u64, offset: u64, t: Duration) {
    println!("{verb} {len}/{len} bytes at offset {offset}");
    let secs = t.as_secs_f64().max(1e-9);
    println!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        cvt(len as f64),
        t.as_secs_f64(),
        cvt(len as f64 / secs),
        1.0 / secs
    );
}

/// Chunked I/O so huge lengths do not need huge buffers.
const CHUNK: u64 = 8 << 20;

/// Reads and writes through a pipeline on the chosen I/O engine, one request at a time.
struct Io {
    pipeline: Pipeline,
}

impl Io {
    fn run(&mut self, img: &mut dyn DiskImage, req: IoRequest) -> block::Result<()> {
        // SAFETY: the request's buffers are borrowed by the callers below for this whole
        // call, and `drain` waits for the request to complete.
        unsafe { self.pipeline.submit(img, 0, req) };
        let mut out = Vec::new();
        self.pipeline.drain(img, &mut out);
        out.into_iter()
            .map(|(_, r)| r)
            .find(|r| r.is_err())
            .unwrap_or(Ok(()))
    }

    fn write(&mut self, img: &mut dyn DiskImage, offset: u64, buf: &[u8]) -> block::Result<()> {
        // SAFETY: `buf` is borrowed for this call, which waits for the request.
        let bufs = vec![unsafe { IoBuf::from_slice(buf) }];
        self.run(img, IoRequest::Write { offset, bufs })
    }

    fn read(&mut self, img: &mut dyn DiskImage, offset: u64, buf: &mut [u8]) -> block::Result<()> {
        // SAFETY: `buf` is borrowed (exclusively) for this call, which waits for the request.
        let bufs = vec![unsafe { IoBuf::from_mut_slice(buf) }];
        self.run(img, IoRequest::Read { offset, bufs })
    }
}

fn exec(img: &mut dyn DiskImage, io: &mut Io, file: &Path, cmd: &Cmd) -> Result<bool> {
    let err = |e| CliError::image(file, e);
    let t0 = Instant::now();
    match *cmd {
        Cmd::Write {
            pattern,
            zeroes,
            unmap,
            offset,
            len,
            quiet,
        } => {
            if zeroes {
                img.write_zeroes(offset, len, unmap).map_err(err)?;
            } else {
                let buf = vec![pattern; len.min(CHUNK) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK) as usize;
                    io.write(img, offset + done, &buf[..n]).map_err(err)?;
                    done += n as u64;
                }
            }
            if !quiet {
                report("wrote", len, offset, t0.elapsed());
            }
            Ok(true)
        }
        Cmd::Read {
            pattern,
            offset,
            len,
            quiet,
        } => {
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0;
            let mut ok = true;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                io.read(img, offset + done, &mut buf[..n]).map_err(err)?;
                if let Some(p) = pattern {
                    if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                        let at = offset + done + i as u64;
                        eprintln!(
                            "Pattern verification failed at offset {at} ({} bytes checked from offset {offset}): expected {p:#04x}, found {:#04x}",
                            done + i as u64,
                            buf[i]
                        );
                        ok = false;
                        break;
                    }
                }
                done += n as u64;
            }
            if !quiet && ok {
                report("read", len, offset, t0.elapsed());
            }
            Ok(ok)
        }
        Cmd::Discard { offset, len, quiet } => {
            img.discard(offset, len).map_err(err)?;
            if !quiet {
                report("discard", len, offset, t0.elapsed());
            }
            Ok(true)
        }
        Cmd::Flush => {
            img.flush().map_err(err)?;
            Ok(true)
        }
    }
}

/// Runs the commands in order; returns the exit code (1 if a command failed).
pub fn run(
    file: &Path,
    access: ImageAccess,
    detect_zeroes: DetectZeroesArg,
    aio: Option<AioArg>,
    commands: &[String],
) -> Result<u8> {
    // Parse everything first: a typo should not leave a half-applied script.
    let cmds: Vec<Cmd> = commands.iter().map(|c| parse(c)).collect::<Result<_>>()?;
    let mut img = open_image(file, access)?;
    img.set_detect_zeroes(detect_zeroes.into());
    let mut io = Io {
        pipeline: pipeline(aio)?,
    };
    let mut failed = false;
    for (cmd, text) in cmds.iter().zip(commands) {
        match exec(img.as_mut(), &mut io, file, cmd) {
            Ok(true) => {}
            Ok(false) => failed = true,
            Err(e) => {
                eprintln!("thinvm: {text}: {e}");
                failed = true;
            }
        }
    }
    // Closing flushes; report a failure there too.
    if !access.read_only {
        if let Err(e) = img.flush() {
            eprintln!("thinvm: {}", CliError::image(file, e));
            failed = true;
        }
    }
    Ok(u8::from(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("write -P 0xaa 64k 4k").unwrap(),
            Cmd::Write {
                pattern: 0xaa,
                zeroes: false,
                unmap: false,
                offset: 65536,
                len: 4096,
                quiet: false
            }
        );
        assert_eq!(
            parse("write -z -u 0 1M").unwrap(),
            Cmd::Write {
                pattern: 0xcd,
                zeroes: true,
                unmap: true,
                offset: 0,
                len: 1 << 20,
                quiet: false
            }
        );
        assert_eq!(
            parse("read -P 0 0 512").unwrap(),
            Cmd::Read {
                pattern: Some(0),
                offset: 0,
                len: 512,
                quiet: false
            }
        );
        assert_eq!(
            parse("discard 1m 64k").unwrap(),
            Cmd::Discard {
                offset: 1 << 20,
                len: 65536,
                quiet: false
            }
        );
        assert_eq!(parse("flush").unwrap(), Cmd::Flush);
        assert!(parse("write -u 0 1").is_err());
        assert!(parse("write -P 300 0 1").is_err());
        assert!(parse("read 0").is_err());
        assert!(parse("frobnicate 0 1").is_err());
        assert!(parse("write -x 0 1").is_err());
    }
}
