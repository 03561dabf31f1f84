//! The demo inside the test rig: on hosts whose KVM cannot run Linux user space, the demo
//! runs itself again (`--inside`) where a Linux guest can run (`guest-images/rig`).

use std::path::Path;
use std::process::{ExitCode, Stdio};

use crate::args::DemoArgs;
use crate::error::{io, DemoError, Result};
use crate::interrupt::interrupted;

/// Runs `thinvm demo --inside` with the same options in the rig; returns its exit code.
pub fn run_in_rig(args: &DemoArgs, exe: &Path) -> Result<ExitCode> {
    eprintln!(
        "thinvm demo: this host's /dev/kvm cannot run Linux user space (software-nested or missing); running the demo inside the test rig (QEMU's TCG emulating AMD SVM, guest-images/rig)"
    );
    std::fs::create_dir_all(&args.out).map_err(io(format!("creating {}", args.out.display())))?;
    let out = std::fs::canonicalize(&args.out).map_err(io("output directory"))?;
    let script = format!(
        "exec {} demo --inside --fill-mib {} --compat {} --out {}{}",
        sh_quote(&exe.display().to_string()),
        args.fill_mib,
        sh_quote(&args.compat),
        sh_quote(&out.display().to_string()),
        if args.compare_qemu {
            " --compare-qemu"
        } else {
            ""
        }
    );
    let status = guest_rig::linux_capable_command(&script, 3600)
        .stdin(Stdio::null())
        .status()
        .map_err(io("starting the rig"))?;
    if interrupted() {
        return Err(DemoError::Interrupted);
    }
    let code = status.code().unwrap_or(1).clamp(0, 255);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

/// Quotes `s` as one word for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
