//! `thinvm image ...`: create, info, check, map, io, bench on disk images.

use std::path::PathBuf;
use std::process::ExitCode;

/// The `thinvm image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Show an image's format and virtual size.
    Info {
        /// The image file.
        file: PathBuf,
    },
}

/// Runs one `thinvm image` subcommand and returns the process exit code.
pub fn run(cmd: ImageCommand) -> ExitCode {
    match cmd {
        ImageCommand::Info { file } => {
            match block::open(
                &file,
                &block::OpenOptions {
                    read_only: true,
                    format: None,
                },
            ) {
                Ok(img) => {
                    println!("image: {}", file.display());
                    println!("file format: {}", img.format().name());
                    println!("virtual size: {} bytes", img.virtual_size());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("thinvm: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
