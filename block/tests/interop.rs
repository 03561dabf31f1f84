//! Interoperability with QEMU's own tools, both ways: images QEMU writes are read correctly
//! by the crate, and images the crate writes pass `qemu-img check` and read the same as a
//! raw reference under `qemu-img compare`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use block::qcow2::Qcow2Version;
use block::ImageFormat;
use common::*;

/// Applies qemu-io style pattern writes to a model.
fn model_write(model: &mut [u8], off: u64, len: u64, pat: u8) {
    model[off as usize..(off + len) as usize].fill(pat);
}

/// A set of writes covering whole clusters, partial clusters and cluster boundaries.
fn writes(cs: u64, size: u64) -> Vec<(u64, u64, u8)> {
    let mut v = vec![
        (0, 512, 0x11),
        (cs, cs, 0x22),
        (cs * 3 + 512, 1024, 0x33),
        (cs * 5 - 512, 1536, 0x44),
        (size - 4096, 4096, 0x55),
        (size / 2, cs * 3, 0x66),
    ];
    v.retain(|&(o, l, _)| o + l <= size);
    v
}

#[test]
fn qemu_written_images_read_correctly() {
    let dir = temp_dir("interop-read");
    let size = 8u64 << 20;
    let base = dir.path().join("base.raw");
    let base_data = patterned_raw(&base, 6 << 20); // smaller than the overlays
    let cases: &[(&str, u64, u32, bool)] = &[
        ("0.10", 65536, 16, false),
        ("0.10", 4096, 16, true),
        ("1.1", 512, 16, true),
        ("1.1", 4096, 1, false),
        ("1.1", 65536, 2, true),
        ("1.1", 65536, 4, false),
        ("1.1", 65536, 8, true),
        ("1.1", 65536, 32, false),
        ("1.1", 65536, 64, true),
        ("1.1", 2 << 20, 16, true),
    ];
    for (i, &(compat, cs, rb, with_backing)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.qcow2"));
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-o".into(),
            format!("compat={compat},cluster_size={cs},refcount_bits={rb}"),
        ];
        if with_backing {
            args.extend(["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]);
        }
        args.push(s(&img).into());
        args.push(size.to_string());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        ok("qemu-img", &a);
        let mut model = vec![0u8; size as usize];
        if with_backing {
            model[..base_data.len()].copy_from_slice(&base_data);
        }
        let mut io_args: Vec<String> = Vec::new();
        for (o, l, p) in writes(cs, size) {
            io_args.push("-c".into());
            io_args.push(format!("write -P {p} {o} {l}"));
            model_write(&mut model, o, l, p);
        }
        // A zeroed range over the backing file (v3: zero flag; v2: written zeros).
        let zo = (cs * 8).min(size - cs * 2);
        io_args.push("-c".into());
        io_args.push(format!("write -z {} {}", zo, cs * 2));
        model_write(&mut model, zo, cs * 2, 0);
        io_args.push(s(&img).into());
        let a: Vec<&str> = io_args.iter().map(|s| s.as_str()).collect();
        ok("qemu-io", &a);
        let mut im = open_ro(&img);
        let got = read_all(im.as_mut());
        assert_bytes_eq(&got, &model, &format!("case {i} {compat} cs={cs} rb={rb}"));
        // Unaligned reads across cluster boundaries.
        let mut buf = vec![0u8; (cs + 1000) as usize];
        let off = (cs * 5 - 700).min(size - buf.len() as u64);
        im.read_at(off, &mut buf).unwrap();
        assert_bytes_eq(
            &buf,
            &model[off as usize..off as usize + buf.len()],
            "unaligned read",
        );
    }
}

#[test]
fn crate_written_images_pass_qemu_check_and_compare() {
    let dir = temp_dir("interop-write");
    let size = 8u64 << 20;
    let base = dir.path().join("base.raw");
    let base_data = patterned_raw(&base, size);
    let cases: &[(Qcow2Version, u64, u32, bool)] = &[
        (Qcow2Version::V2, 65536, 16, false),
        (Qcow2Version::V2, 512, 16, true),
        (Qcow2Version::V3, 512, 1, false),
        (Qcow2Version::V3, 1024, 16, true),
        (Qcow2Version::V3, 4096, 2, true),
        (Qcow2Version::V3, 65536, 4, false),
        (Qcow2Version::V3, 65536, 8, true),
        (Qcow2Version::V3, 65536, 64, true),
        (Qcow2Version::V3, 2 << 20, 32, true),
    ];
    for (i, &(ver, cs, rb, with_backing)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("c{i}.qcow2"));
        create_qcow2(
            &img,
            Some(size),
            ver,
            cs,
            rb,
            with_backing.then_some(("base.raw", ImageFormat::Raw)),
        );
        assert_qemu_clean(&img);
        let info = qemu_info(&img);
        assert_eq!(info["virtual-size"], size);
        assert_eq!(info["cluster-size"], cs);
        let mut model = if with_backing {
            base_data.clone()
        } else {
            vec![0u8; size as usize]
        };
        {
            let mut im = open_rw(&img);
            for (o, l, p) in writes(cs, size) {
                im.write_at(o, &vec![p; l as usize]).unwrap();
                model_write(&mut model, o, l, p);
            }
            // Overwrites of allocated clusters in place.
            im.write_at(cs + 100, &[0x77; 300]).unwrap();
            model_write(&mut model, cs + 100, 300, 0x77);
            im.flush().unwrap();
            let got = read_all(im.as_mut());
            assert_bytes_eq(&got, &model, &format!("case {i} before reopen"));
        }
        assert_qemu_clean(&img);
        let reference = dir.path().join(format!("c{i}.raw"));
        std::fs::write(&reference, &model).unwrap();
        assert_same(&img, &reference);
        // And our own check agrees.
        let rep = block::inspect::check(&img, None).unwrap();
        assert_eq!(
            (rep.corruptions, rep.leaks),
            (0, 0),
            "case {i}: {:?}",
            rep.messages
        );
    }
}

