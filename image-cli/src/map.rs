//! `thinvm image map`: qemu-img map's JSON and human output.

use std::path::{Path, PathBuf};

use block::MapExtent;

use crate::args::OutputFormat;
use crate::error::{CliError, Result};
use crate::open::{open_image, ImageAccess};

/// Every extent of the image, merged the way qemu-img merges them.
pub fn extents(file: &Path, force_share: bool) -> Result<Vec<MapExtent>> {
    let mut img = open_image(
        file,
        ImageAccess {
            read_only: true,
            force_share,
            ..Default::default()
        },
    )?;
    let size = img.virtual_size();
    let mut out: Vec<MapExtent> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img
            .block_status(pos, (size - pos).min(1 << 30))
            .map_err(|e| CliError::image(file, e))?;
        if e.length == 0 {
            return Err(CliError::Command(format!(
                "block status returned an empty extent at {pos}"
            )));
        }
        pos += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && contiguous
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// The file of each chain layer, for the human output.
fn chain_files(file: &Path, force_share: bool) -> Vec<PathBuf> {
    match block::inspect::info_chain_shared(file, force_share) {
        Ok(c) => c.into_iter().map(|i| PathBuf::from(i.filename)).collect(),
        Err(_) => vec![file.to_path_buf()],
    }
}

pub fn run(file: &Path, output: OutputFormat, force_share: bool) -> Result<()> {
    let ext = extents(file, force_share)?;
    match output {
        OutputFormat::Json => {
            let lines: Vec<String> = ext
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data
                    );
                    if let Some(o) = e.offset {
                        s.push_str(&format!(", \"offset\": {o}"));
                    }
                    s.push('}');
                    s
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            let files = chain_files(file, force_share);
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in ext.iter().filter(|e| e.data) {
                let Some(o) = e.offset else { continue };
                let f = files
                    .get(e.depth as usize)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    format!("{:#x}", e.start).replace("0x0", "0"),
                    format!("{:#x}", e.length),
                    format!("{o:#x}").replace("0x0", "0"),
                    f
                );
            }
        }
    }
    Ok(())
}
