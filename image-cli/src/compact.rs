//! `thinvm image compact`.

use std::io::IsTerminal;
use std::path::Path;

use units::human_size;

use crate::args::{FormatArg, OutputFormat};
use crate::error::{CliError, Result};

pub fn run(file: &Path, format: Option<FormatArg>, output: OutputFormat) -> Result<()> {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} compacting [{bar:40}] {percent:>3}% {elapsed_precise}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        Some(b)
    } else {
        None
    };
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let r = block::inspect::compact_with_format(file, format.map(Into::into), &mut progress)
        .map_err(|e| CliError::image(file, e));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = r?;
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        OutputFormat::Human => {
            println!("Compacted {}", file.display());
            println!(
                "  allocated (disk) size: {} -> {} ({} bytes -> {} bytes)",
                human_size(r.before.allocated_bytes),
                human_size(r.after.allocated_bytes),
                r.before.allocated_bytes,
                r.after.allocated_bytes
            );
            println!(
                "  apparent (file) size:  {} -> {} ({} bytes -> {} bytes)",
                human_size(r.before.apparent_bytes),
                human_size(r.after.apparent_bytes),
                r.before.apparent_bytes,
                r.after.apparent_bytes
            );
            println!(
                "  allocated clusters:    {} -> {}",
                r.allocated_clusters_before, r.allocated_clusters_after
            );
            println!(
                "  zero clusters reclaimed: {}, clusters moved: {}",
                r.zero_clusters_reclaimed, r.clusters_moved
            );
        }
    }
    Ok(())
}
