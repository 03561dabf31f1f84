//! qcow2 images, versions 2 (compat 0.10) and 3 (compat 1.1).
//!
//! Split by concern, much like QEMU's driver:
//! * [`image`]: the in-memory state of an open image ([`Qcow2Image`]), [`open`]: opening it,
//!   `disk_image`: the [`crate::DiskImage`] requests;
//! * [`header`]: the header, extensions and feature bits (`qcow2.c`'s header code);
//! * `entry`: L1/L2/refcount table entry encoding;
//! * [`cluster`]: guest-to-host mapping through L1/L2 tables (`qcow2-cluster.c`);
//!   `planner`: reads and writes (with copy-on-write) planned as data operations;
//! * [`refcount`], [`refblock`]: refcounts of every width, refcount table growth
//!   (`qcow2-refcount.c`); `alloc`, [`free_map`]: the cluster allocator and its index of
//!   used and free host clusters; `pending`, `free`: deferred, crash-safe frees;
//! * `io`: the ordered writes and syncs every update passes through;
//!   `table_read`: metadata reads;
//! * `relocate`: moving clusters down and truncating the file's tail (online and offline);
//!   [`compact`]: offline reclamation;
//! * `zeroing`: write-zeroes, discard and detected zeroes; `zero_clusters`: v2's shared
//!   all-zero clusters;
//! * [`cache`]: bounded L2 / refcount-block caches (`qcow2-cache.c`);
//! * [`check`]: consistency check, leak repair and refcount rebuild;
//! * [`create`](mod@create): image creation; [`compressed`]: compressed clusters;
//! * [`snapshot`]: the internal snapshot table, read and validated at open.

pub(crate) mod alloc;
pub mod cache;
pub mod check;
pub mod cluster;
pub mod compact;
pub mod compressed;
pub mod create;
pub(crate) mod disk_image;
pub(crate) mod entry;
pub(crate) mod free;
pub mod free_map;
pub mod header;
pub mod image;
pub(crate) mod io;
pub mod open;
pub(crate) mod pending;
mod planner;
pub mod refblock;
pub mod refcount;
pub(crate) mod relocate;
pub mod snapshot;
pub(crate) mod table_read;
pub(crate) mod zero_clusters;
pub(crate) mod zeroing;

pub use crate::chain::MAX_CHAIN_DEPTH;
pub use create::{create, CreateOptions, Qcow2Version};
pub use header::MAGIC;
pub(crate) use image::OpenFlags;
pub use image::Qcow2Image;
pub use open::resolve_backing_path;
pub use pending::FreeReason;
