//! `thinvm run` without `--kernel`: the default guest (guest-images, built and cached on
//! first use as `thinvm demo` does): its PVH vmlinux, its initramfs, and its base image as the
//! root disk, which is shared and so only ever used under a throw-away overlay
//! (`--ephemeral`). Its init serves the test agent (`thinvm.workload=agent`).

use crate::config::RunOptions;
use crate::error::{Result, VmmError};

/// The default guest's kernel command line.
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off quiet thinvm.root=vda thinvm.workload=agent";

/// Fills in the default guest where `args` names no kernel.
pub fn fill_in(args: &mut RunOptions) -> Result<()> {
    if args.kernel.is_some() {
        return Ok(());
    }
    if args.disks.is_empty() && !args.ephemeral {
        return Err(VmmError::DefaultGuestNeedsOverlay);
    }
    let g = guest_rig::build_guest().map_err(VmmError::DefaultGuest)?;
    args.kernel = Some(g.vmlinux);
    if args.initrd.is_none() {
        args.initrd = Some(g.initrd);
    }
    if args.disks.is_empty() {
        args.disks
            .push(format!("path={},format=qcow2", g.base_qcow2.display()));
    }
    if args.cmdline.is_none() {
        args.cmdline = Some(CMDLINE.to_string());
    }
    Ok(())
}
