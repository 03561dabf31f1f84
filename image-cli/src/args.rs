//! The value types of the image tool's options (`--output`, `-f`, `-r`, `--detect-zeroes`,
//! `-t`, `-i`) and how each maps onto the block crate's own types. Shared by the
//! subcommands; depends on nothing else of the crate.

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
