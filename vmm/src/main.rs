//! `thinvm`: the command line (run, restore, ctl, image, demo) over the `vmm` library; the
//! one place that turns how a VM ended into the process's exit code.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::{ctl, default_guest, error, lifecycle, restore, runner};

mod cli;

/// thinvm: a small KVM virtual machine monitor whose qcow2 overlays shrink when the guest
/// wipes free space with zeros, trims or writes zeroes.
#[derive(Debug, Parser)]
#[command(name = "thinvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest (Linux bzImage or ELF vmlinux) on KVM.
    ///
    /// Exit codes: 0 guest powered off or reset itself, 1 thinvm error, 2 guest crashed
    /// (triple fault), 3 KVM could not run the guest (emulation failure), 128+N stopped by
    /// signal N (130 also for Ctrl-A x), (v << 1) | 1 the guest wrote v to the debug-exit
    /// port.
    Run(cli::RunArgs),
    /// Boot the default Linux guest on a fresh overlay, fill / delete / zero-wipe / trim, and
    /// show the overlay shrinking (table + chart). Builds the guest on first use.
    Demo(demo::DemoArgs),
    /// Start a clone of a snapshot (`thinvm ctl PATH snapshot DIR`): memory mapped
    /// copy-on-write from the snapshot, each disk on a fresh overlay over its frozen layer.
    /// Exit codes as `run`.
    Restore(cli::RestoreArgs),
    /// Control a running VM through its --api-socket: pause, resume, status, snapshot DIR.
    Ctl(cli::CtlArgs),
    /// Disk image tools (qemu-img / qemu-io style).
    Image {
        #[command(subcommand)]
        cmd: image_cli::ImageCommand,
    },
}

/// Why `--log-level` could not set up logging.
#[derive(Debug, thiserror::Error)]
enum LogLevelError {
    /// Not one of the level names.
    #[error("--log-level {0}: expected error, warn, info, debug, trace or off")]
    Unknown(String),
}

fn init_logging(level: &str) -> Result<(), LogLevelError> {
    use tracing_subscriber::filter::LevelFilter;
    let level = match level {
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        "off" => LevelFilter::OFF,
        other => return Err(LogLevelError::Unknown(other.to_string())),
    };
    // A log line that cannot be written (stderr on a full file system, a closed pipe) is
    // lost, not reported with eprintln!, which would panic the thread that logged.
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .log_internal_errors(false)
        .init();
    Ok(())
}

/// The process exit code for how the VM ended (`--exec`: the command's status, or one of
/// its own codes).
fn finish(result: error::Result<lifecycle::ExitReason>, exec_mode: bool) -> ExitCode {
    match result {
        Ok(reason) => {
            // (Not eprintln!: it panics when stderr cannot be written, e.g. a full disk.)
            let _ = writeln!(std::io::stderr(), "thinvm: {}", reason.describe());
            if exec_mode {
                let code = reason.exec_exit_code();
                if code == lifecycle::EXEC_VM_ENDED {
                    let _ = writeln!(
                        std::io::stderr(),
                        "thinvm: the VM ended before the command's status came back (exit {code})"
                    );
                }
                return ExitCode::from(code);
            }
            ExitCode::from(reason.exit_code())
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "thinvm: {e}");
            ExitCode::from(if exec_mode {
                lifecycle::EXEC_VM_ENDED
            } else {
                1
            })
        }
    }
}

fn run(args: cli::RunArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        eprintln!("thinvm: {e}");
        return ExitCode::from(1);
    }
    let mut opts = args.options();
    if let Err(e) = default_guest::fill_in(&mut opts) {
        eprintln!("thinvm: {e}");
        return ExitCode::from(1);
    }
    lifecycle::timing_mark("default-guest");
    let exec_mode = opts.testvm.exec.is_some();
    let cfg = match opts.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("thinvm: {e}");
            return ExitCode::from(1);
        }
    };
    lifecycle::timing_mark("validated");
    finish(runner::run(cfg), exec_mode)
}

fn restore(args: cli::RestoreArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        eprintln!("thinvm: {e}");
        return ExitCode::from(1);
    }
    let opts = args.options();
    let exec_mode = opts.testvm.exec.is_some();
    match restore::restore(&opts) {
        // A snapshot refused, bad options: nothing ran.
        Err(e) if e.is_refusal() => {
            eprintln!("thinvm: {e}");
            ExitCode::from(1)
        }
        other => finish(other, exec_mode),
    }
}

/// `thinvm ctl`: prints the VM's answer; exit 0 when it succeeded, 1 otherwise.
fn control(args: cli::CtlArgs) -> ExitCode {
    match ctl::request(&args.socket, &args.cmd.request()) {
        Ok(v) => {
            println!("{v}");
            if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
                ExitCode::SUCCESS
            } else {
                if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                    eprintln!("thinvm ctl: {e}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("thinvm ctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    lifecycle::PROCESS_START.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Image { cmd } => {
            // Like other command-line tools, `thinvm image ... | head` ends quietly when the
            // reader goes away (Rust ignores SIGPIPE, and print! then panics on EPIPE). Only
            // for the image tool: a VM must not die with its console's reader.
            // SAFETY: setting a signal's disposition to the default action is always sound;
            // no handler is installed.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            image_cli::run(cmd)
        }
        Command::Demo(args) => demo::run(args),
        Command::Restore(args) => restore(args),
        Command::Ctl(args) => control(args),
    }
}
