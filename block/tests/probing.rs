//! Format probing cannot be turned against the host (QEMU's CVE-2008-2004 class): a raw
//! disk whose sector 0 holds a qcow2 header naming a host file is never opened as that
//! qcow2 image for a guest or for writing, a backing file of unrecorded format may not do
//! it one level down, and a writable probed-raw image refuses every write (plain, vectored,
//! batched, whole or in pieces) that would make it probe as qcow2, while ordinary and zero
//! writes go through.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use block::qcow2::{Qcow2Image, Qcow2Version};
use block::{DetectZeroes, DiskImage, Error, ImageFormat, OpenOptions, ProbePolicy};
use common::*;

const DISK: u64 = 4 << 20;
const SECRET: &[u8] = b"the host's secret: only the host may read this\n";

/// A host "secret" file and a raw disk whose first bytes are a qcow2 header naming that file
/// as a raw backing file: what a guest can write into sector 0 of its raw disk.
fn attacked_disk(dir: &TempDir) -> (PathBuf, PathBuf) {
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let header = dir.path().join("header.qcow2");
    create_qcow2(
        &header,
        Some(1 << 20),
        Qcow2Version::V3,
        65536,
        16,
        Some((s(&secret), ImageFormat::Raw)),
    );
    let bytes = std::fs::read(&header).unwrap();
    let disk = dir.path().join("disk.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(DISK).unwrap();
    f.write_all_at(&bytes, 0).unwrap();
    (disk, secret)
}

fn opts(read_only: bool, format: Option<ImageFormat>, probe: ProbePolicy) -> OpenOptions {
    OpenOptions {
        read_only,
        format,
        probe,
        ..Default::default()
    }
}

fn open(p: &Path, o: OpenOptions) -> block::Result<Box<dyn DiskImage>> {
    block::open(p, &o)
}

fn refused(r: block::Result<Box<dyn DiskImage>>) -> String {
    match r {
        Ok(img) => panic!("opened as {:?} although it is refused", img.format()),
        Err(e) => {
            assert!(matches!(e, Error::Probe(_)), "not a probing refusal: {e}");
            e.to_string()
        }
    }
}

#[test]
fn a_probed_raw_disk_holding_a_qcow2_header_that_names_a_file_is_refused() {
    let dir = temp_dir("probe-attack");
    let (disk, secret) = attacked_disk(&dir);

    // For a guest, read-only or not, and for any writable open: refused, naming the image
    // and the file, saying how to proceed.
    for (ro, policy) in [
        (false, ProbePolicy::Guest),
        (true, ProbePolicy::Guest),
        (false, ProbePolicy::HostTool),
    ] {
        let e = refused(open(&disk, opts(ro, None, policy)));
        assert!(e.contains(s(&disk)), "{e}");
        assert!(e.contains(s(&secret)), "{e}");
        assert!(e.contains("format=qcow2") && e.contains("-f qcow2"), "{e}");
    }
    // The default policy is the guest's.
    refused(open(&disk, OpenOptions::default()));
    // `thinvm image compact` writes: it refuses too unless told.
    let e = block::inspect::compact(&disk, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Probe(_)), "{e}");
    assert!(e.to_string().contains(s(&secret)), "{e}");

    // Read-only host inspection keeps qemu-img's behaviour; an explicit format is obeyed.
    let mut img = open(&disk, opts(true, None, ProbePolicy::HostTool)).unwrap();
    assert_eq!(img.format(), ImageFormat::Qcow2);
    let mut buf = vec![0u8; SECRET.len()];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
    drop(img);
    let img = open(
        &disk,
        opts(false, Some(ImageFormat::Qcow2), ProbePolicy::Guest),
    )
    .unwrap();
    assert_eq!(img.format(), ImageFormat::Qcow2);
    drop(img);
    let mut img = open(
        &disk,
        opts(false, Some(ImageFormat::Raw), ProbePolicy::Guest),
    )
    .unwrap();
    assert_eq!(img.virtual_size(), DISK);
    img.read_at(0, &mut buf[..4]).unwrap();
    assert_eq!(&buf[..4], b"QFI\xfb");
}

