//! How to open an image ([`OpenOptions`]): access, format, probing rules, direct I/O and
//! lock sharing.

use crate::format::ImageFormat;
use crate::probe::ProbePolicy;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open the file read-only.
    pub read_only: bool,
    /// The expected format; `None` probes the file's first bytes.
    pub format: Option<ImageFormat>,
    /// What the image may do if its format is probed (and which backing files of unrecorded
    /// format may be followed): see [`crate::probe`].
    pub probe: ProbePolicy,
    /// Bypass the host page cache (`O_DIRECT`, QEMU's `cache=none`), for the image and its
    /// backing chain.
    pub direct: bool,
    /// QEMU's `force-share` (`-U`): lock the chain without refusing other users, for reading
    /// an image another process may be writing. Only with `read_only` ([`crate::lock`]).
    pub force_share: bool,
}
