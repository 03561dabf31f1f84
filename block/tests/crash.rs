//! Crash consistency: a child process doing random writes, zero writes, write-zeroes and
//! discards is SIGKILLed at random moments, many times over the same image. After every kill
//! `qemu-img check` reports no corruption (leaks are allowed) and every block the child had
//! flushed reads back as written. The child issues its requests one at a time, or (with an
//! I/O engine named) eight at a time through a pipeline, so the kill lands with requests in
//! flight on io_uring.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use block::qcow2::Qcow2Version;
use block::{DetectZeroes, ImageFormat};
use common::*;

const SIZE: u64 = 8 << 20;

/// The child's side: runs until killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os("THINVM_CRASH_CHILD") else {
        return; // only meaningful when spawned by `killed_writers_never_corrupt`
    };
    let dir = PathBuf::from(dir);
    let seed: u64 = std::env::var("THINVM_CRASH_SEED").unwrap().parse().unwrap();
    let mut rng = Rng(seed.max(1));
    let img_path = dir.join("img.qcow2");
    let mut img = open_rw(&img_path);
    img.set_detect_zeroes(match seed % 3 {
        0 => DetectZeroes::Off,
        1 => DetectZeroes::On,
        _ => DetectZeroes::Unmap,
    });
    let mut model = read_all(img.as_mut());
    let snapshot = |model: &[u8]| {
        let tmp = dir.join("model.tmp");
        std::fs::write(&tmp, model).unwrap();
        std::fs::rename(&tmp, dir.join("model.snap")).unwrap();
        std::fs::write(dir.join("dirty.log"), b"").unwrap();
    };
    snapshot(&model);
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("dirty.log"))
        .unwrap();
    let mut n = 0u64;
    let cs = img.discard_granularity();
    if let Ok(aio) = std::env::var("THINVM_CRASH_AIO") {
        let aio: block::engine::Aio = aio.parse().unwrap();
        let mut p = block::pipeline::Pipeline::new(block::engine::new_engine(aio).unwrap());
        loop {
            // Eight requests in flight at once; their ranges are logged before they start.
            let mut bufs: Vec<Vec<u8>> = Vec::new();
            let mut reqs = Vec::new();
            // `model` with every discarded byte zero, `kept` with the pieces of clusters a
            // discard may leave as they read (the pieces, in `partial`).
            let mut kept = model.clone();
            let mut partial = Vec::new();
            for _ in 0..8 {
                let off = rng.below(SIZE / 512) * 512;
                let len = ((1 + rng.below(512)) * 512).min(SIZE - off);
                writeln!(log, "{off} {len}").unwrap();
                let (o, l) = (off as usize, len as usize);
                match rng.below(5) {
                    0 | 1 => {
                        let mut buf = vec![0u8; l];
                        rng.fill(&mut buf);
                        model[o..o + l].copy_from_slice(&buf);
                        kept[o..o + l].copy_from_slice(&buf);
                        bufs.push(buf);
                        reqs.push((off, None));
                    }
                    2 => {
                        model[o..o + l].fill(0);
                        kept[o..o + l].fill(0);
                        bufs.push(vec![0u8; l]);
                        reqs.push((off, None));
                    }
                    3 => {
                        model[o..o + l].fill(0);
                        kept[o..o + l].fill(0);
                        reqs.push((off, Some((len, true))));
                    }
                    _ => {
                        model[o..o + l].fill(0);
                        for (p, n) in cluster_pieces(off, len, cs) {
                            if n == cs {
                                kept[p as usize..(p + n) as usize].fill(0);
                            } else {
                                partial.push((p, n));
                            }
                        }
                        reqs.push((off, Some((len, false))));
                    }
                }
            }
            let mut data = bufs.iter();
            for (tag, (off, zero)) in reqs.into_iter().enumerate() {
                let req = match zero {
                    None => block::pipeline::IoRequest::Write {
                        offset: off,
                        // SAFETY: `bufs` outlives the requests: they are drained below.
                        bufs: vec![unsafe { block::IoBuf::from_slice(data.next().unwrap()) }],
                    },
                    Some((len, true)) => block::pipeline::IoRequest::WriteZeroes {
                        offset: off,
                        len,
                        unmap: tag % 2 == 0,
                    },
                    Some((len, false)) => block::pipeline::IoRequest::Discard { offset: off, len },
                };
                // SAFETY: `bufs` outlives the requests: they are drained below.
                unsafe { p.submit(img.as_mut(), tag as u64, req) };
            }
            let mut out = Vec::new();
            p.drain(img.as_mut(), &mut out);
            assert!(out.iter().all(|(_, r)| r.is_ok()));
            for &(off, len) in &partial {
                settle_discarded(img.as_mut(), &mut model, &kept, off, len, &dir);
            }
            n += 8;
            if n % 16 == 0 {
                img.flush().unwrap();
                snapshot(&model);
                log = std::fs::OpenOptions::new()
                    .append(true)
                    .open(dir.join("dirty.log"))
                    .unwrap();
            }
        }
    }
    loop {
        let off = rng.below(SIZE / 512) * 512;
        let len = ((1 + rng.below(512)) * 512).min(SIZE - off);
        writeln!(log, "{off} {len}").unwrap();
        let (o, l) = (off as usize, len as usize);
        match rng.below(6) {
            0 | 1 => {
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                img.write_at(off, &buf).unwrap();
                model[o..o + l].copy_from_slice(&buf);
            }
            2 => {
                img.write_at(off, &vec![0u8; l]).unwrap();
                model[o..o + l].fill(0);
            }
            3 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            4 => {
                img.discard(off, len).unwrap();
                let kept = model.clone();
                model[o..o + l].fill(0);
                for (p, n) in cluster_pieces(off, len, cs) {
                    if n < cs {
                        settle_discarded(img.as_mut(), &mut model, &kept, p, n, &dir);
                    }
                }
            }
            _ => {}
        }
        n += 1;
        if n % 16 == 0 {
            img.flush().unwrap();
            snapshot(&model);
            log = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("dirty.log"))
                .unwrap();
        }
    }
}

