//! Shared helpers of the block crate's integration tests: temporary directories (tempfile), QEMU's tools
//! as oracles, a seeded RNG and an in-memory model disk.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use block::qcow2::{CreateOptions, Qcow2Version};
use block::{DiskImage, ImageFormat, OpenOptions};

pub use tempfile::TempDir;

/// A self-deleting temporary directory for a test (`tag` names it), under
/// `$THINVM_TEST_TMP` if set; kept after the test when `$THINVM_KEEP_TMP` is set.
pub fn temp_dir(tag: &str) -> TempDir {
    let base = std::env::var_os("THINVM_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    temp_dir_in(&base, tag)
}

/// A temporary directory under `base` (e.g. a tmpfs for very large sparse files).
pub fn temp_dir_in(base: &Path, tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("thinvm-{tag}-"))
        .disable_cleanup(std::env::var_os("THINVM_KEEP_TMP").is_some())
        .tempdir_in(base)
        .unwrap()
}

/// Runs a command, returning (exit code, stdout, stderr).
///
/// A QEMU tool refused because the image looks in use runs again for up to about 2 s: a
/// child that another test thread is spawning holds copies of this process's descriptors
/// until its exec, among them maybe an image a test has just closed, whose locks live on
/// until then (block/src/lock.rs, which waits the same way). A real user stays.
pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let r = run_once(cmd, args);
        if r.0 == 0
            || !r.2.contains("Is another process using the image")
            || pause.as_millis() > 1024
        {
            return r;
        }
        std::thread::sleep(pause);
        pause *= 2;
    }
}

