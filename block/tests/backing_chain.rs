//! Hostile backing chains: loops are found by file identity whatever names, symlinks or hard
//! links they go through; a FIFO, a terminal or another character device, a directory or a
//! socket as a backing file is refused at once (never waited on); a chain whose tables add
//! up past the chain's metadata budget fails with a clear error; legitimate deep chains
//! still open and read right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use block::qcow2::{Qcow2Image, Qcow2Version};
use block::{DiskImage, Error, ImageFormat, OpenOptions};
use common::*;

/// Rewrites the backing file name (and format) in the header of the qcow2 image `p`.
fn set_backing(p: &Path, name: &str, format: Option<ImageFormat>) {
    let img = Qcow2Image::open_without_backing(p, true).unwrap();
    let mut h = img.header().clone();
    drop(img);
    h.backing_file = Some(name.to_string());
    h.backing_format = format;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&h.serialize().unwrap(), 0).unwrap();
}

fn small(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path().join(name);
    create_qcow2(&p, Some(1 << 20), Qcow2Version::V3, 65536, 16, None);
    p
}

/// Opens `p` as qcow2 on another thread and returns the result's message; fails the test if
/// the open does not return within a minute (it blocked), after unblocking it if `fifo`.
fn open_err_unblocked(p: &Path, fifo: Option<&Path>) -> String {
    let (tx, rx) = mpsc::channel();
    let path = p.to_path_buf();
    std::thread::spawn(move || {
        let r = block::open(
            &path,
            &OpenOptions {
                read_only: true,
                format: Some(ImageFormat::Qcow2),
                ..Default::default()
            },
        );
        let _ = tx.send(r.err().map(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{} opened", p.display()),
        Err(_) => {
            if let Some(f) = fifo {
                // Let the blocked open go on, so the process can end.
                let _ = std::fs::OpenOptions::new().write(true).open(f);
            }
            panic!("opening {} blocked for a minute", p.display());
        }
    }
}

fn open_err(p: &Path) -> String {
    open_err_unblocked(p, None)
}

#[test]
fn loops_are_found_by_identity_not_by_depth() {
    let dir = temp_dir("chain-loop");
    // Two files naming each other.
    let a = small(&dir, "a.qcow2");
    let b = small(&dir, "b.qcow2");
    set_backing(&a, "b.qcow2", Some(ImageFormat::Qcow2));
    set_backing(&b, "a.qcow2", Some(ImageFormat::Qcow2));
    // A symlink to itself, and a hard link of itself, each under another name.
    let c = small(&dir, "c.qcow2");
    std::os::unix::fs::symlink("c.qcow2", dir.path().join("c-link.qcow2")).unwrap();
    set_backing(&c, "c-link.qcow2", Some(ImageFormat::Qcow2));
    let d = small(&dir, "d.qcow2");
    std::fs::hard_link(&d, dir.path().join("d-hard.qcow2")).unwrap();
    set_backing(&d, "d-hard.qcow2", Some(ImageFormat::Qcow2));
    // A qcow2 image that is its own raw backing file: not infinite, but not a chain either.
    let e = small(&dir, "e.qcow2");
    set_backing(&e, "e.qcow2", Some(ImageFormat::Raw));

    for (top, again) in [
        (&a, "a.qcow2"),
        (&c, "c-link.qcow2"),
        (&d, "d-hard.qcow2"),
        (&e, "e.qcow2"),
    ] {
        let msg = open_err(top);
        assert!(msg.contains("backing chain loop"), "{msg}");
        assert!(msg.contains(again), "{msg}");
        // Found at the first repeat: the message is not one nested error per level.
        assert!(msg.matches("backing file '").count() <= 1, "{msg}");
    }
    // `thinvm image info --backing-chain` too.
    for top in [&a, &c, &d] {
        let e = block::inspect::info_chain(top).unwrap_err();
        assert!(matches!(e, Error::Chain(_)), "{e}");
    }
}

#[test]
fn special_files_as_backing_files_are_refused_at_once() {
    let dir = temp_dir("chain-special");
    let ov = small(&dir, "ov.qcow2");

    let fifo = dir.path().join("fifo");
    ok("mkfifo", &[s(&fifo)]);
    for fmt in [Some(ImageFormat::Raw), Some(ImageFormat::Qcow2), None] {
        set_backing(&ov, s(&fifo), fmt);
        let e = open_err_unblocked(&ov, Some(&fifo));
        assert!(e.contains("a FIFO cannot be a disk image"), "{fmt:?}: {e}");
        // The image tool's probe and info must not wait on it either.
        let (tx, rx) = mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(block::inspect::info_chain(&f).is_err());
        });
        let refused = rx.recv_timeout(Duration::from_secs(60));
        if refused.is_err() {
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        }
        assert_eq!(refused, Ok(true), "info on a FIFO");
    }

    let mut chars = vec![PathBuf::from("/dev/null"), PathBuf::from("/dev/zero")];
    // /dev/tty only where this process has a terminal to open.
    if std::fs::File::open("/dev/tty").is_ok() {
        chars.push(PathBuf::from("/dev/tty"));
    }
    for dev in &chars {
        for fmt in [Some(ImageFormat::Raw), None] {
            set_backing(&ov, s(dev), fmt);
            let e = open_err(&ov);
            assert!(
                e.contains("a character device cannot be a disk image"),
                "{}: {e}",
                dev.display()
            );
        }
    }

    let sub = dir.path().join("subdir");
    std::fs::create_dir(&sub).unwrap();
    set_backing(&ov, s(&sub), Some(ImageFormat::Raw));
    let e = open_err(&ov);
    assert!(e.contains("a directory cannot be a disk image"), "{e}");

    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    set_backing(&ov, s(&sock), Some(ImageFormat::Raw));
    let e = open_err(&ov);
    assert!(e.contains(s(&sock)), "{e}");

    // As the image itself, too.
    for p in [fifo.as_path(), Path::new("/dev/null")] {
        let e = match block::open(p, &OpenOptions::default()) {
            Ok(_) => panic!("{} opened", p.display()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("cannot be a disk image"), "{e}");
    }
}

/// An image with 512-byte clusters and the largest L1 table QEMU opens (32 MiB), over
/// `backing` (named in the header afterwards: creating it must not open the chain below).
fn big_l1(dir: &TempDir, name: &str, backing: Option<&str>) -> PathBuf {
    let p = dir.path().join(name);
    create_qcow2(&p, Some(128 << 30), Qcow2Version::V3, 512, 16, None);
    if let Some(b) = backing {
        set_backing(&p, b, Some(ImageFormat::Qcow2));
    }
    p
}

#[test]
fn a_chain_may_not_claim_more_metadata_memory_than_its_budget() {
    let dir = temp_dir("chain-budget");
    // Each layer reads a 32 MiB L1 table at open (and would cache up to 40 MiB more); six of
    // them are more than a chain may hold (before, only the depth limit, 64 such layers,
    // bounded them).
    let mut below: Option<String> = None;
    for i in 0..6 {
        let name = format!("l{i}.qcow2");
        big_l1(&dir, &name, below.as_deref());
        below = Some(name);
    }
    let top = dir.path().join(below.unwrap());
    let img = Qcow2Image::open_without_backing(&top, true).unwrap();
    assert_eq!(u64::from(img.header().l1_size) * 8, 32 << 20);
    drop(img);
    let e = match Qcow2Image::open(&top, true) {
        Ok(_) => panic!("the chain opened"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Chain(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("metadata memory a backing chain may use"),
        "{msg}"
    );
    assert!(msg.contains("L1 table"), "{msg}");
    // Three such layers are within it.
    let three = dir.path().join("l2.qcow2");
    Qcow2Image::open(&three, true).unwrap();
}

#[test]
fn a_deep_legitimate_chain_opens_and_reads_every_layer() {
    let dir = temp_dir("chain-deep");
    // 40 layers of a 64 MiB disk; layer i writes byte i at MiB i.
    let mut below: Option<String> = None;
    for i in 0..40u8 {
        let name = format!("l{i}.qcow2");
        let p = dir.path().join(&name);
        create_qcow2(
            &p,
            Some(64 << 20),
            Qcow2Version::V3,
            65536,
            16,
            below.as_deref().map(|b| (b, ImageFormat::Qcow2)),
        );
        let mut img = Qcow2Image::open(&p, false).unwrap();
        img.write_at(u64::from(i) << 20, &[i + 1; 4096]).unwrap();
        drop(img);
        below = Some(name);
    }
    let top = dir.path().join(below.unwrap());
    let mut img = Qcow2Image::open(&top, true).unwrap();
    for i in 0..40u8 {
        let mut buf = [0u8; 4096];
        img.read_at(u64::from(i) << 20, &mut buf).unwrap();
        assert_eq!(buf, [i + 1; 4096], "layer {i}");
    }
    assert_eq!(block::inspect::info_chain(&top).unwrap().len(), 40);
}
