//! Hand-broken and hostile images: each yields its specific error, never a panic, never an
//! unbounded allocation; header feature handling (dirty, corrupt, autoclear, unknown
//! extensions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use block::qcow2::header::Header;
use block::qcow2::{Qcow2Image, Qcow2Version};
use block::{DiskImage, Error, ImageFormat};
use common::*;

fn fresh(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    create_qcow2(&p, Some(16 << 20), Qcow2Version::V3, 65536, 16, None);
    p
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(p: &Path) -> String {
    match Qcow2Image::open(p, false) {
        Ok(_) => panic!("{} opened although it is broken", p.display()),
        Err(e) => e.to_string(),
    }
}

fn expect(p: &Path, needle: &str) {
    let e = open_err(p);
    assert!(
        e.contains(needle),
        "{}: error '{e}' does not mention '{needle}'",
        p.display()
    );
}

#[test]
fn broken_headers_give_specific_errors() {
    let dir = temp_dir("hostile-hdr");
    let p = dir.path().join("short.qcow2");
    std::fs::write(&p, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    expect(&p, "too short");

    let p = fresh(&dir, "magic.qcow2");
    poke(&p, 0, b"QFI\x00");
    expect(&p, "bad magic");

    for (bits, name) in [(8u32, "cb8"), (22, "cb22")] {
        let p = fresh(&dir, name);
        poke(&p, 20, &bits.to_be_bytes());
        expect(&p, &format!("cluster_bits {bits} out of range"));
    }

    let p = fresh(&dir, "l1huge.qcow2");
    poke(&p, 36, &0x1000_0000u32.to_be_bytes());
    expect(&p, "l1_size");

    let p = fresh(&dir, "size.qcow2");
    poke(&p, 24, &(1u64 << 62).to_be_bytes());
    expect(&p, "too large");

    let p = fresh(&dir, "rcorder.qcow2");
    poke(&p, 96, &7u32.to_be_bytes());
    expect(&p, "refcount_order 7 invalid");

    let p = fresh(&dir, "incompat.qcow2");
    poke(&p, 72, &(1u64 << 9).to_be_bytes());
    expect(&p, "incompatible feature bit 9");

    let p = fresh(&dir, "crypt.qcow2");
    poke(&p, 32, &1u32.to_be_bytes());
    expect(&p, "encryption");

    let p = fresh(&dir, "extdata.qcow2");
    poke(&p, 72, &(1u64 << 2).to_be_bytes());
    expect(&p, "external data file");

    let p = fresh(&dir, "extl2.qcow2");
    poke(&p, 72, &(1u64 << 4).to_be_bytes());
    expect(&p, "extended L2");

    let p = fresh(&dir, "hdrlen.qcow2");
    poke(&p, 100, &107u32.to_be_bytes());
    expect(&p, "header_length 107 invalid");

    let p = fresh(&dir, "reftable.qcow2");
    poke(&p, 56, &0x1000u32.to_be_bytes());
    expect(&p, "refcount table too large");

    let p = fresh(&dir, "reftable0.qcow2");
    poke(&p, 48, &0u64.to_be_bytes());
    expect(&p, "refcount table offset");

    let p = fresh(&dir, "l1unaligned.qcow2");
    poke(&p, 40, &0x30001u64.to_be_bytes());
    expect(&p, "L1 table offset");

    let p = fresh(&dir, "backingname.qcow2");
    poke(&p, 8, &0x200u64.to_be_bytes());
    poke(&p, 16, &2000u32.to_be_bytes());
    expect(&p, "backing file name too long");

    let p = fresh(&dir, "version.qcow2");
    poke(&p, 4, &4u32.to_be_bytes());
    expect(&p, "qcow2 version 4");

    // An L2 table pointer far past the end of the file (found by the fuzzer: the free-space
    // index was sized by it): writable opens refuse, read-only opens work.
    let p = fresh(&dir, "l2beyond.qcow2");
    let l1_off = Qcow2Image::open(&p, true).unwrap().header().l1_table_offset;
    poke(&p, l1_off, &((1u64 << 50) | (1 << 63)).to_be_bytes());
    expect(&p, "beyond the end of the file");
    assert!(Qcow2Image::open(&p, true).is_ok());
}

#[test]
fn backing_loop_and_missing_backing_are_errors() {
    let dir = temp_dir("hostile-chain");
    let p = dir.path().join("loop.qcow2");
    create_qcow2(&p, Some(1 << 20), Qcow2Version::V3, 65536, 16, None);
    // Make the image its own backing file.
    let img = Qcow2Image::open(&p, true).unwrap();
    let mut h: Header = img.header().clone();
    drop(img);
    h.backing_file = Some("loop.qcow2".into());
    h.backing_format = Some(ImageFormat::Qcow2);
    let bytes = h.serialize().unwrap();
    poke(&p, 0, &bytes);
    let e = open_err(&p);
    assert!(e.contains("backing chain loop"), "{e}");

    let p = dir.path().join("missing.qcow2");
    create_qcow2(&p, Some(1 << 20), Qcow2Version::V3, 65536, 16, None);
    let img = Qcow2Image::open(&p, true).unwrap();
    let mut h = img.header().clone();
    drop(img);
    h.backing_file = Some("nonexistent.raw".into());
    h.backing_format = Some(ImageFormat::Raw);
    poke(&p, 0, &h.serialize().unwrap());
    let e = open_err(&p);
    assert!(e.contains("nonexistent.raw"), "{e}");
}

/// Host offset of the L2 table of the first L1 entry, after writing one cluster.
fn image_with_l2(dir: &TempDir, name: &str) -> (std::path::PathBuf, u64) {
    let p = fresh(dir, name);
    {
        let mut img = open_rw(&p);
        img.write_at(0, &[1u8; 65536]).unwrap();
    }
    let img = Qcow2Image::open(&p, true).unwrap();
    let l1_off = img.header().l1_table_offset;
    drop(img);
    let f = std::fs::File::open(&p).unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1_off).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    (p, l2)
}

fn corrupt_bit_set(p: &Path) -> bool {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    u64::from_be_bytes(b) & 2 != 0
}

#[test]
fn l2_entries_into_metadata_are_io_errors_and_mark_corrupt() {
    let dir = temp_dir("hostile-l2");
    let cases: [(&str, u64, &str); 4] = [
        ("header", 0x8000_0000_0000_0200, "unaligned"),
        ("reftable", 0x8000_0000_0001_0000, "metadata"),
        ("beyond56", 0x8100_0000_0005_0000, "2^56"),
        (
            "pasteof",
            0x8000_0001_0000_0000,
            "beyond the end of the file",
        ),
    ];
    for (name, entry, needle) in cases {
        let (p, l2) = image_with_l2(&dir, &format!("{name}.qcow2"));
        poke(&p, l2 + 8, &entry.to_be_bytes()); // guest cluster 1
        let mut img = open_rw(&p);
        let mut buf = vec![0u8; 65536];
        img.read_at(0, &mut buf).unwrap();
        let err = img.read_at(65536, &mut buf).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{name}: {err}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
        // Marked corrupt and now read-only.
        assert!(img.is_read_only(), "{name}");
        assert!(matches!(img.write_at(0, &[2u8; 512]), Err(Error::ReadOnly)));
        drop(img);
        assert!(corrupt_bit_set(&p), "{name}: corrupt bit not set");
        // Opening again forces read-only.
        let img = open_rw(&p);
        assert!(img.is_read_only());
    }
}

#[test]
fn dirty_bit_rebuilds_refcounts_and_autoclear_and_extensions() {
    let dir = temp_dir("hostile-features");
    // Dirty: refcounts made wrong on purpose (a leak) are rebuilt at open.
    let (p, _) = image_with_l2(&dir, "dirty.qcow2");
    let img = Qcow2Image::open(&p, true).unwrap();
    let rb_off = {
        let f = std::fs::File::open(&p).unwrap();
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, img.header().refcount_table_offset)
            .unwrap();
        u64::from_be_bytes(e)
    };
    drop(img);
    // Leak cluster 8: make the file long enough to hold it, then give it a refcount.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10 * 65536)
        .unwrap();
    poke(&p, rb_off + 2 * 8, &1u16.to_be_bytes());
    assert_eq!(qemu_check(&p).0, 3);
    poke(&p, 72, &1u64.to_be_bytes()); // dirty
    {
        let img = open_rw(&p);
        assert!(!img.is_read_only());
    }
    assert_qemu_clean(&p);
    let f = std::fs::File::open(&p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    assert_eq!(u64::from_be_bytes(b) & 1, 0, "dirty bit cleared");

    // Unknown autoclear bits are cleared before the first write; unknown extensions kept.
    let p = fresh(&dir, "autoclear.qcow2");
    let img = Qcow2Image::open(&p, true).unwrap();
    let mut h = img.header().clone();
    drop(img);
    h.autoclear_features = 1 << 5;
    h.unknown_extensions
        .push(block::qcow2::header::UnknownExtension {
            kind: 0x7468_696e,
            data: b"kept".to_vec(),
        });
    poke(&p, 0, &h.serialize().unwrap());
    {
        let mut img = open_rw(&p);
        img.write_at(0, &[3u8; 4096]).unwrap();
    }
    let img = Qcow2Image::open(&p, true).unwrap();
    assert_eq!(img.header().autoclear_features, 0);
    assert_eq!(img.header().unknown_extensions.len(), 1);
    assert_eq!(img.header().unknown_extensions[0].data, b"kept");
    drop(img);
    assert_qemu_clean(&p);
}

#[test]
fn random_mutations_never_panic() {
    let dir = temp_dir("hostile-mut");
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, Some(4 << 20), Qcow2Version::V3, 4096, 16, None);
    {
        let mut img = open_rw(&base);
        let mut rng = Rng(7);
        for i in 0..64u64 {
            let mut b = vec![0u8; 6000];
            rng.fill(&mut b);
            img.write_at(i * 61_000 % (4 << 20) / 512 * 512, &b[..4096])
                .unwrap();
        }
    }
    let pristine = std::fs::read(&base).unwrap();
    let mut rng = Rng::seeded(0xbad_1dea);
    let p = dir.path().join("mut.qcow2");
    for _ in 0..400 {
        let mut data = pristine.clone();
        for _ in 0..1 + rng.below(8) {
            // Bias mutations towards the metadata at the start of the file.
            let limit = if rng.below(2) == 0 {
                4096 * 8
            } else {
                data.len() as u64
            };
            let i = rng.below(limit) as usize;
            data[i] = rng.next() as u8;
        }
        std::fs::write(&p, &data).unwrap();
        // Must not panic; errors are fine.
        if let Ok(mut img) = Qcow2Image::open(&p, rng.below(2) == 0) {
            let mut buf = vec![0u8; 65536];
            for k in 0..8 {
                let _ = img.read_at(k * 300_000 % ((4 << 20) - 65536), &mut buf);
                let _ = img.block_status(k * 123_456 % ((4 << 20) - 4096), 4096);
            }
            let _ = img.write_at(8192, &[9u8; 5000]);
            let _ = img.discard(65536, 65536);
            let _ = img.flush();
        }
        let _ = block::inspect::check(&p, None);
    }
}
