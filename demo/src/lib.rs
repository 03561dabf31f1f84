//! `thinvm demo`: the whole promise in one command. A fresh qcow2 overlay on the default
//! guest's base image; the guest (Linux, ext4 root on the overlay) fills a file with data,
//! deletes it, wipes its free space with zeros, then trims — one boot per step. After each
//! step: the overlay's allocated and apparent size, the step's time and `thinvm image check`
//! status, printed as a table and drawn as a chart (SVG) saved next to the overlay.
//!
//! On hosts whose KVM cannot run Linux user space (software-nested KVM), the demo says so and
//! runs itself inside the test rig (`guest-images/rig`).
//!
//! This file only decides where the demo runs (`here.rs`, or `rig.rs` inside the rig);
//! the steps, their measurements and the outputs live in their own files.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod args;
mod chart;
mod error;
mod here;
mod interrupt;
mod overlay;
mod rig;
mod sample;
mod series;
mod step;
mod table;
mod vmm;

use std::process::ExitCode;

use crate::error::{io, Result};
use crate::interrupt::{catch_sigint, interrupted};

pub use args::DemoArgs;
pub use error::DemoError;
pub use sample::Sample;
pub use table::Row;

/// Runs the demo; returns the process exit code.
pub fn run(args: DemoArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(code) => code,
        Err(DemoError::Interrupted) => {
            eprintln!("thinvm demo: stopped (Ctrl-C); nothing left behind");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("thinvm demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &DemoArgs) -> Result<ExitCode> {
    catch_sigint();
    let exe = std::env::current_exe().map_err(io("locating the thinvm binary"))?;
    eprintln!(
        "thinvm demo: building the default guest (first run: about 3 minutes; cached afterwards)"
    );
    let guest = guest_rig::build_guest()?;
    if interrupted() {
        return Err(DemoError::Interrupted);
    }
    if !args.inside && (guest_rig::host_is_software_nested() || !guest_rig::host_has_kvm()) {
        return rig::run_in_rig(args, &exe);
    }
    here::run_here(args, &exe, &guest)
}
