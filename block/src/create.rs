//! Creating an image of any format ([`create`]).

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::qcow2::create::{self as qcow2_create, CreateOptions};
use crate::raw::RawImage;

/// Creates an image of the given format. For raw, only `opts.size` is used.
pub fn create(path: &Path, format: ImageFormat, opts: &CreateOptions) -> Result<()> {
    match format {
        ImageFormat::Raw => {
            if opts.backing_file.is_some() {
                return Err(Error::InvalidArgument(
                    "raw images cannot have a backing file".into(),
                ));
            }
            let size = opts
                .size
                .ok_or_else(|| Error::InvalidArgument("image size required".into()))?;
            RawImage::create(path, size)
        }
        ImageFormat::Qcow2 => qcow2_create::create(path, opts),
    }
}