/// After a discard of a piece of a cluster: each byte reads as the model had it with the
/// piece zeroed (`model`) or kept (`kept`: a discard never allocates, so a piece of a cluster
/// the overlay does not hold by itself stays as it read); the model takes what it reads. A
/// byte that reads as neither is written to `child.err` for the parent, and the child stops.
fn settle_discarded(
    img: &mut dyn block::DiskImage,
    model: &mut [u8],
    kept: &[u8],
    off: u64,
    len: u64,
    dir: &Path,
) {
    let (o, l) = (off as usize, len as usize);
    let mut now = vec![0u8; l];
    img.read_at(off, &mut now).unwrap();
    if let Some(wrong) = neither_zeroed_nor_kept(&now, &model[o..o + l], &kept[o..o + l]) {
        let msg = format!("discarded piece at {off}: {wrong}");
        std::fs::write(dir.join("child.err"), &msg).unwrap();
        panic!("{msg}");
    }
    model[o..o + l].copy_from_slice(&now);
}

fn verify_after_kill(dir: &Path, what: &str) {
    if let Ok(err) = std::fs::read_to_string(dir.join("child.err")) {
        panic!("{what}: the child found a wrong read: {err}");
    }
    let img_path = dir.join("img.qcow2");
    let (code, out) = qemu_check(&img_path);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check found corruption ({code}):\n{out}"
    );
    let snap = std::fs::read(dir.join("model.snap")).unwrap();
    let log = std::fs::read_to_string(dir.join("dirty.log")).unwrap_or_default();
    let mut exempt = vec![false; (SIZE / 512) as usize];
    for line in log.lines() {
        let mut it = line.split_whitespace();
        let (Some(o), Some(l)) = (it.next(), it.next()) else {
            continue;
        };
        let (Ok(o), Ok(l)) = (o.parse::<u64>(), l.parse::<u64>()) else {
            continue;
        };
        for s in o / 512..(o + l).div_ceil(512) {
            if let Some(e) = exempt.get_mut(s as usize) {
                *e = true;
            }
        }
    }
    let mut img = open_ro(&img_path);
    let got = read_all(img.as_mut());
    for (s, ex) in exempt.iter().enumerate() {
        if *ex {
            continue;
        }
        let r = s * 512..(s + 1) * 512;
        assert!(got[r.clone()] == snap[r], "{what}: flushed sector {s} lost");
    }
}