/// Runs a command once, returning (exit code, stdout, stderr).
pub fn run_once(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it with scripts/install-deps): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, out, err) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed ({code}):\n{out}\n{err}");
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` exit code and output.
pub fn qemu_check(p: &Path) -> (i32, String) {
    let (code, out, err) = run("qemu-img", &["check", "-f", "qcow2", s(p)]);
    (code, format!("{out}{err}"))
}

/// Asserts `qemu-img check` finds the image clean.
pub fn assert_qemu_clean(p: &Path) {
    let (code, out) = qemu_check(p);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", p.display());
}

/// Asserts `qemu-img compare` says the two images read the same.
pub fn assert_same(a: &Path, b: &Path) {
    let (code, out, err) = run("qemu-img", &["compare", s(a), s(b)]);
    assert_eq!(
        code,
        0,
        "qemu-img compare {} {}: {out}{err}",
        a.display(),
        b.display()
    );
}

/// `qemu-img map --output=json` parsed.
pub fn qemu_map(p: &Path) -> Vec<serde_json::Value> {
    let out = ok("qemu-img", &["map", "--output=json", s(p)]);
    serde_json::from_str(&out).unwrap()
}

/// `qemu-img info --output=json` parsed.
pub fn qemu_info(p: &Path) -> serde_json::Value {
    let out = ok("qemu-img", &["info", "--output=json", "-U", s(p)]);
    serde_json::from_str(&out).unwrap()
}

/// Seeded xorshift64* RNG; the seed comes from `THINVM_SEED` when set.
pub struct Rng(pub u64);

impl Rng {
    pub fn seeded(default: u64) -> Self {
        let seed = std::env::var("THINVM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("seed = {seed} (set THINVM_SEED to reproduce)");
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes a raw file whose every 512-byte sector holds a recognisable pattern.
pub fn patterned_raw(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (i, sec) in data.chunks_mut(512).enumerate() {
        let tag = (i as u32).wrapping_mul(2654435761).to_le_bytes();
        for (j, b) in sec.iter_mut().enumerate() {
            *b = tag[j % 4] ^ (j as u8);
        }
        // Leave some sectors zero so zero detection in the backing is exercised.
        if i % 97 == 3 {
            sec.fill(0);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// The base image for an overlay: `raw` itself, or (with `compressed`) a deflate-compressed
/// qcow2 copy of it made by `qemu-img convert -c` in `dir`.
pub fn base_image(dir: &TempDir, raw: &Path, compressed: bool) -> (PathBuf, ImageFormat) {
    if compressed {
        let q = dir.path().join("base.qcow2");
        ok("qemu-img", &["convert", "-c", "-O", "qcow2", s(raw), s(&q)]);
        (q, ImageFormat::Qcow2)
    } else {
        (raw.to_path_buf(), ImageFormat::Raw)
    }
}

pub fn create_qcow2(
    path: &Path,
    size: Option<u64>,
    version: Qcow2Version,
    cluster_size: u64,
    refcount_bits: u32,
    backing: Option<(&str, ImageFormat)>,
) {
    block::qcow2::create(
        path,
        &CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits,
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| b.1),
        },
    )
    .unwrap();
}

/// Opens an image writable; its I/O runs on the next engine (see [`engine_image`]).
pub fn open_rw(path: &Path) -> Box<dyn DiskImage> {
    engine_image(
        block::open(
            path,
            &OpenOptions {
                read_only: false,
                // The tests' own images: their format is given, as a trusting user gives it.
                format: Some(block::probe_format(path).unwrap()),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Opens an image read-only; its I/O runs on the next engine (see [`engine_image`]).
pub fn open_ro(path: &Path) -> Box<dyn DiskImage> {
    engine_image(
        block::open(
            path,
            &OpenOptions {
                read_only: true,
                // The tests' own images: their format is given, as a trusting user gives it.
                format: Some(block::probe_format(path).unwrap()),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Reads the whole image.
pub fn read_all(img: &mut dyn DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

/// Asserts two byte slices are equal, reporting the first differing offset.
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// Where a read of a discarded piece is wrong: the first byte that reads neither as `zeroed`
/// (the model with the discard applied) nor as `kept` (the model without it: a discard may
/// keep a piece of a cluster), as "byte I reads X: neither ... nor ...". The three slices
/// have one length.
pub fn neither_zeroed_nor_kept(got: &[u8], zeroed: &[u8], kept: &[u8]) -> Option<String> {
    let i = (0..got.len()).find(|&i| got[i] != zeroed[i] && got[i] != kept[i])?;
    Some(format!(
        "byte {i} reads {:#x}, neither {:#x} (discards zeroed) nor {:#x} (kept)",
        got[i], zeroed[i], kept[i]
    ))
}

/// Allocated bytes and apparent size of a file.
pub fn usage(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.blocks() * 512, m.size())
}

/// The I/O engines tests cycle through: each [`engine_image`] takes the next one, so a test
/// that opens images several times runs on every engine (io_uring only where it works).
pub fn next_engine() -> block::engine::Aio {
    use block::engine::Aio;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut all = vec![Aio::Sync, Aio::Threads];
    if block::engine::io_uring_available().is_ok() {
        all.push(Aio::IoUring);
    }
    all[N.fetch_add(1, Ordering::Relaxed) % all.len()]
}

/// `inner` with its reads, writes, discards and write-zeroes run through a pipeline on the
/// next engine of [`next_engine`] (one request at a time, waited for).
pub fn engine_image(inner: Box<dyn DiskImage>) -> Box<dyn DiskImage> {
    let aio = next_engine();
    Box::new(EngineImage {
        inner,
        pipeline: block::pipeline::Pipeline::new(block::engine::new_engine(aio).unwrap()),
    })
}

/// See [`engine_image`].
pub struct EngineImage {
    pub inner: Box<dyn DiskImage>,
    pipeline: block::pipeline::Pipeline,
}

impl EngineImage {
    /// Runs `req` and waits for it.
    ///
    /// # Safety
    /// The request's buffers must be valid for the call.
    unsafe fn run(&mut self, req: block::pipeline::IoRequest) -> block::Result<()> {
        // SAFETY: the caller keeps the buffers valid; `drain` waits for the request.
        unsafe { self.pipeline.submit(self.inner.as_mut(), 0, req) };
        let mut out = Vec::new();
        self.pipeline.drain(self.inner.as_mut(), &mut out);
        assert_eq!(out.len(), 1, "one request, one completion");
        out.pop().map(|(_, r)| r).unwrap()
    }
}

impl DiskImage for EngineImage {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn plan_read(&mut self, offset: u64, bufs: &[block::IoBuf]) -> block::Result<block::Plan> {
        self.inner.plan_read(offset, bufs)
    }
    fn plan_write(&mut self, offset: u64, bufs: &[block::IoBuf]) -> block::Result<block::Plan> {
        self.inner.plan_write(offset, bufs)
    }
    fn finish(&mut self, plan: block::Plan, data: block::Result<()>) -> block::Result<()> {
        self.inner.finish(plan, data)
    }
    fn lock_unit(&self) -> u64 {
        self.inner.lock_unit()
    }
    fn needs_drain(&self) -> bool {
        self.inner.needs_drain()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> block::Result<()> {
        // SAFETY: `buf` is borrowed for the call, which waits for the request.
        let bufs = vec![unsafe { block::IoBuf::from_mut_slice(buf) }];
        // SAFETY: `buf` is borrowed for the call.
        unsafe { self.run(block::pipeline::IoRequest::Read { offset, bufs }) }
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> block::Result<()> {
        // SAFETY: `buf` is borrowed for the call, which waits for the request.
        let bufs = vec![unsafe { block::IoBuf::from_slice(buf) }];
        // SAFETY: `buf` is borrowed for the call.
        unsafe { self.run(block::pipeline::IoRequest::Write { offset, bufs }) }
    }
    fn write_vectored_at(
        &mut self,
        offset: u64,
        bufs: &[&[u8]],
        _scratch: &mut Vec<u8>,
    ) -> block::Result<()> {
        // SAFETY: the slices are borrowed for the call, which waits for the request.
        let bufs = bufs
            .iter()
            .map(|b| unsafe { block::IoBuf::from_slice(b) })
            .collect();
        // SAFETY: `bufs` is borrowed for the call.
        unsafe { self.run(block::pipeline::IoRequest::Write { offset, bufs }) }
    }
    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &mut [&mut [u8]],
        _scratch: &mut Vec<u8>,
    ) -> block::Result<()> {
        let bufs = bufs
            .iter_mut()
            // SAFETY: the slices are borrowed for the call, which waits for the request.
            .map(|b| unsafe { block::IoBuf::from_mut_slice(b) })
            .collect();
        // SAFETY: `bufs` is borrowed for the call.
        unsafe { self.run(block::pipeline::IoRequest::Read { offset, bufs }) }
    }
    fn flush(&mut self) -> block::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> block::Result<()> {
        // SAFETY: no buffers.
        unsafe { self.run(block::pipeline::IoRequest::WriteZeroes { offset, len, unmap }) }
    }
    fn discard(&mut self, offset: u64, len: u64) -> block::Result<()> {
        // SAFETY: no buffers.
        unsafe { self.run(block::pipeline::IoRequest::Discard { offset, len }) }
    }
    fn block_status(&mut self, offset: u64, max_len: u64) -> block::Result<block::MapExtent> {
        self.inner.block_status(offset, max_len)
    }
    fn set_detect_zeroes(&mut self, mode: block::DetectZeroes) {
        self.inner.set_detect_zeroes(mode)
    }
    fn detect_zeroes(&self) -> block::DetectZeroes {
        self.inner.detect_zeroes()
    }
    fn reclaim_stats(&self) -> block::ReclaimStats {
        self.inner.reclaim_stats()
    }
    fn host_usage(&self) -> block::Result<block::HostUsage> {
        self.inner.host_usage()
    }
    fn discard_granularity(&self) -> u64 {
        self.inner.discard_granularity()
    }
    fn idle(&mut self) -> block::Result<()> {
        self.inner.idle()
    }
}

/// `[off, off + len)` cut at the boundaries of `cs`-byte clusters, as (offset, length) pieces.
pub fn cluster_pieces(off: u64, len: u64, cs: u64) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    let mut p = off;
    while p < off + len {
        let n = (cs - p % cs).min(off + len - p);
        pieces.push((p, n));
        p += n;
    }
    pieces
}
