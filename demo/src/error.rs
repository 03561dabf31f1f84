//! The demo's error type, and a helper that names what an I/O error was doing.

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Guest(#[from] guest_rig::RigError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Step(String),
    #[error("{0}")]
    Image(#[from] block::Error),
    #[error("stopped (Ctrl-C)")]
    Interrupted,
    /// The chart could not be drawn or written.
    #[error("chart {}: {source}", path.display())]
    Chart {
        path: std::path::PathBuf,
        #[source]
        source: plotters::drawing::DrawingAreaErrorKind<std::io::Error>,
    },
    /// More steps than the chart's key has room for.
    #[error("chart {}: too many steps for the key", path.display())]
    ChartKeyTooLong { path: std::path::PathBuf },
}

/// Result alias of the demo.
pub type Result<T> = std::result::Result<T, DemoError>;

/// Wraps an I/O error with what was being done (for `map_err`).
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}
