//! What the demo measures of an overlay file: its allocated and apparent size, its
//! `thinvm image check` status; and a sparse copy of it for the results.

use std::path::Path;
use std::process::Command;

use crate::error::{io, DemoError, Result};

/// (allocated, apparent) bytes of the file; (0, 0) if it cannot be read.
pub fn usage(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| (m.blocks() * 512, m.size()))
        .unwrap_or((0, 0))
}

/// `clean`, or what `thinvm image check` found.
pub fn check_status(p: &Path) -> String {
    match block::inspect::check(p, None) {
        Ok(r) if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 => "clean".into(),
        Ok(r) if r.corruptions > 0 => format!("{} corruptions", r.corruptions),
        Ok(r) => format!("{} leaked clusters", r.leaks),
        Err(e) => format!("cannot check: {e}"),
    }
}

/// Copies a file keeping holes (the overlay is sparse after reclamation).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(io("copying the overlay"))?;
    if !status.success() {
        return Err(DemoError::Step(format!(
            "cp {} {} failed",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}