#[test]
fn compressed_images_read_and_rewrite() {
    let dir = temp_dir("interop-compressed");
    let size = 4u64 << 20;
    let raw = dir.path().join("src.raw");
    let data = patterned_raw(&raw, size);
    for (name, extra) in [
        ("zlib", vec![]),
        ("zstd", vec!["-o", "compression_type=zstd"]),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        args.extend(extra.iter().copied());
        args.push(s(&raw));
        args.push(s(&img));
        ok("qemu-img", &args);
        let info = qemu_info(&img);
        assert_eq!(info["format-specific"]["data"]["compression-type"], name);
        {
            let mut im = open_ro(&img);
            let got = read_all(im.as_mut());
            assert_bytes_eq(&got, &data, &format!("{name} compressed read"));
        }
        // Writing over compressed clusters re-allocates them (copy-on-write).
        let mut model = data.clone();
        {
            let mut im = open_rw(&img);
            im.write_at(70000, &[0xee; 5000]).unwrap();
            model_write(&mut model, 70000, 5000, 0xee);
            im.write_at(1 << 20, &vec![0xdd; 65536]).unwrap();
            model_write(&mut model, 1 << 20, 65536, 0xdd);
            let got = read_all(im.as_mut());
            assert_bytes_eq(&got, &model, &format!("{name} after rewrite"));
        }
        assert_qemu_clean(&img);
        let reference = dir.path().join(format!("{name}.raw"));
        std::fs::write(&reference, &model).unwrap();
        assert_same(&img, &reference);
    }
}

#[test]
fn backing_chains_relative_names_and_short_backing() {
    let dir = temp_dir("interop-chain");
    let sub = dir.path().join("images");
    std::fs::create_dir_all(&sub).unwrap();
    let base = sub.join("base.raw");
    let base_data = patterned_raw(&base, 1 << 20);
    // qcow2 layers: mid (qemu-made, over raw), top (ours, over mid), bigger than the base.
    let mid = sub.join("mid.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "2M",
        ],
    );
    ok("qemu-io", &["-c", "write -P 0x42 512k 64k", s(&mid)]);
    let top = sub.join("top.qcow2");
    create_qcow2(
        &top,
        Some(3 << 20),
        Qcow2Version::V3,
        65536,
        16,
        Some(("mid.qcow2", ImageFormat::Qcow2)),
    );
    let mut model = vec![0u8; 3 << 20];
    model[..1 << 20].copy_from_slice(&base_data);
    model[512 << 10..576 << 10].fill(0x42);
    {
        let mut im = open_rw(&top);
        // Partial write into a cluster whose data comes from two layers down.
        im.write_at(4096, &[0x99; 100]).unwrap();
        model[4096..4196].fill(0x99);
        // Past the raw base's end but inside mid: zeros below.
        im.write_at((1 << 20) + 1000, &[0x98; 10]).unwrap();
        model[(1 << 20) + 1000..(1 << 20) + 1010].fill(0x98);
        let got = read_all(im.as_mut());
        assert_bytes_eq(&got, &model, "chain read");
    }
    // Relative names resolve against the overlay's directory, not the cwd.
    let chain = block::inspect::info_chain(&top).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2].format, ImageFormat::Raw);
    assert_qemu_clean(&top);
    let reference = dir.path().join("top.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_same(&top, &reference);
    // The backing files were never written.
    let after: Vec<u8> = std::fs::read(&base).unwrap();
    assert_eq!(after, base_data);
}

#[test]
fn map_matches_qemu_img_map() {
    let dir = temp_dir("interop-map");
    let base = dir.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 1M", s(&base)]);
    let img = dir.path().join("ov.qcow2");
    create_qcow2(
        &img,
        None,
        Qcow2Version::V3,
        65536,
        16,
        Some(("base.raw", ImageFormat::Raw)),
    );
    {
        let mut im = open_rw(&img);
        im.write_at(65536, &[5; 65536]).unwrap();
        im.write_zeroes(1 << 20, 131072, false).unwrap();
        im.write_at(3 << 20, &[6; 4096]).unwrap();
    }
    let want = qemu_map(&img);
    let mut im = open_ro(&img);
    let size = im.virtual_size();
    let mut got: Vec<serde_json::Value> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = im.block_status(pos, size - pos).unwrap();
        pos += e.length;
        let v = serde_json::to_value(e).unwrap();
        // Merge like qemu-img does.
        if let Some(last) = got.last_mut() {
            let same = ["depth", "present", "zero", "data"]
                .iter()
                .all(|k| last[k] == v[k]);
            let contiguous = match (last["offset"].as_u64(), v["offset"].as_u64()) {
                (Some(a), Some(b)) => a + last["length"].as_u64().unwrap() == b,
                (None, None) => true,
                _ => false,
            };
            if same && contiguous {
                let l = last["length"].as_u64().unwrap() + e.length;
                last["length"] = l.into();
                continue;
            }
        }
        got.push(v);
    }
    assert_eq!(got.len(), want.len(), "got {got:#?}\nwant {want:#?}");
    for (g, w) in got.iter().zip(&want) {
        for k in ["start", "length", "depth", "present", "zero", "data"] {
            assert_eq!(g[k], w[k], "field {k}: got {g} want {w}");
        }
        if w["depth"] == 0 && w["data"] == true {
            assert_eq!(g["offset"], w["offset"]);
        }
    }
}
