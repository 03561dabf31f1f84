//! `thinvm`: command-line entry point.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// thinvm: a small KVM virtual machine monitor whose qcow2 overlays shrink when the guest
/// wipes free space with zeros, trims or writes zeroes.
#[derive(Debug, Parser)]
#[command(name = "thinvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk image tools (qemu-img / qemu-io style).
    Image {
        #[command(subcommand)]
        cmd: image_cli::ImageCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Image { cmd } => image_cli::run(cmd),
    }
}
