//! A disk's frozen point in a snapshot. With the disk's device paused and its image flushed,
//! the image the VM ran on (the ephemeral overlay, or the user's qcow2 file) moves into the
//! snapshot directory as `diskN.qcow2` and becomes the snapshot's read-only layer; a fresh
//! overlay over it takes its place (same path) and the running VM goes on there. Nothing is
//! copied. Across file systems (no rename) the image is copied instead and the VM stays on
//! it. A step that fails undoes the ones before.

use std::path::{Path, PathBuf};

use std::sync::mpsc::channel;

use block::{DetectZeroes, DiskImage, ImageFormat, OpenOptions};

use crate::config::{DiscardMode, DiskConfig};
use crate::disks::DiskHandle;
use crate::error::{Result, VmmError};

/// `--disk` options of a disk, without its path (what a restored VM opens it with). The
/// format is always given (never probed): a writable disk's frozen layer and every clone
/// overlay over it are qcow2 images that name their backing file. The number of queues is
/// the one the device offered (`queues`; the default depends on the vCPUs), so the clone's
/// transport has every queue the state holds; `aio=` only when it was chosen.
pub fn options(d: &DiskConfig, format: ImageFormat, queues: usize) -> String {
    let mut o = vec![
        format!("format={}", format.name()),
        format!("readonly={}", if d.read_only { "on" } else { "off" }),
        format!(
            "detect-zeroes={}",
            match d.detect_zeroes {
                DetectZeroes::Off => "off",
                DetectZeroes::On => "on",
                DetectZeroes::Unmap => "unmap",
            }
        ),
        format!(
            "discard={}",
            match d.discard {
                DiscardMode::Ignore => "ignore",
                DiscardMode::Unmap => "unmap",
            }
        ),
        format!("cache={}", if d.direct { "none" } else { "writeback" }),
        format!(
            "werror={}",
            match d.werror {
                devices::virtio::block::WriteErrorPolicy::Enospc => "enospc",
                devices::virtio::block::WriteErrorPolicy::Report => "report",
            }
        ),
    ];
    o.push(format!("num-queues={queues}"));
    if let Some(aio) = d.aio {
        o.push(format!("aio={}", aio.name()));
    }
    if let Some(s) = &d.serial {
        o.push(format!("serial={s}"));
    }
    o.join(",")
}

/// Why disk `h` cannot be frozen into a snapshot (checked before anything is paused).
pub fn check(h: &DiskHandle) -> Result<()> {
    if h.config.read_only {
        return Ok(());
    }
    if h.format != ImageFormat::Qcow2 {
        return Err(VmmError::SnapshotDiskNotQcow2 {
            path: h.path.clone(),
            format: h.format.name(),
        });
    }
    // Force-share (`qemu-img info -U`): the running VM holds the image's write lock.
    let info = block::inspect::info_shared(&h.path, true).map_err(|source| VmmError::DiskOpen {
        path: h.path.clone(),
        source,
    })?;
    if let Some(b) = &info.backing_filename {
        if !Path::new(b).is_absolute() {
            return Err(VmmError::SnapshotRelativeBacking {
                path: h.path.clone(),
                backing: b.clone(),
            });
        }
    }
    Ok(())
}

fn run_job(
    h: &DiskHandle,
    f: impl FnOnce(&mut Box<dyn DiskImage>) -> Result<()> + Send + 'static,
) -> Result<()> {
    let (tx, rx) = channel();
    h.jobs
        .run(Box::new(move |img| {
            let _ = tx.send(f(img));
        }))
        .map_err(VmmError::DevicePause)?;
    rx.recv().map_err(|_| VmmError::DiskWorkerGone {
        path: h.path.clone(),
    })?
}

/// What was done to a disk, to undo it.
pub enum Frozen {
    /// Read-only: nothing (the snapshot names the image).
    Shared,
    /// Moved into the snapshot; the VM runs on a new overlay at the old path.
    Moved,
    /// Copied into the snapshot; the VM stays on its image.
    Copied { layer: PathBuf },
}

/// Opens disk `h`'s qcow2 image at its path for writing, as the VM runs it.
fn open_running(h: &DiskHandle) -> Result<Box<dyn DiskImage>> {
    let mut image = block::open(
        &h.path,
        &OpenOptions {
            read_only: false,
            format: Some(ImageFormat::Qcow2),
            direct: h.config.direct,
            probe: block::ProbePolicy::Guest,
            force_share: false,
        },
    )
    .map_err(|source| VmmError::DiskOpen {
        path: h.path.clone(),
        source,
    })?;
    image.set_detect_zeroes(match (h.config.detect_zeroes, h.config.discard) {
        (DetectZeroes::Unmap, DiscardMode::Ignore) => DetectZeroes::On,
        (m, _) => m,
    });
    Ok(image)
}

