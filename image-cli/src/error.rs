//! The image tool's error type.

/// Errors of `thinvm image` subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// A `-o` option's value the image crate refused (a compat level, a format name).
    #[error("{0}")]
    InvalidOption(#[source] block::Error),
    /// An error from the image crate, with the file it concerns.
    #[error("{file}: {source}")]
    Image {
        file: String,
        #[source]
        source: block::Error,
    },
    /// A size argument that is not a size.
    #[error(transparent)]
    Size(#[from] units::SizeError),
    /// A qemu-io style command failed (pattern mismatch and the like).
    #[error("{0}")]
    Command(String),
    /// Writing output failed.
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
    /// JSON serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// Wraps an image error with the file name.
    pub fn image(file: &std::path::Path, source: block::Error) -> Self {
        CliError::Image {
            file: file.display().to_string(),
            source,
        }
    }
}

/// Result alias of the image tool.
pub type Result<T> = std::result::Result<T, CliError>;
