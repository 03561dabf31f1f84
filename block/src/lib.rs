//! thinvm's disk image crate.
//!
//! One trait, [`DiskImage`], is what the device layer (virtio-blk) and the `thinvm image` tool
//! use. Implementations: [`raw::RawImage`] and [`qcow2::Qcow2Image`]. [`open`] probes the
//! format (under the rules of [`probe`]) and opens either.
//!
//! A read or write becomes a [`Plan`] (the image's metadata decisions as data: data
//! operations in stages, then metadata actions); plans run on the calling thread (the
//! synchronous methods, e.g. [`DiskImage::write_at`]) or many at once through a
//! [`pipeline::Pipeline`] on an [`engine`] (io_uring, I/O threads, synchronous). Request
//! buffers are [`IoBuf`]s, never Rust slices over memory others may change.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod cast;
pub mod chain;
mod create;
pub mod disk;
pub mod engine;
pub mod error;
pub mod format;
pub mod host_file;
pub mod inspect;
pub mod iobuf;
pub mod lock;
mod open;
pub mod options;
mod parallel;
pub mod pipeline;
pub mod plan;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod status;
pub mod zero;

pub use create::create;
pub use disk::DiskImage;
pub use error::{Error, Result};
pub use format::ImageFormat;
pub use iobuf::IoBuf;
pub use open::open;
pub use options::OpenOptions;
pub use parallel::{start_pool, ThreadStart, ThreadStartError, MAX_THREADS as MAX_IO_THREADS};
pub use plan::Plan;
pub use probe::{probe_format, ProbePolicy};
pub use status::{HostUsage, MapExtent, ReclaimStats};
pub use zero::DetectZeroes;