/// Hands `image` to the worker in place of the one it has (which it drops: its file is
/// closed and its lock released).
fn install(h: &DiskHandle, image: Box<dyn DiskImage>) -> Result<()> {
    let mut new = Some(image);
    run_job(h, move |img| {
        if let Some(n) = new.take() {
            *img = n;
        }
        Ok(())
    })
}

/// A stand-in the parked worker holds while its image is swapped: an unlocked, read-only,
/// empty raw image on /dev/null (a parked worker does no I/O).
fn stand_in() -> Result<Box<dyn DiskImage>> {
    let f = std::fs::File::open("/dev/null").map_err(|e| VmmError::io("/dev/null", e))?;
    let img = block::raw::RawImage::from_file(f, true).map_err(|source| VmmError::DiskOpen {
        path: "/dev/null".into(),
        source,
    })?;
    Ok(Box::new(img))
}

/// Freezes disk `h` (its device paused) as `layer`.
pub fn freeze(h: &DiskHandle, layer: &Path) -> Result<Frozen> {
    if h.config.read_only {
        return Ok(Frozen::Shared);
    }
    let path = h.path.clone();
    run_job(h, move |img| {
        img.flush()
            .map_err(|source| VmmError::SnapshotDiskFlush { path, source })
    })?;
    let move_err = |op| {
        move |source| VmmError::SnapshotDiskMove {
            op,
            path: h.path.clone(),
            source,
        }
    };
    match std::fs::rename(&h.path, layer) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(&h.path, layer).map_err(move_err("copying"))?;
            return Ok(Frozen::Copied {
                layer: layer.to_path_buf(),
            });
        }
        Err(e) => return Err(move_err("moving")(e)),
    }
    // The worker lets go of the image (now the frozen layer): the new overlay opens it as
    // its backing file, which its lock refuses while it is open for writing.
    let undo_rename = || {
        let _ = std::fs::remove_file(&h.path);
        let _ = std::fs::rename(layer, &h.path);
    };
    if let Err(e) = stand_in().and_then(|s| install(h, s)) {
        undo_rename();
        return Err(VmmError::DiskRelease {
            path: h.path.clone(),
            source: Box::new(e),
        });
    }
    // From here a failure puts the image back where it was and the worker on it again.
    let undo = |error: VmmError| {
        undo_rename();
        match open_running(h).and_then(|img| install(h, img)) {
            Ok(()) => error,
            Err(reopen) => VmmError::DiskReopen {
                error: Box::new(error),
                reopen: Box::new(reopen),
            },
        }
    };
    let abs = std::fs::canonicalize(layer).map_err(|source| {
        undo(VmmError::DiskPath {
            path: layer.to_path_buf(),
            source,
        })
    })?;
    block::qcow2::create(
        &h.path,
        &block::qcow2::CreateOptions {
            backing_file: Some(abs.display().to_string()),
            backing_format: Some(ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .map_err(|source| {
        undo(VmmError::SnapshotOverlay {
            path: h.path.clone(),
            source,
        })
    })?;
    let image = open_running(h).map_err(undo)?;
    install(h, image).map_err(undo)?;
    Ok(Frozen::Moved)
}

/// Undoes [`freeze`] where the snapshot failed later (the VM is still paused). A moved layer
/// keeps its place under the new overlay (the guest's data is all there); only copies are
/// removed.
pub fn abandon(f: &Frozen) {
    if let Frozen::Copied { layer } = f {
        let _ = std::fs::remove_file(layer);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn saved_options_reopen_the_disk_with_the_queues_and_engine_it_had() {
        // No num-queues given: the device had one per vCPU; the clone gets that many.
        let d = crate::config::parse_disk("path=a,format=qcow2,aio=sync").unwrap();
        let o = options(&d, ImageFormat::Qcow2, 3);
        let back = crate::config::parse_disk(&format!("path=b,{o}")).unwrap();
        assert_eq!(back.num_queues, Some(3));
        assert_eq!(back.aio, Some(block::engine::Aio::Sync));
        assert_eq!(back.format, Some(ImageFormat::Qcow2));
        // No aio= chosen: the clone picks its host's default.
        let d = crate::config::parse_disk("path=a").unwrap();
        let back =
            crate::config::parse_disk(&format!("path=b,{}", options(&d, ImageFormat::Raw, 1)))
                .unwrap();
        assert_eq!(back.aio, None);
        assert_eq!(back.num_queues, Some(1));
    }
}
