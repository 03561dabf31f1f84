//! Opening an image of any format ([`open`]), probing its format unless told.

use std::path::Path;

use crate::chain::Chain;
use crate::disk::DiskImage;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::host_file::HostFile;
use crate::lock::LockMode;
use crate::options::OpenOptions;
use crate::probe;
use crate::qcow2::{self, Qcow2Image};
use crate::raw::RawImage;

/// Opens an image, probing its format unless `opts.format` names it. A probed image is held
/// to `opts.probe`'s rules ([`probe`]): a probed qcow2 image that names a backing file may
/// be refused, and a writable image probed as raw refuses writes that would make it probe as
/// another format.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    // Checked before anything is opened: force-share is for read-only opens only.
    let lock_mode = LockMode::for_open(opts.read_only, opts.force_share)?;
    let mut file =
        HostFile::open(path, opts.read_only, opts.direct).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let probed = opts.format.is_none();
    let format = match opts.format {
        Some(f) => f,
        None => probe::probe_file(&file, path)?,
    };
    Ok(match format {
        ImageFormat::Raw => {
            file.lock(path, lock_mode)?;
            let mut img = RawImage::from_host_file(file, opts.read_only)?;
            if probed && !opts.read_only {
                tracing::warn!(
                    "{}: no format given and probing found raw: writes that would make its first bytes look like another format are refused; give format=raw to allow them",
                    path.display()
                );
                img.keep_probed_raw();
            }
            Box::new(img)
        }
        ImageFormat::Qcow2 => {
            let mut chain = Chain::new(opts.probe.follows_probed_names(opts.read_only));
            Box::new(Qcow2Image::open_file(
                file,
                path,
                opts.read_only,
                &mut chain,
                qcow2::OpenFlags {
                    direct: opts.direct,
                    force_share: opts.force_share,
                    ..Default::default()
                },
                probed.then_some(probe::Probed::Image),
            )?)
        }
    })
}
