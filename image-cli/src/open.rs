//! How a subcommand opens its image (format, read-only, O_DIRECT, `-U`) and gets an I/O
//! pipeline on the engine `-i` names; errors worded for the command line.

use crate::args::{AioArg, FormatArg};
use crate::error::{CliError, Result};

/// How a subcommand opens its image.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ImageAccess {
    pub format: Option<FormatArg>,
    pub read_only: bool,
    /// O_DIRECT (`-t none`).
    pub direct: bool,
    /// `-U`: lock without refusing other users (read-only only).
    pub force_share: bool,
}

/// Opens an image for the tool.
pub(crate) fn open_image(
    file: &std::path::Path,
    access: ImageAccess,
) -> Result<Box<dyn block::DiskImage>> {
    let img = block::open(
        file,
        &block::OpenOptions {
            read_only: access.read_only,
            format: access.format.map(Into::into),
            direct: access.direct,
            probe: block::ProbePolicy::HostTool,
            force_share: access.force_share,
        },
    )
    .map_err(|e| {
        if access.direct && e.is_direct_io_unsupported() {
            CliError::Usage(format!(
                "{}: the file system does not support O_DIRECT (-t none); use -t writeback",
                file.display()
            ))
        } else {
            CliError::image(file, e)
        }
    })?;
    if access.format.is_none() && !access.read_only && img.format() == block::ImageFormat::Raw {
        eprintln!(
            "thinvm: warning: {}: no format given and probing found raw: writes that would make its first bytes look like another format are refused; give -f raw to allow them",
            file.display()
        );
    }
    Ok(img)
}

/// A pipeline on the engine `aio` names (default: io_uring where it works, else threads).
pub(crate) fn pipeline(aio: Option<AioArg>) -> Result<block::pipeline::Pipeline> {
    let aio = aio
        .map(block::engine::Aio::from)
        .unwrap_or_else(|| block::engine::default_aio().0);
    let engine = block::engine::new_engine(aio)
        .map_err(|e| CliError::Usage(format!("cannot use aio={}: {e}", aio.name())))?;
    Ok(block::pipeline::Pipeline::new(engine))
}
