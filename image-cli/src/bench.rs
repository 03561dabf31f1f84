//! `thinvm image bench`: qemu-img bench's options, meanings and output.
//!
//! Requests go through the block crate's pipeline on the chosen I/O engine (`-i`, default
//! io_uring where the kernel allows it): `-d DEPTH` requests are kept in flight, a new one
//! issued as soon as one completes, as qemu-img bench does.

use std::path::PathBuf;
use std::time::Instant;

use block::host_file::AlignedBuf;
use block::pipeline::IoRequest;
use block::IoBuf;
use units::parse_size;

use crate::args::{AioArg, CacheArg, DetectZeroesArg, FormatArg};
use crate::error::{CliError, Result};
use crate::open::{open_image, pipeline, ImageAccess};

/// Arguments of `thinvm image bench` (qemu-img bench's, plus `--random`).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    pub count: u64,
    /// Queue depth: requests kept in flight.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: u64,
    /// I/O engine (default: io_uring where the kernel allows it, else threads).
    #[arg(short = 'i', long = "aio", value_enum)]
    pub aio: Option<AioArg>,
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
    pub detect_zeroes: DetectZeroesArg,
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
    let mut img = open_image(
        &a.file,
        ImageAccess {
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
    // -d N: N requests in flight, each replaced as soon as it completes.
    let depth = a.depth.clamp(1, 1024) as usize;
    let mut pipeline = pipeline(a.aio)?;
    let buf_len = usize::try_from(size)
        .map_err(|_| CliError::Usage(format!("request size {size} is too large")))?;
    let wbuf = aligned(buf_len, pattern);
    let mut rbufs: Vec<AlignedBuf> = (0..if a.write { 0 } else { depth })
        .map(|_| aligned(buf_len, pattern))
        .collect();
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
    let img = img.as_mut();
    let t0 = Instant::now();
    let mut issued = 0u64;
    let mut done = 0u64;
    let mut writes_since_flush = 0u64;
    let mut free: Vec<usize> = (0..depth).collect();
    let mut out = Vec::new();
    let mut first_error = None;
    while done < a.count {
        while issued < a.count {
            let Some(slot) = free.pop() else { break };
            let offset = next_offset();
            // SAFETY: `wbuf` and `rbufs` outlive the pipeline's requests (every one is waited
            // for below); a read buffer is used by one request at a time (its slot).
            let buf = unsafe {
                if a.write {
                    IoBuf::from_slice(wbuf.as_slice())
                } else {
                    IoBuf::from_mut_slice(rbufs[slot].as_mut_slice())
                }
            };
            let bufs = vec![buf];
            let req = if a.write {
                IoRequest::Write { offset, bufs }
            } else {
                IoRequest::Read { offset, bufs }
            };
            // SAFETY: the buffers (`wbuf`, `rbufs`) outlive the pipeline's requests: every
            // request is waited for below before they are dropped.
            unsafe { pipeline.submit(img, slot as u64, req) };
            issued += 1;
        }
        pipeline.poll(img, true, &mut out);
        for (slot, r) in out.drain(..) {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
            free.push(slot_index(slot));
            done += 1;
            writes_since_flush += u64::from(a.write);
        }
        if first_error.is_some() {
            break;
        }
        if let Some(f) = a.flush_interval {
            if f > 0 && writes_since_flush >= f {
                // Like qemu-img bench (without --no-drain): the requests in flight finish first.
                let mut rest = Vec::new();
                pipeline.drain(img, &mut rest);
                done += rest.len() as u64;
                free.extend(rest.into_iter().map(|(slot, _)| slot_index(slot)));
                img.flush().map_err(err)?;
                writes_since_flush = 0;
            }
        }
    }
    let mut rest = Vec::new();
    pipeline.drain(img, &mut rest);
    if let Some(e) = first_error.or_else(|| rest.into_iter().find_map(|(_, r)| r.err())) {
        return Err(err(e));
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

/// The slot a completed request's tag names: the tags are the slot indices this file
/// submitted (below the depth, at most 1024), so they fit a `usize`.
#[allow(clippy::cast_possible_truncation)]
fn slot_index(tag: u64) -> usize {
    tag as usize
}

/// `len` bytes of `fill` at a 4 KiB-aligned address, as qemu-img bench allocates its
/// buffers, so that `-t none` (O_DIRECT) reads and writes them without a bounce copy.
fn aligned(len: usize, fill: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    b.as_mut_slice().fill(fill);
    b
}
