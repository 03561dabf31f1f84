//! Crafted metadata against the whole-image paths: `info`, `check`, the refcount rebuild of a
//! dirty image at a writable open, writes that allocate (the free-space index), online tail
//! relocation at flush, `check -r all` and offline compaction. The first bytes of the input
//! steer: set the dirty bit, stretch the file sparsely (up to 8 TiB past its bytes, so
//! tables can claim far more than the file holds), and pick the paths to run; the rest is
//! the image.
//!
//! Nothing may panic, hang or allocate without bound, and the bounds are asserted: a check
//! keeps at most `MAX_MESSAGES` lines, and reads each table the file holds at most a few
//! times (never once per naming entry, never a table in a hole).
#![no_main]

use std::io::Write;
use std::path::Path;

use block::inspect::RepairMode;
use block::qcow2::Qcow2Image;
use block::DiskImage;
use libfuzzer_sys::fuzz_target;

/// The check's message cap (block's `check::refs::MAX_MESSAGES`).
const MAX_MESSAGES: usize = 1000;

struct Steer {
    dirty: bool,
    write: bool,
    repair: bool,
    compact: bool,
    /// Bytes the file is stretched by (sparse).
    stretch: u64,
}

fn materialize(path: &Path, image: &[u8], s: &Steer) -> bool {
    let Ok(mut f) = std::fs::File::create(path) else {
        return false;
    };
    if f.write_all(image).is_err() {
        return false;
    }
    if s.dirty && image.len() >= 80 {
        use std::os::unix::fs::FileExt;
        let _ = f.write_all_at(&[image[79] | 1], 79);
    }
    if s.stretch > 0 {
        let _ = f.set_len(image.len() as u64 + s.stretch);
    }
    true
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, image) = data.split_at(8);
    let s = Steer {
        dirty: ctl[0] & 1 != 0,
        write: ctl[0] & 2 != 0,
        repair: ctl[0] & 4 != 0,
        compact: ctl[0] & 8 != 0,
        stretch: if ctl[0] & 16 != 0 {
            u64::from(u32::from_le_bytes([ctl[1], ctl[2], ctl[3], ctl[4]])) << 11
        } else {
            0
        },
    };
    let dir = std::env::temp_dir().join(format!("thinvm-fuzz-meta-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("img.qcow2");
    // Tables the file holds: each at a distinct offset inside the input's bytes (the rest
    // is a hole). A check reads L2 and snapshot L1 tables once and refcount blocks at most
    // three times (the comparison and the two COPIED passes).
    let table_bound = 5 * (image.len() as u64 / 512 + 2);

    if !materialize(&path, image, &s) {
        return;
    }
    let _ = block::inspect::info(&path);
    if let Ok(mut img) = Qcow2Image::open_without_backing(&path, true) {
        if let Ok(r) = img.check(None) {
            assert!(r.messages.len() <= MAX_MESSAGES, "{} messages", r.messages.len());
        }
        assert!(
            img.walk_table_reads() <= table_bound,
            "check read {} tables of a {}-byte image",
            img.walk_table_reads(),
            image.len()
        );
    }

    if s.write {
        // A writable open rebuilds a dirty image's refcounts.
        if let Ok(mut img) = Qcow2Image::open(&path, false) {
            assert!(img.walk_table_reads() <= table_bound);
            let size = img.virtual_size();
            let buf = vec![0x5au8; 8192];
            if size >= 8192 {
                let _ = img.write_at(0, &buf);
                let _ = img.write_at(size / 2 / 512 * 512, &buf[..4096]);
                let _ = img.discard(0, 4096);
                let _ = img.flush();
            }
        }
    }
    if s.repair && materialize(&path, image, &s) {
        if let Ok(r) = block::inspect::check(&path, Some(RepairMode::All)) {
            assert!(r.messages.len() <= 2 * MAX_MESSAGES);
        }
    }
    if s.compact && materialize(&path, image, &s) {
        let _ = block::inspect::compact(&path, &mut |_, _| {});
    }
    let _ = std::fs::remove_file(&path);
});
