//! thinvm's VMM as a library: build a VM from a [`config::VmConfig`] (or from a snapshot,
//! [`restore`]), run it to its [`lifecycle::ExitReason`], tear it down ([`runner`]). The
//! `thinvm` binary (`main.rs`) owns the command line and the process's exit code.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod api;
mod arch;
pub mod config;
pub mod ctl;
pub mod default_guest;
mod disks;
pub mod error;
mod event_loop;
mod exec;
pub mod host;
pub mod lifecycle;
pub mod restore;
pub mod runner;
mod seccomp;
mod snapshot;
mod sync;
mod terminal;
pub mod testvm_config;
mod vm_control;
mod vsock;
mod vstate;