fn run(version: Qcow2Version, cluster_size: u64, backing: bool, iterations: u32, seed0: u64) {
    run_with(version, cluster_size, backing, iterations, seed0, None);
}

fn run_with(
    version: Qcow2Version,
    cluster_size: u64,
    backing: bool,
    iterations: u32,
    seed0: u64,
    aio: Option<&str>,
) {
    let dir = temp_dir("crash");
    if backing {
        patterned_raw(&dir.path().join("base.raw"), SIZE);
    }
    create_qcow2(
        &dir.path().join("img.qcow2"),
        Some(SIZE),
        version,
        cluster_size,
        16,
        backing.then_some(("base.raw", ImageFormat::Raw)),
    );
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::seeded(seed0);
    let mut leaky = 0;
    for i in 0..iterations {
        let what = format!("{version:?} cs={cluster_size} backing={backing} kill #{i}");
        // The kill must land while the child writes, not while it starts (a loaded
        // machine can take longer than the sleep below to get there).
        let seed = (rng.next() % 1_000_000).to_string();
        let mut child = None;
        let mut early = Vec::new();
        // A child that ends before it starts writing has not been killed by anything here:
        // it is started again (twice at most), and what it said is shown.
        for _attempt in 0..3 {
            let _ = std::fs::remove_file(dir.path().join("model.snap"));
            let mut c = Command::new(&exe)
                .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
                .env("THINVM_CRASH_CHILD", dir.path())
                .env("THINVM_CRASH_SEED", &seed)
                .envs(aio.map(|a| ("THINVM_CRASH_AIO", a)))
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("child.stderr")).unwrap())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            let ended = loop {
                if dir.path().join("model.snap").exists() {
                    break None;
                }
                if let Some(status) = c.try_wait().unwrap() {
                    break Some(status);
                }
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "{what}: the child did not start writing"
                );
                std::thread::sleep(Duration::from_millis(2));
            };
            match ended {
                None => {
                    child = Some(c);
                    break;
                }
                Some(status) => {
                    let said = std::fs::read_to_string(dir.path().join("child.stderr"))
                        .unwrap_or_default();
                    eprintln!("{what}: the child ended ({status}) before writing:\n{said}");
                    early.push(said);
                }
            }
        }
        let Some(mut child) = child else {
            panic!("{what}: the child ended before writing, three times: {early:?}");
        };
        std::thread::sleep(Duration::from_millis(10 + rng.below(250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        verify_after_kill(dir.path(), &what);
        if qemu_check(&dir.path().join("img.qcow2")).0 == 3 {
            leaky += 1;
        }
    }
    eprintln!("{iterations} kills, {leaky} left leaks (allowed), none corrupted");
}

#[test]
fn killed_writers_never_corrupt_v3_backing() {
    run(Qcow2Version::V3, 65536, true, 25, 0xc0ffee);
}

#[test]
fn killed_writers_never_corrupt_v2_backing() {
    run(Qcow2Version::V2, 65536, true, 25, 0xdecade);
}

#[test]
fn killed_writers_never_corrupt_v3_small_clusters() {
    run(Qcow2Version::V3, 4096, false, 20, 0xfacade);
}

#[test]
fn killed_writers_with_io_uring_in_flight_never_corrupt() {
    if let Err(e) = block::engine::io_uring_available() {
        eprintln!("io_uring not available here ({e}): skipped");
        return;
    }
    run_with(
        Qcow2Version::V3,
        65536,
        true,
        25,
        0xbadcab,
        Some("io_uring"),
    );
    run_with(Qcow2Version::V2, 65536, true, 15, 0xcab1e, Some("io_uring"));
}
