//! `thinvm image bench`: qemu-img bench's options, meanings and output.
//!
//! Requests are issued synchronously one after another through the block crate (the crate
//! has a synchronous engine); `-d DEPTH` is accepted for command-line compatibility and
//! reported, but does not change how many requests are in flight.

use std::path::PathBuf;
use std::time::Instant;

use block::host_file::AlignedBuf;

use crate::error::{CliError, Result};
use crate::size::parse_size;
use crate::{CacheArg, FormatArg};

/// Arguments of `thinvm image bench` (qemu-img bench's, plus `--random`).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    pub count: u64,
    /// Queue depth: requests are issued in batches of this many, their data I/O in parallel.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: u64,
    /// Request size.
    #[arg(short = 's', default_value = "4k")]
    pub size: String,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(short = 'S')]
    pub step: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    pub offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Byte pattern of written data (default 0, like qemu-img bench).
    #[arg(long)]
    pub pattern: Option<String>,
    /// Flush after every N write requests.
    #[arg(long)]
    pub flush_interval: Option<u64>,
    /// Do not drain in-flight requests before a flush (accepted for compatibility: requests
    /// run one at a time here).
    #[arg(long)]
    pub no_drain: bool,
    /// Cache mode.
    #[arg(short = 't', value_enum, default_value = "writeback")]
    pub cache: CacheArg,
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_enum)]
    pub format: Option<FormatArg>,
    /// Random offsets (aligned to the request size) instead of stepping.
    #[arg(long)]
    pub random: bool,
    /// Zero detection for writes.
    #[arg(long, value_enum, default_value = "off")]
    pub detect_zeroes: crate::DetectZeroesArg,
    /// Only print the summary line.
    #[arg(short = 'q')]
    pub quiet: bool,
    pub file: PathBuf,
}

/// xorshift64* for reproducible random offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let size = parse_size(&a.size)?;
    if size == 0 {
        return Err(CliError::Usage("request size must not be 0".into()));
    }
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => size,
    };
    let start = parse_size(&a.offset)?;
    if start + size > u64::MAX / 2 {
        return Err(CliError::Usage("offset too large".into()));
    }
    let pattern = match &a.pattern {
        Some(p) => {
            let v: u64 = if let Some(h) = p.strip_prefix("0x") {
                u64::from_str_radix(h, 16)
            } else {
                p.parse()
            }
            .map_err(|_| CliError::Usage(format!("invalid pattern '{p}'")))?;
            u8::try_from(v).map_err(|_| CliError::Usage(format!("invalid pattern '{p}'")))?
        }
        None => 0,
    };
    let mut img = crate::open_image(
        &a.file,
        crate::ImageAccess {
            format: a.format,
            read_only: !a.write,
            direct: a.cache == CacheArg::None,
            force_share: false,
        },
    )?;
    img.set_detect_zeroes(a.detect_zeroes.into());
    let vsize = img.virtual_size();
    if size > vsize {
        return Err(CliError::Usage(format!(
            "request size {size} is larger than the image ({vsize} bytes)"
        )));
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {}){}",
            a.count,
            if a.write { "write" } else { "read" },
            size,
            a.depth,
            start,
            step,
            if a.random { " [random offsets]" } else { "" }
        );
    }
    if start + size > vsize {
        return Err(CliError::Usage(format!(
            "offset {start} + request size {size} is beyond the image ({vsize} bytes)"
        )));
    }
    // -d N: up to N requests in flight. Requests go to the image in batches of up to 8 N
    // (reads: at most 64 MiB, the buffers they need), whose data I/O runs on N threads at a
    // time, so N stay in flight through most of a batch; metadata work runs in order.
    let depth = a.depth.clamp(1, 1024) as usize;
    let batch = if depth == 1 {
        1
    } else if a.write {
        depth * 8
    } else {
        (depth * 8).min(((64 << 20) / size) as usize).max(depth)
    };
    let wbuf = aligned(size as usize, pattern);
    let wbuf = wbuf.as_slice();
    let mut rbufs: Vec<AlignedBuf> = (0..if a.write { 0 } else { batch })
        .map(|_| aligned(size as usize, pattern))
        .collect();
    let mut scratch = Vec::new();
    let slots = vsize / size;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut off = start;
    let err = |e| CliError::image(&a.file, e);
    let mut next_offset = || {
        if a.random {
            (rng.next() % slots) * size
        } else {
            let o = off;
            // qemu-img bench's rule: advance by the step, wrap modulo the image size (and
            // keep the request inside the image).
            off = (off + step) % vsize;
            if off + size > vsize {
                off %= vsize - size + 1;
            }
            o
        }
    };
    let t0 = Instant::now();
    let mut done = 0u64;
    while done < a.count {
        let n = (a.count - done).min(batch as u64) as usize;
        let offsets: Vec<u64> = (0..n).map(|_| next_offset()).collect();
        if a.write {
            if n == 1 {
                img.write_at(offsets[0], wbuf).map_err(err)?;
            } else {
                let one: [&[u8]; 1] = [wbuf];
                let reqs: Vec<(u64, &[&[u8]])> = offsets.iter().map(|&o| (o, &one[..])).collect();
                img.write_many(&reqs, depth, &mut scratch).map_err(err)?;
            }
            if let Some(f) = a.flush_interval {
                if f > 0 && (done + n as u64) / f > done / f {
                    img.flush().map_err(err)?;
                }
            }
        } else if n == 1 {
            img.read_at(offsets[0], rbufs[0].as_mut_slice())
                .map_err(err)?;
        } else {
            let mut reqs: Vec<(u64, &mut [u8])> = offsets
                .iter()
                .zip(rbufs.iter_mut())
                .map(|(&o, b)| (o, b.as_mut_slice()))
                .collect();
            img.read_many(&mut reqs, depth).map_err(err)?;
        }
        done += n as u64;
    }
    // Like qemu-img bench, the final flush (on close) is not part of the measured run.
    let secs = t0.elapsed().as_secs_f64();
    if a.write {
        img.flush().map_err(err)?;
    }
    println!("Run completed in {secs:.3} seconds.");
    let ops = a.count as f64 / secs.max(1e-9);
    println!(
        "{ops:.0} ops/sec, {:.1} MiB/sec",
        ops * size as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// `len` bytes of `fill` at a 4 KiB-aligned address, as qemu-img bench allocates its
/// buffers, so that `-t none` (O_DIRECT) reads and writes them without a bounce copy.
fn aligned(len: usize, fill: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    b.as_mut_slice().fill(fill);
    b
}