#[test]
fn recording_a_probed_format_follows_the_guests_rules() {
    let dir = temp_dir("probe-create");
    let (disk, secret) = attacked_disk(&dir);
    // `thinvm image create -b disk.raw` without -F would record "qcow2" and so launder the
    // attack: refused. With -F the user decides.
    let ov = dir.path().join("ov.qcow2");
    let create = |fmt: Option<ImageFormat>| {
        block::qcow2::create(
            &ov,
            &block::qcow2::CreateOptions {
                backing_file: Some(s(&disk).to_string()),
                backing_format: fmt,
                ..Default::default()
            },
        )
    };
    let e = create(None).unwrap_err();
    assert!(matches!(e, Error::Probe(_)), "{e}");
    assert!(e.to_string().contains(s(&secret)), "{e}");
    assert!(e.to_string().contains("-F qcow2"), "{e}");
    assert!(!ov.exists(), "the overlay was created");
    create(Some(ImageFormat::Raw)).unwrap();
    let mut img = open(
        &ov,
        opts(true, Some(ImageFormat::Qcow2), ProbePolicy::Guest),
    )
    .unwrap();
    let mut head = [0u8; 4];
    img.read_at(0, &mut head).unwrap();
    assert_eq!(&head, b"QFI\xfb", "the raw disk's bytes, not the secret");
}

/// An overlay whose header names `backing` without recording its format.
fn overlay_without_backing_format(dir: &TempDir, name: &str, backing: &Path) -> PathBuf {
    let ov = dir.path().join(name);
    create_qcow2(&ov, Some(DISK), Qcow2Version::V3, 65536, 16, None);
    let img = Qcow2Image::open(&ov, true).unwrap();
    let mut h = img.header().clone();
    drop(img);
    h.backing_file = Some(s(backing).to_string());
    h.backing_format = None;
    let f = std::fs::OpenOptions::new().write(true).open(&ov).unwrap();
    f.write_all_at(&h.serialize().unwrap(), 0).unwrap();
    ov
}

#[test]
fn a_backing_file_of_unrecorded_format_may_not_name_another_file_either() {
    let dir = temp_dir("probe-backing");
    let (disk, secret) = attacked_disk(&dir);
    let ov = overlay_without_backing_format(&dir, "ov.qcow2", &disk);
    let qcow = Some(ImageFormat::Qcow2);
    for (ro, policy) in [
        (false, ProbePolicy::Guest),
        (true, ProbePolicy::Guest),
        (false, ProbePolicy::HostTool),
    ] {
        let e = refused(open(&ov, opts(ro, qcow, policy)));
        assert!(e.contains(s(&disk)) && e.contains(s(&secret)), "{e}");
        assert!(e.contains("qemu-img rebase -u"), "{e}");
    }
    match Qcow2Image::open(&ov, true) {
        Ok(_) => panic!("Qcow2Image::open followed a probed backing file's name"),
        Err(e) => assert!(matches!(e, Error::Probe(_)), "{e}"),
    }
    // Read-only host inspection follows it, as qemu-img does.
    let mut img = open(&ov, opts(true, qcow, ProbePolicy::HostTool)).unwrap();
    let mut buf = vec![0u8; SECRET.len()];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
    drop(img);

    // Probing backing files is still fine where the probe cannot name anything: a raw file,
    // or a qcow2 image without a backing file.
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let plain = dir.path().join("plain.qcow2");
    create_qcow2(&plain, Some(1 << 20), Qcow2Version::V3, 65536, 16, None);
    for base in [&raw, &plain] {
        let ov = overlay_without_backing_format(&dir, "ov2.qcow2", base);
        open(&ov, opts(false, qcow, ProbePolicy::Guest)).unwrap();
    }
}

/// A writable image that probed as raw.
fn probed_raw(dir: &TempDir, name: &str, direct: bool) -> Option<(PathBuf, Box<dyn DiskImage>)> {
    let p = dir.path().join(name);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let o = OpenOptions {
        direct,
        ..opts(false, None, ProbePolicy::Guest)
    };
    match block::open(&p, &o) {
        Ok(img) => {
            assert_eq!(img.format(), ImageFormat::Raw);
            Some((p, img))
        }
        Err(e) if direct && e.is_direct_io_unsupported() => None,
        Err(e) => panic!("{e}"),
    }
}

fn head(p: &Path) -> [u8; 4] {
    let mut h = [0u8; 4];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut h, 0)
        .unwrap();
    h
}

fn is_probe_refusal(r: block::Result<()>) -> bool {
    matches!(r, Err(Error::Probe(_)))
}

