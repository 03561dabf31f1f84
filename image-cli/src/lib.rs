//! `thinvm image ...`: a qemu-img / qemu-io style front end to the block crate, so people
//! can script thinvm's images the way they script QEMU's.
//!
//! Subcommands: `create`, `info`, `check`, `map`, `io`, `bench`, `compact`. Output formats,
//! JSON field names and exit codes follow qemu-img's.
//!
//! Images are locked as qemu-img and qemu-io lock them (`block::lock`): `info`, `map`,
//! `check` and `io -r` are readers and fail while another process (a VM, qemu-nbd, thinvm)
//! writes the image unless given `-U` / `--force-share`; `io`, `check -r`, `compact` and
//! `bench -w` are writers and fail while anyone else uses the image.
//!
//! This file only dispatches: the options are in `command.rs` and `args.rs`, opening an
//! image in `open.rs`, each subcommand in its own file.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod args;
mod bench;
mod check;
mod command;
mod compact;
mod create;
pub mod error;
mod info;
mod io;
mod map;
mod open;

use std::process::ExitCode;

use crate::open::ImageAccess;

pub use args::{AioArg, CacheArg, DetectZeroesArg, FormatArg, OutputFormat, RepairArg};
pub use command::ImageCommand;
pub use error::{CliError, Result};

/// Runs one `thinvm image` subcommand and returns the process exit code.
pub fn run(cmd: ImageCommand) -> ExitCode {
    let result = match cmd {
        ImageCommand::Create {
            format,
            backing,
            backing_format,
            options,
            quiet,
            file,
            size,
        } => create::run(create::CreateArgs {
            format,
            backing,
            backing_format,
            options,
            quiet,
            file,
            size,
        })
        .map(|()| 0),
        ImageCommand::Info {
            output,
            backing_chain,
            force_share,
            file,
        } => info::run(&file, output, backing_chain, force_share).map(|()| 0),
        ImageCommand::Check {
            repair,
            output,
            quiet,
            force_share,
            file,
        } => check::run(&file, repair, output, quiet, force_share),
        ImageCommand::Map {
            output,
            force_share,
            file,
        } => map::run(&file, output, force_share).map(|()| 0),
        ImageCommand::Io {
            detect_zeroes,
            read_only,
            force_share,
            format,
            cache,
            aio,
            commands,
            file,
        } => io::run(
            &file,
            ImageAccess {
                format,
                read_only,
                direct: cache == CacheArg::None,
                force_share,
            },
            detect_zeroes,
            aio,
            &commands,
        ),
        ImageCommand::Bench(args) => bench::run(&args).map(|()| 0),
        ImageCommand::Compact {
            output,
            format,
            file,
        } => compact::run(&file, format, output).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("thinvm: {e}");
            ExitCode::FAILURE
        }
    }
}
