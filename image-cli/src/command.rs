//! The `thinvm image` subcommands and their options, as clap parses them.

use std::path::PathBuf;

use crate::args::{AioArg, CacheArg, DetectZeroesArg, FormatArg, OutputFormat, RepairArg};
use crate::bench;

/// The `thinvm image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Create a disk image (like `qemu-img create`).
    Create {
        /// Image format.
        #[arg(short = 'f', value_enum, default_value = "qcow2")]
        format: FormatArg,
        /// Backing file (the new image is an overlay on it).
        #[arg(short = 'b', value_name = "BACKING")]
        backing: Option<String>,
        /// Backing file format (probed when omitted; the probed format is recorded, so a
        /// probed qcow2 image that names another file is refused).
        #[arg(short = 'F', value_enum, value_name = "FMT")]
        backing_format: Option<FormatArg>,
        /// Options: cluster_size=N,compat=0.10|1.1,refcount_bits=N
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Suppress the "Formatting ..." line.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image file to create.
        file: PathBuf,
        /// Virtual size (K/M/G/T suffixes); defaults to the backing file's size.
        size: Option<String>,
    },
    /// Show information about an image (like `qemu-img info`).
    Info {
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Also show every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        /// Open even while another process writes the image (no lock conflicts; what is
        /// read may be inconsistent), like qemu-img's -U.
        #[arg(short = 'U', long)]
        force_share: bool,
        file: PathBuf,
    },
    /// Check an image's metadata for leaks and corruptions (like `qemu-img check`).
    ///
    /// Exit codes: 0 clean, 1 could not check, 2 corruptions, 3 leaks only.
    Check {
        /// Repair leaks, or everything that can be repaired.
        #[arg(short = 'r', value_enum)]
        repair: Option<RepairArg>,
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        #[arg(short = 'q')]
        quiet: bool,
        /// Check even while another process writes the image (not with -r), like
        /// qemu-img's -U.
        #[arg(short = 'U', long, conflicts_with = "repair")]
        force_share: bool,
        file: PathBuf,
    },
    /// Show how guest ranges map to the image chain (like `qemu-img map`).
    Map {
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Map even while another process writes the image, like qemu-img's -U.
        #[arg(short = 'U', long)]
        force_share: bool,
        file: PathBuf,
    },
    /// Run qemu-io style commands on an image: `write [-P PAT] [-z [-u]] OFF LEN`,
    /// `read [-P PAT] OFF LEN`, `discard OFF LEN`, `flush`.
    Io {
        /// Zero detection on writes (QEMU's meanings; default off, like qemu-io).
        #[arg(long, value_enum, default_value = "off")]
        detect_zeroes: DetectZeroesArg,
        /// Open read-only.
        #[arg(short = 'r', long = "read-only")]
        read_only: bool,
        /// With -r: open even while another process writes the image, like qemu-io's -U.
        #[arg(short = 'U', long, requires = "read_only")]
        force_share: bool,
        /// Image format. When omitted it is probed, and a writable open of a probed image is
        /// refused if it is a qcow2 image that names a backing file, and refuses writes that
        /// would make a probed raw image look like qcow2.
        #[arg(short = 'f', value_enum)]
        format: Option<FormatArg>,
        /// Cache mode: `none` bypasses the host page cache (O_DIRECT).
        #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
        cache: CacheArg,
        /// I/O engine (default: io_uring where the kernel allows it, else threads).
        #[arg(short = 'i', long = "aio", value_enum)]
        aio: Option<AioArg>,
        /// A command; repeat for several (run in order).
        #[arg(short = 'c', long = "cmd", value_name = "CMD", required = true)]
        commands: Vec<String>,
        file: PathBuf,
    },
    /// Measure image I/O speed (options and output like `qemu-img bench`).
    Bench(bench::BenchArgs),
    /// Reclaim space offline: zero clusters are released, tail clusters moved down, and the
    /// file truncated.
    Compact {
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Image format (qcow2). When omitted it is probed, and an image that names a backing
        /// file is refused (give -f qcow2 if you trust it).
        #[arg(short = 'f', value_enum)]
        format: Option<FormatArg>,
        file: PathBuf,
    },
}
