//! Randomised differential test: thousands of random writes, partial writes, overwrites,
//! zero writes (with zero detection), write-zeroes, discards and reads on qcow2 overlays over
//! a patterned backing file, mirrored onto an in-memory model. Reads must equal the model
//! after every batch (the image is reopened between batches); at the end `qemu-img check` is
//! clean and `qemu-img compare` finds the image equal to a raw dump of the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use block::qcow2::Qcow2Version;
use block::{DetectZeroes, ImageFormat};
use common::*;

struct Config {
    version: Qcow2Version,
    cluster_size: u64,
    refcount_bits: u32,
    backing: bool,
    /// Open the image (and its backing file) with O_DIRECT.
    direct: bool,
}

/// `buf` cut at random points into pieces: 4 KiB pages, odd sizes, and empty pieces.
fn split_randomly<'a>(buf: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let n = match rng.below(4) {
            0 => 4096,
            1 => 0,
            _ => 1 + rng.below(3 * 4096) as usize,
        }
        .min(buf.len() - at);
        pieces.push(&buf[at..at + n]);
        at += n;
    }
    pieces
}

fn run_config(cfg: &Config, rng: &mut Rng, batches: u32, ops: u32) {
    let dir = temp_dir("diff");
    let size: u64 = 4 << 20;
    let base = dir.path().join("base.raw");
    let base_data = patterned_raw(&base, 3 << 20);
    let img = dir.path().join("ov.qcow2");
    create_qcow2(
        &img,
        Some(size),
        cfg.version,
        cfg.cluster_size,
        cfg.refcount_bits,
        cfg.backing.then_some(("base.raw", ImageFormat::Raw)),
    );
    let mut model = vec![0u8; size as usize];
    if cfg.backing {
        model[..base_data.len()].copy_from_slice(&base_data);
    }
    let what = format!(
        "{:?} cs={} rb={} backing={} direct={}",
        cfg.version, cfg.cluster_size, cfg.refcount_bits, cfg.backing, cfg.direct
    );
    // Each open runs on the next I/O engine: the batches go through all of them.
    let open = |read_only: bool| {
        engine_image(
            block::open(
                &img,
                &block::OpenOptions {
                    read_only,
                    format: Some(block::ImageFormat::Qcow2),
                    direct: cfg.direct,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    let mut scratch = Vec::new();
    for batch in 0..batches {
        let mut im = open(false);
        let mode = match rng.below(3) {
            0 => DetectZeroes::Off,
            1 => DetectZeroes::On,
            _ => DetectZeroes::Unmap,
        };
        im.set_detect_zeroes(mode);
        for op in 0..ops {
            // Mostly sector-aligned requests (what guests send), some unaligned.
            let aligned = rng.below(4) != 0;
            let max_len = if rng.below(8) == 0 {
                512 << 10
            } else {
                3 * cfg.cluster_size
            };
            let mut len = 1 + rng.below(max_len);
            let mut off = rng.below(size);
            if aligned {
                off &= !511;
                len = (len + 511) & !511;
            }
            if off + len > size {
                len = size - off;
            }
            if len == 0 {
                continue;
            }
            let (o, l) = (off as usize, len as usize);
            match rng.below(12) {
                0..=3 => {
                    let mut buf = vec![0u8; l];
                    rng.fill(&mut buf);
                    // Sprinkle zero runs so per-cluster detection has work to do.
                    if rng.below(2) == 0 && l > 2 * cfg.cluster_size as usize {
                        let zs = rng.below(l as u64 / 2) as usize;
                        buf[zs..zs + cfg.cluster_size as usize].fill(0);
                    }
                    if rng.below(2) == 0 {
                        im.write_at(off, &buf).unwrap();
                    } else {
                        // As the device sends it: the guest's buffer in pieces (page-sized
                        // or odd, some empty), written without gathering where possible.
                        let pieces = split_randomly(&buf, rng);
                        im.write_vectored_at(off, &pieces, &mut scratch).unwrap();
                    }
                    model[o..o + l].copy_from_slice(&buf);
                }
                4 => {
                    let zeros = vec![0u8; l];
                    if rng.below(2) == 0 {
                        im.write_at(off, &zeros).unwrap();
                    } else {
                        let pieces = split_randomly(&zeros, rng);
                        im.write_vectored_at(off, &pieces, &mut scratch).unwrap();
                    }
                    model[o..o + l].fill(0);
                }
                5 => {
                    let unmap = rng.below(2) == 0;
                    im.write_zeroes(off, len, unmap).unwrap();
                    model[o..o + l].fill(0);
                }
                6 => {
                    im.discard(off, len).unwrap();
                    // Whole clusters read as zeros; each piece of a cluster reads either as
                    // before (a cluster the overlay does not hold by itself: a discard never
                    // allocates) or as zeros, all of it one or the other.
                    let cs = cfg.cluster_size;
                    for (p, n) in cluster_pieces(off, len, cs) {
                        let (po, pl) = (p as usize, n as usize);
                        if n < cs {
                            let mut now = vec![0u8; pl];
                            im.read_at(p, &mut now).unwrap();
                            assert!(
                                now == model[po..po + pl] || now.iter().all(|&b| b == 0),
                                "{what}: batch {batch} op {op}: discard {off}+{len} left {p}+{n} \
                                 neither as it was nor zeros"
                            );
                            model[po..po + pl].copy_from_slice(&now);
                        } else {
                            model[po..po + pl].fill(0);
                        }
                    }
                }
                7 => im.flush().unwrap(),
                10 => {
                    // A batch of writes (a queue depth above one): some overlap, some are
                    // all zeros; applied in order.
                    let n = 2 + rng.below(7) as usize;
                    let mut datas = Vec::new();
                    for _ in 0..n {
                        let l = 512 * (1 + rng.below(3 * cfg.cluster_size / 512 + 1));
                        let o = rng.below(size - l) & !511;
                        let mut d = vec![0u8; l as usize];
                        if rng.below(4) != 0 {
                            rng.fill(&mut d);
                        }
                        datas.push((o, d));
                    }
                    let pieces: Vec<Vec<&[u8]>> =
                        datas.iter().map(|(_, d)| split_randomly(d, rng)).collect();
                    let reqs: Vec<(u64, &[&[u8]])> = datas
                        .iter()
                        .zip(&pieces)
                        .map(|((o, _), p)| (*o, &p[..]))
                        .collect();
                    im.write_many(&reqs, 4, &mut scratch).unwrap();
                    for (o, d) in &datas {
                        model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                    }
                }
                11 => {
                    let n = 2 + rng.below(7) as usize;
                    let mut bufs: Vec<(u64, Vec<u8>)> = (0..n)
                        .map(|_| {
                            let l = 1 + rng.below(3 * cfg.cluster_size);
                            (rng.below(size - l), vec![0xeeu8; l as usize])
                        })
                        .collect();
                    let mut reqs: Vec<(u64, &mut [u8])> =
                        bufs.iter_mut().map(|(o, b)| (*o, &mut b[..])).collect();
                    im.read_many(&mut reqs, 4).unwrap();
                    for (o, b) in &bufs {
                        assert_bytes_eq(
                            b,
                            &model[*o as usize..*o as usize + b.len()],
                            &format!("{what}: batch {batch} op {op} batched read at {o}"),
                        );
                    }
                }
                _ => {
                    let mut buf = vec![0u8; l];
                    im.read_at(off, &mut buf).unwrap();
                    assert_bytes_eq(
                        &buf,
                        &model[o..o + l],
                        &format!("{what}: batch {batch} op {op} read at {off}+{len}"),
                    );
                }
            }
        }
        let got = read_all(im.as_mut());
        assert_bytes_eq(&got, &model, &format!("{what}: after batch {batch}"));
        drop(im);
        let mut im = open(true);
        let got = read_all(im.as_mut());
        assert_bytes_eq(
            &got,
            &model,
            &format!("{what}: reopened after batch {batch}"),
        );
    }
    assert_qemu_clean(&img);
    let rep = block::inspect::check(&img, None).unwrap();
    assert_eq!(
        (rep.corruptions, rep.leaks),
        (0, 0),
        "{what}: {:?}",
        rep.messages
    );
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_same(&img, &reference);
    // The backing file was never written.
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
}

#[test]
fn differential_v3_64k_backing() {
    let mut rng = Rng::seeded(0x5eed_0001);
    run_config(
        &Config {
            version: Qcow2Version::V3,
            cluster_size: 65536,
            refcount_bits: 16,
            backing: true,
            direct: false,
        },
        &mut rng,
        8,
        400,
    );
}

#[test]
fn differential_v2_64k_backing() {
    let mut rng = Rng::seeded(0x5eed_0002);
    run_config(
        &Config {
            version: Qcow2Version::V2,
            cluster_size: 65536,
            refcount_bits: 16,
            backing: true,
            direct: false,
        },
        &mut rng,
        8,
        400,
    );
}

#[test]
fn differential_v2_512_no_backing() {
    let mut rng = Rng::seeded(0x5eed_0003);
    run_config(
        &Config {
            version: Qcow2Version::V2,
            cluster_size: 512,
            refcount_bits: 16,
            backing: false,
            direct: false,
        },
        &mut rng,
        6,
        300,
    );
}

#[test]
fn differential_v3_4k_1bit_backing() {
    let mut rng = Rng::seeded(0x5eed_0004);
    run_config(
        &Config {
            version: Qcow2Version::V3,
            cluster_size: 4096,
            refcount_bits: 1,
            backing: true,
            direct: false,
        },
        &mut rng,
        6,
        300,
    );
}

#[test]
fn differential_v2_4k_backing() {
    let mut rng = Rng::seeded(0x5eed_0005);
    run_config(
        &Config {
            version: Qcow2Version::V2,
            cluster_size: 4096,
            refcount_bits: 16,
            backing: true,
            direct: false,
        },
        &mut rng,
        6,
        300,
    );
}

/// Whether files in the test directory can be opened with O_DIRECT (tmpfs before Linux 6.6
/// cannot); prints why a direct-I/O test is skipped.
fn direct_io_supported() -> bool {
    let dir = temp_dir("odirect-probe");
    let p = dir.path().join("probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    match block::host_file::HostFile::open(&p, false, true) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: O_DIRECT is not supported here ({e})");
            false
        }
    }
}

#[test]
fn differential_v2_512_backing_direct_io() {
    // 512-byte clusters under O_DIRECT: every metadata and data access is smaller than the
    // 4 KiB direct-I/O alignment (read-modify-write, file length kept exact).
    if !direct_io_supported() {
        return;
    }
    let mut rng = Rng::seeded(0x5eed_0006);
    run_config(
        &Config {
            version: Qcow2Version::V2,
            cluster_size: 512,
            refcount_bits: 16,
            backing: true,
            direct: true,
        },
        &mut rng,
        6,
        300,
    );
}

#[test]
fn differential_v3_64k_backing_direct_io() {
    if !direct_io_supported() {
        return;
    }
    let mut rng = Rng::seeded(0x5eed_0007);
    run_config(
        &Config {
            version: Qcow2Version::V3,
            cluster_size: 65536,
            refcount_bits: 16,
            backing: true,
            direct: true,
        },
        &mut rng,
        6,
        300,
    );
}
