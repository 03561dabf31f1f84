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

mod bench;
mod check;
mod compact;
mod create;
pub mod error;
mod info;
mod io;
mod map;

use std::path::PathBuf;
use std::process::ExitCode;

pub use error::{CliError, Result};

/// `--output` formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// `-f` / `-F` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Qcow2,
    Raw,
}

impl From<FormatArg> for block::ImageFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qcow2 => block::ImageFormat::Qcow2,
            FormatArg::Raw => block::ImageFormat::Raw,
        }
    }
}

/// `check -r` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    Leaks,
    All,
}

/// `--detect-zeroes` modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectZeroesArg {
    #[default]
    Off,
    On,
    Unmap,
}

impl From<DetectZeroesArg> for block::DetectZeroes {
    fn from(d: DetectZeroesArg) -> Self {
        match d {
            DetectZeroesArg::Off => block::DetectZeroes::Off,
            DetectZeroesArg::On => block::DetectZeroes::On,
            DetectZeroesArg::Unmap => block::DetectZeroes::Unmap,
        }
    }
}

/// `-t` cache modes (qemu-img's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheArg {
    /// Bypass the host page cache (O_DIRECT), like QEMU's cache=none.
    None,
    /// Through the host page cache.
    #[default]
    Writeback,
}

/// The I/O engine (`-i`, like qemu-img's and qemu-io's `-i`/`--aio`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AioArg {
    /// io_uring: many requests in flight on one ring.
    #[value(name = "io_uring")]
    IoUring,
    /// A pool of I/O threads.
    Threads,
    /// Each request on the calling thread.
    Sync,
}

impl From<AioArg> for block::engine::Aio {
    fn from(a: AioArg) -> Self {
        match a {
            AioArg::IoUring => block::engine::Aio::IoUring,
            AioArg::Threads => block::engine::Aio::Threads,
            AioArg::Sync => block::engine::Aio::Sync,
        }
    }
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
            crate::ImageAccess {
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
