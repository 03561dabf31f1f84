//! Format probing, and what an image whose format was probed may do.
//!
//! A raw disk's first bytes belong to its guest. If a probed image could name other files, a
//! guest could write a qcow2 header naming any host file as its backing file into sector 0
//! of its raw disk and read that file on the next boot (QEMU's CVE-2008-2004). The rules,
//! all decided here:
//! * **A probed image names no other file unless told.** When no format was given and the
//!   probe finds a qcow2 image with a backing file, the open is refused for a guest's disk
//!   (read-only or not, including the base of `--ephemeral`) and for every writable open; the
//!   message says to give the format (`format=qcow2` on `--disk`, `-f qcow2` / `-F qcow2` in
//!   `thinvm image`). External data files are refused for every qcow2 image anyway.
//! * **Backing files whose format the overlay does not record** are probed, as QEMU does; a
//!   probed backing qcow2 that names yet another file is the same attack one level down and
//!   is refused under the same conditions, with the command that records the format
//!   (`qemu-img rebase -u -F qcow2`). A recorded format is trusted, at any depth.
//! * **A writable image probed as raw stays raw**: writes that would make its first bytes
//!   probe as another format fail (QEMU's raw driver does the same); zeros are always fine.
//!   `format=raw` lifts the restriction.
//! * Read-only opens by the host tools (`thinvm image info|map|check|io -r|bench`) follow the
//!   names probed images hold, as qemu-img does ([`ProbePolicy::HostTool`]).
//! * Recording a probed format (`thinvm image create -b` without `-F`, the `--ephemeral`
//!   overlay) turns a guess into something trusted later, so it follows the guest's rules.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::host_file::HostFile;

/// Bytes at the start of an image that the probe looks at (QEMU's probe buffer size).
pub const PROBE_BYTES: usize = 512;

/// What an image opened without a format (probed) may do: see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbePolicy {
    /// For a guest's disks (`thinvm run`), and the default: a probed image may not name
    /// another file, read-only or not, nor may a backing file whose format its overlay does
    /// not record.
    #[default]
    Guest,
    /// For host tools (`thinvm image`): read-only opens follow the names probed images hold,
    /// as qemu-img does; writable opens are as strict as [`ProbePolicy::Guest`] (a writable
    /// open can copy a named file's bytes into the image).
    HostTool,
}

impl ProbePolicy {
    /// Whether an open with this policy may follow the names that probed images hold.
    pub fn follows_probed_names(self, read_only: bool) -> bool {
        self == ProbePolicy::HostTool && read_only
    }
}

/// The format that an image starting with `head` (its first up to [`PROBE_BYTES`] bytes,
/// fewer only when the image is shorter) probes as.
pub fn format_of_head(head: &[u8]) -> ImageFormat {
    if head.starts_with(&crate::qcow2::MAGIC) {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    }
}

/// Signatures that QEMU's probes recognise at the start of an image (qcow/qcow2, QED, VMDK
/// sparse, hosted sparse and descriptor files, VPC, VHDX, LUKS, Parallels, Bochs, cloop), and
/// VDI's magic at offset 0x40. thinvm opens only qcow2 and raw, but the same file may later be
/// handed to qemu-img or QEMU without a format, and several of these formats can name other
/// host files (VMDK extents, QED backing files).
const FOREIGN_SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
];

/// The image format (thinvm's or one QEMU probes) that an image starting with `head` would
/// be taken for, if any: what a probed-raw image must never be written into.
pub fn foreign_format_of_head(head: &[u8]) -> Option<&'static str> {
    FOREIGN_SIGNATURES.iter().find_map(|&(at, sig, name)| {
        head.get(at..)
            .is_some_and(|h| h.starts_with(sig))
            .then_some(name)
    })
}

/// Probes the format of an open image file from its first bytes.
pub(crate) fn probe_file(file: &HostFile, path: &Path) -> Result<ImageFormat> {
    let mut head = [0u8; PROBE_BYTES];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        }
    }
    Ok(format_of_head(&head[..got]))
}

/// Probes the format of an image file: qcow2 by its magic, raw otherwise. (Only the
/// format: whether the image may then be opened is [`crate::open::open`]'s business.)
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    let file = HostFile::open(path, true, false).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    probe_file(&file, path)
}

/// How an image came to be probed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Probed<'a> {
    /// An image opened without a format.
    Image,
    /// The backing file `name` of `overlay`, which does not record its format.
    BackingOf { overlay: &'a Path, name: &'a str },
}

/// The error for a probed qcow2 image at `path` that names the backing file `named`, when the
/// policy does not allow it.
pub(crate) fn names_a_file(path: &Path, named: &str, how: Probed) -> Error {
    match how {
        Probed::Image => Error::Probe(format!(
            "no format was given for {}, and probing found a qcow2 image that names another file (backing file '{named}'); a probed image may not name other files (a guest that wrote it as a raw disk could point it at any host file). If it is a qcow2 image you trust, give its format: format=qcow2 on --disk, -f qcow2 in thinvm image",
            path.display()
        )),
        Probed::BackingOf { overlay, name } => Error::Probe(format!(
            "{}: backing file of {} whose format the overlay does not record; probing found a qcow2 image that names another file (backing file '{named}'), which a probed image may not do. If it really is a qcow2 image, record its format in the overlay: qemu-img rebase -u -b '{name}' -F qcow2 '{}'",
            path.display(),
            overlay.display(),
            overlay.display()
        )),
    }
}
