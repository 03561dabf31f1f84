//! Many overlapping requests in flight at once through the pipeline, on every I/O engine
//! (io_uring, I/O threads, synchronous), buffered and O_DIRECT, raw and qcow2 (v3 and v2
//! overlays with zero detection): writes to the same cluster, adjacent clusters, partial
//! clusters (copy on write from the backing file), zeros and data mixed, discards and
//! write-zeroes racing writes, reads among them. Overlapping requests take effect in
//! submission order, so every read and the final disk must equal a sequential model; QEMU's
//! tools check the image afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use block::engine::{new_engine, Aio};
use block::pipeline::{IoRequest, Pipeline};
use block::qcow2::Qcow2Version;
use block::{DetectZeroes, DiskImage, ImageFormat, IoBuf, OpenOptions};
use common::*;

const CS: u64 = 65536;
const SIZE: u64 = 4 << 20;

/// One request of a round and, for reads, the bytes the sequential model expects.
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Read {
        offset: u64,
        buf: Vec<u8>,
        /// With every discarded byte zero, and with discarded pieces of clusters kept.
        want: Vec<u8>,
        want_kept: Vec<u8>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

/// A random round: offsets crowd a 1 MiB window so requests hit the same and adjacent
/// clusters; lengths from one sector to two clusters and a bit. `model` takes every
/// discarded byte as zero; `kept` (returned, with the discarded pieces of clusters) keeps
/// those pieces as they were: a discard never allocates, so a piece of a cluster the
/// overlay does not hold by itself may keep reading as before.
fn round(rng: &mut Rng, model: &mut [u8], n: usize) -> (Vec<Op>, Vec<u8>, Vec<(u64, u64)>) {
    let mut ops = Vec::with_capacity(n);
    let mut kept = model.to_vec();
    let mut partial = Vec::new();
    for _ in 0..n {
        let window = (1 << 20) / 512;
        let offset = (rng.below(window) + rng.below(2) * (SIZE / 512 - window)) * 512;
        let len = ((1 + rng.below(2 * CS / 512 + 8)) * 512).min(SIZE - offset);
        let (o, l) = (offset as usize, len as usize);
        let op = match rng.below(10) {
            0..=3 => {
                let mut data = vec![0u8; l];
                rng.fill(&mut data);
                // Some writes have whole zero clusters or sectors inside.
                if rng.below(3) == 0 {
                    let z = rng.below(l as u64) as usize;
                    let zl = (rng.below(CS + 1) as usize).min(l - z);
                    data[z..z + zl].fill(0);
                }
                Op::Write { offset, data }
            }
            4 => Op::Write {
                offset,
                data: vec![0u8; l],
            },
            5 => Op::Discard { offset, len },
            6 => Op::WriteZeroes { offset, len },
            _ => Op::Read {
                offset,
                buf: vec![0xeeu8; l],
                want: Vec::new(),
                want_kept: Vec::new(),
            },
        };
        // The sequential model, in submission order.
        let op = match op {
            Op::Write { offset, data } => {
                model[o..o + l].copy_from_slice(&data);
                kept[o..o + l].copy_from_slice(&data);
                Op::Write { offset, data }
            }
            Op::Discard { offset, len } => {
                model[o..o + l].fill(0);
                for (p, n) in cluster_pieces(offset, len, CS) {
                    if n == CS {
                        kept[p as usize..(p + n) as usize].fill(0);
                    } else {
                        partial.push((p, n));
                    }
                }
                Op::Discard { offset, len }
            }
            Op::WriteZeroes { offset, len } => {
                model[o..o + l].fill(0);
                kept[o..o + l].fill(0);
                Op::WriteZeroes { offset, len }
            }
            Op::Read { offset, buf, .. } => Op::Read {
                offset,
                buf,
                want: model[o..o + l].to_vec(),
                want_kept: kept[o..o + l].to_vec(),
            },
        };
        ops.push(op);
    }
    (ops, kept, partial)
}

/// Each byte of `got` is `want`'s or `kept`'s.
fn assert_either(got: &[u8], want: &[u8], kept: &[u8], what: &str) {
    if let Some(wrong) = neither_zeroed_nor_kept(got, want, kept) {
        panic!("{what}: {wrong}");
    }
}

/// Submits every request of `ops` at once, waits for all, checks each read.
fn run_round(img: &mut dyn DiskImage, p: &mut Pipeline, ops: &mut [Op], what: &str) {
    for (tag, op) in ops.iter_mut().enumerate() {
        let req = match op {
            Op::Write { offset, data } => {
                // Two uneven pieces, as guest pages would be.
                let (a, b) = data.split_at(data.len() / 3);
                // SAFETY: `ops` outlives the requests: all are drained below.
                let bufs = unsafe { vec![IoBuf::from_slice(a), IoBuf::from_slice(b)] };
                IoRequest::Write {
                    offset: *offset,
                    bufs,
                }
            }
            Op::Read { offset, buf, .. } => IoRequest::Read {
                offset: *offset,
                // SAFETY: `ops` outlives the requests (drained below); each read has its own
                // buffer.
                bufs: vec![unsafe { IoBuf::from_mut_slice(buf) }],
            },
            Op::Discard { offset, len } => IoRequest::Discard {
                offset: *offset,
                len: *len,
            },
            Op::WriteZeroes { offset, len } => IoRequest::WriteZeroes {
                offset: *offset,
                len: *len,
                unmap: tag % 2 == 0,
            },
        };
        // SAFETY: `ops` (and so every buffer) outlives the pipeline's requests: all are
        // drained below before this returns.
        unsafe { p.submit(img, tag as u64, req) };
    }
    let mut out = Vec::new();
    p.drain(img, &mut out);
    assert_eq!(out.len(), ops.len(), "{what}: every request completes once");
    for (tag, r) in &out {
        assert!(r.is_ok(), "{what}: request {tag}: {r:?}");
    }
    for (i, op) in ops.iter().enumerate() {
        if let Op::Read {
            buf,
            want,
            want_kept,
            offset,
        } = op
        {
            assert_either(
                buf,
                want,
                want_kept,
                &format!("{what}: read {i} at {offset}"),
            );
        }
    }
}

/// After a round: the discarded pieces of clusters read as zeros or as kept, byte by byte;
/// the model takes what they read.
fn settle_discarded(
    img: &mut dyn DiskImage,
    model: &mut [u8],
    kept: &[u8],
    partial: &[(u64, u64)],
    what: &str,
) {
    for &(off, len) in partial {
        let (o, l) = (off as usize, len as usize);
        let mut now = vec![0u8; l];
        img.read_at(off, &mut now).unwrap();
        assert_either(
            &now,
            &model[o..o + l],
            &kept[o..o + l],
            &format!("{what}: discarded piece {off}+{len}"),
        );
        model[o..o + l].copy_from_slice(&now);
    }
}

fn engines() -> Vec<Aio> {
    let mut v = vec![Aio::Sync, Aio::Threads];
    match block::engine::io_uring_available() {
        Ok(()) => v.push(Aio::IoUring),
        Err(e) => eprintln!("io_uring not available here ({e}): not tested"),
    }
    v
}

fn check_against_model(path: &std::path::Path, dir: &TempDir, model: &[u8], what: &str) {
    let mut img = open_ro(path);
    assert_bytes_eq(&read_all(img.as_mut()), model, what);
    drop(img);
    let want = dir.path().join("want.raw");
    std::fs::write(&want, model).unwrap();
    assert_same(path, &want);
}

#[test]
fn overlapping_requests_in_flight_match_a_sequential_model() {
    let mut rng = Rng::seeded(0x51ab);
    for aio in engines() {
        for direct in [false, true] {
            for kind in ["v3", "v2", "raw"] {
                let what = format!("{} direct={direct} {kind}", aio.name());
                let dir = temp_dir("pipeline");
                let raw_base = dir.path().join("base.raw");
                let mut model = patterned_raw(&raw_base, SIZE);
                let path = match kind {
                    "raw" => raw_base.clone(),
                    v => {
                        let ov = dir.path().join("overlay.qcow2");
                        let version = if v == "v3" {
                            Qcow2Version::V3
                        } else {
                            Qcow2Version::V2
                        };
                        create_qcow2(
                            &ov,
                            None,
                            version,
                            CS,
                            16,
                            Some(("base.raw", ImageFormat::Raw)),
                        );
                        ov
                    }
                };
                let opened = block::open(
                    &path,
                    &OpenOptions {
                        direct,
                        // The test's own images: their format is given, as a trusting user
                        // gives it.
                        format: Some(if kind == "raw" {
                            ImageFormat::Raw
                        } else {
                            ImageFormat::Qcow2
                        }),
                        ..Default::default()
                    },
                );
                let mut img = match opened {
                    Ok(i) => i,
                    Err(e) if direct && e.is_direct_io_unsupported() => {
                        eprintln!("{what}: O_DIRECT not supported here: skipped");
                        continue;
                    }
                    Err(e) => panic!("{what}: {e}"),
                };
                img.set_detect_zeroes(DetectZeroes::Unmap);
                let mut p = Pipeline::new(new_engine(aio).unwrap());
                for r in 0..6 {
                    let (mut ops, kept, partial) = round(&mut rng, &mut model, 48);
                    let what = format!("{what} round {r}");
                    run_round(img.as_mut(), &mut p, &mut ops, &what);
                    settle_discarded(img.as_mut(), &mut model, &kept, &partial, &what);
                }
                img.flush().unwrap();
                drop(p);
                drop(img);
                if kind != "raw" {
                    assert_qemu_clean(&path);
                }
                check_against_model(&path, &dir, &model, &what);
            }
        }
    }
}
