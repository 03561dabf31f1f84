//! Opens arbitrary bytes as a qcow2 image (read-only and writable) and reads, maps and
//! writes through it: nothing may panic, hang or allocate without bound.
#![no_main]

use std::io::Write;

use block::qcow2::Qcow2Image;
use block::DiskImage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("thinvm-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("img.qcow2");
    let Ok(mut f) = std::fs::File::create(&path) else { return };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    for writable in [false, true] {
        let Ok(mut img) = Qcow2Image::open(&path, !writable) else { continue };
        let size = img.virtual_size();
        let mut buf = vec![0u8; 65536];
        for off in [0u64, 512, 65536, 1 << 20, size.saturating_sub(4096)] {
            if off + 4096 <= size {
                let _ = img.read_at(off, &mut buf[..4096]);
                let _ = img.block_status(off, 4096);
            }
        }
        if writable && size >= 8192 {
            let _ = img.write_at(0, &buf[..8192]);
            let _ = img.write_zeroes(0, 4096, true);
            let _ = img.discard(4096, 4096);
            let _ = img.flush();
        }
    }
    let _ = block::inspect::check(&path, None);
});