#[test]
fn a_probed_raw_image_refuses_writes_that_would_make_it_qcow2() {
    let dir = temp_dir("probe-write");
    for direct in [false, true] {
        let Some((p, mut img)) = probed_raw(&dir, "w.raw", direct) else {
            eprintln!("no O_DIRECT on this file system: the direct variant is skipped");
            continue;
        };
        let mut scratch = Vec::new();
        let mut header = vec![0u8; 4096];
        header[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");

        // Whole: plain, vectored, batched.
        assert!(is_probe_refusal(img.write_at(0, &header)));
        let parts: [&[u8]; 3] = [&header[..1], &header[1..3], &header[3..]];
        assert!(is_probe_refusal(img.write_vectored_at(
            0,
            &parts,
            &mut scratch
        )));
        let one: [&[u8]; 1] = [&header];
        assert!(is_probe_refusal(img.write_many(
            &[(0, &one)],
            4,
            &mut scratch
        )));
        assert_eq!(head(&p), [0; 4], "direct={direct}");

        // In pieces: the file already holds part of the magic, the write adds the rest.
        img.write_at(0, b"QF").unwrap();
        assert!(is_probe_refusal(img.write_at(2, b"I\xfb")));
        let tail: [&[u8]; 2] = [b"I", b"\xfb"];
        assert!(is_probe_refusal(img.write_vectored_at(
            2,
            &tail,
            &mut scratch
        )));
        assert_eq!(head(&p), *b"QF\0\0", "direct={direct}");
        img.write_at(0, b"\0\0").unwrap();
        img.write_at(2, b"I\xfb").unwrap();
        assert!(is_probe_refusal(img.write_at(0, b"QF")));
        assert_eq!(head(&p), *b"\0\0I\xfb", "direct={direct}");
        img.write_at(2, b"\0\0").unwrap();

        // In pieces within one batch, where neither piece alone is refused against the file.
        let a: [&[u8]; 1] = [b"QF"];
        let b: [&[u8]; 1] = [b"I\xfb"];
        assert!(is_probe_refusal(img.write_many(
            &[(0, &a), (2, &b)],
            4,
            &mut scratch
        )));
        assert_ne!(head(&p), *b"QFI\xfb", "direct={direct}");

        // Ordinary writes there, zeros in every form, and the magic elsewhere are fine.
        img.write_at(0, &[0u8; 4]).unwrap();
        img.write_at(0, &[0xab; 4096]).unwrap();
        assert_eq!(head(&p), [0xab; 4]);
        img.write_at(1, b"QFI\xfb").unwrap();
        img.write_at(512, &header).unwrap();
        img.write_many(&[(0, &a), (4096, &one)], 4, &mut scratch)
            .unwrap();
        img.write_zeroes(0, 4096, false).unwrap();
        img.write_at(0, b"QFI").unwrap();
        img.discard(0, 4096).unwrap();
        img.set_detect_zeroes(DetectZeroes::Unmap);
        img.write_at(0, &[0u8; 4096]).unwrap();
        assert_eq!(head(&p), [0; 4]);
        drop(img);
        // Still raw.
        assert_eq!(block::probe_format(&p).unwrap(), ImageFormat::Raw);

        // format=raw given: the user decides.
        let o = OpenOptions {
            direct,
            ..opts(false, Some(ImageFormat::Raw), ProbePolicy::Guest)
        };
        let mut img = block::open(&p, &o).unwrap();
        img.write_at(0, &header).unwrap();
        drop(img);
        assert_eq!(head(&p), *b"QFI\xfb");
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn a_probed_raw_image_shorter_than_the_probe_is_guarded_too() {
    let dir = temp_dir("probe-short");
    let p = dir.path().join("short.raw");
    std::fs::write(&p, [0u8; 6]).unwrap();
    let mut img = block::open(&p, &opts(false, None, ProbePolicy::Guest)).unwrap();
    assert!(is_probe_refusal(img.write_at(0, b"QFI\xfb")));
    img.write_at(0, b"QFI").unwrap();
    assert!(is_probe_refusal(img.write_at(3, b"\xfb")));
    img.write_at(3, b"\xfa\xfb\xfc").unwrap();
}

#[test]
fn a_probed_raw_image_refuses_the_headers_of_formats_qemu_would_probe() {
    // thinvm only opens qcow2 and raw, but the disk may later go to qemu-img or QEMU without
    // a format: a VMDK descriptor or a QED header written by the guest could name host files
    // there.
    let dir = temp_dir("probe-foreign");
    let Some((p, mut img)) = probed_raw(&dir, "f.raw", false) else {
        unreachable!("buffered opens always work");
    };
    let mut vdi = vec![0u8; 512];
    vdi[0x40..0x44].copy_from_slice(b"\x7f\x10\xda\xbe");
    let heads: [&[u8]; 7] = [
        b"QED\0",
        b"KDMV",
        b"# Disk DescriptorFile\nversion=1\n",
        b"conectix",
        b"vhdxfile",
        b"LUKS\xba\xbe",
        &vdi,
    ];
    for h in heads {
        let mut sector = vec![0u8; 512];
        sector[..h.len()].copy_from_slice(h);
        assert!(
            is_probe_refusal(img.write_at(0, &sector)),
            "{:?}",
            String::from_utf8_lossy(&h[..h.len().min(8)])
        );
    }
    // The same bytes anywhere but where a probe looks are ordinary data.
    img.write_at(1, b"KDMV").unwrap();
    img.write_at(0x41, b"\x7f\x10\xda\xbe").unwrap();
    img.write_at(4096, b"# Disk DescriptorFile\n").unwrap();
    drop(img);
    assert_eq!(block::probe_format(&p).unwrap(), ImageFormat::Raw);
}

#[test]
fn a_probed_raw_image_writes_the_bytes_it_checked() {
    // A guest's vCPUs may change a request's buffer while the request is in flight (with
    // io_uring or the I/O threads, between planning and the data write): the bytes written
    // where the probe looks are the ones the check saw, not what the buffer holds later.
    let dir = temp_dir("probe-race");
    let Some((p, mut img)) = probed_raw(&dir, "r.raw", false) else {
        unreachable!("buffered opens always work");
    };
    let mut buf = vec![0xabu8; 8192];
    let ptr = buf.as_mut_ptr();
    // SAFETY: `buf` outlives the plan and is only changed below through `ptr` (no Rust
    // reference to it is used until the plan has finished).
    let io = unsafe { block::IoBuf::new(ptr, 8192) };
    let plan = img.plan_write(0, &[io]).unwrap();
    // The "guest" now writes a qcow2 header over the buffer, and new data past the probe.
    let magic = b"QFI\xfb\0\0\0\x03";
    // SAFETY: `ptr` points at 8192 bytes of `buf`, which no reference is held to.
    unsafe {
        std::ptr::copy_nonoverlapping(magic.as_ptr(), ptr, magic.len());
        std::ptr::write_bytes(ptr.add(4096), 0xcd, 4096);
    }
    let r = plan.run_sync().map_err(|e| Error::io("write", e));
    img.finish(plan, r).unwrap();
    drop(img);
    let data = std::fs::read(&p).unwrap();
    assert_eq!(
        &data[..512],
        &[0xab; 512][..],
        "the probed bytes as checked"
    );
    assert_eq!(block::probe_format(&p).unwrap(), ImageFormat::Raw);
    // Past the probed bytes the request's buffer is written as it is when the I/O runs
    // (no copy of the whole request).
    assert_eq!(&data[4096..8192], &[0xcd; 4096][..]);
    drop(buf);
}

#[test]
fn a_probed_raw_image_refuses_zeroing_that_completes_a_signature() {
    // QED's magic ends in a zero byte: zeroing it after the guest wrote "QED\x01" would make
    // the image probe as QED as surely as writing it.
    let dir = temp_dir("probe-zero");
    let Some((p, mut img)) = probed_raw(&dir, "z.raw", false) else {
        unreachable!("buffered opens always work");
    };
    img.write_at(0, b"QED\x01").unwrap();
    assert!(is_probe_refusal(img.write_zeroes(3, 1, false)));
    assert!(is_probe_refusal(img.write_zeroes(3, 509, true)));
    assert!(is_probe_refusal(img.discard(3, 1)));
    let mut head = [0u8; 4];
    img.read_at(0, &mut head).unwrap();
    assert_eq!(&head, b"QED\x01");
    // Zeroing all of it, or elsewhere, is fine.
    img.write_zeroes(4, 508, false).unwrap();
    img.write_zeroes(0, 4096, true).unwrap();
    img.discard(0, 4096).unwrap();
    drop(img);
    assert_eq!(block::probe_format(&p).unwrap(), ImageFormat::Raw);
}
