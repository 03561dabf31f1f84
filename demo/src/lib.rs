//! `thinvm demo`: the whole promise in one command. A fresh qcow2 overlay on the default
//! guest's base image; the guest (Linux, ext4 root on the overlay) fills a file with data,
//! deletes it, wipes its free space with zeros, then trims — one boot per step. After each
//! step: the overlay's allocated and apparent size, the step's time and `thinvm image check`
//! status, printed as a table and drawn as a chart (SVG) saved next to the overlay.
//!
//! On hosts whose KVM cannot run Linux user space (software-nested KVM), the demo says so and
//! runs itself inside the test rig (`guest-images/rig`).

mod chart;
mod vmm;

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use units::human_size;

use vmm::Vmm;

/// `thinvm demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// MiB of random data the guest writes (then deletes).
    #[arg(long, default_value_t = 128)]
    pub fill_mib: u64,
    /// Where the final overlay, the chart and the results go.
    #[arg(long, default_value = "thinvm-demo")]
    pub out: PathBuf,
    /// Overlay format version: 1.1 (qcow2 v3) or 0.10 (v2, where QEMU cannot reclaim).
    #[arg(long, default_value = "1.1")]
    pub compat: String,
    /// Also run the same steps under QEMU microvm (qemu-system-x86_64 with
    /// detect-zeroes=unmap,discard=unmap) on its own fresh overlay; both in one chart.
    #[arg(long)]
    pub compare_qemu: bool,
    /// Run here even on a software-nested host (used when the demo re-runs itself in the
    /// rig).
    #[arg(long, hide = true)]
    pub inside: bool,
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Guest(#[from] guest_rig::RigError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Step(String),
    #[error("{0}")]
    Image(#[from] block::Error),
    #[error("stopped (Ctrl-C)")]
    Interrupted,
}

type Result<T> = std::result::Result<T, DemoError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// One row of the result table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub step: String,
    pub what: String,
    /// Time the step took inside the guest (ms), if it ran in the guest.
    pub guest_ms: Option<u64>,
    /// Wall time of the whole boot-run-shutdown cycle (ms).
    pub wall_ms: u64,
    pub allocated: u64,
    pub apparent: u64,
    pub check: String,
}

/// A size sample for the chart.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub allocated: u64,
    pub apparent: u64,
}

fn usage(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| (m.blocks() * 512, m.size()))
        .unwrap_or((0, 0))
}

fn check_status(p: &Path) -> String {
    match block::inspect::check(p, None) {
        Ok(r) if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 => "clean".into(),
        Ok(r) if r.corruptions > 0 => format!("{} corruptions", r.corruptions),
        Ok(r) => format!("{} leaked clusters", r.leaks),
        Err(e) => format!("cannot check: {e}"),
    }
}

/// The guest steps of the demo: (workload, label).
fn steps(fill: u64) -> Vec<(String, String)> {
    vec![
        (format!("fill:{fill}"), format!("write {fill} MiB of data")),
        ("rm".into(), "delete the file".into()),
        ("zero-wipe".into(), "wipe free space with zeros".into()),
        ("fstrim".into(), "fstrim".into()),
    ]
}

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
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint);
    let exe = std::env::current_exe().map_err(io("locating the thinvm binary"))?;
    eprintln!(
        "thinvm demo: building the default guest (first run: about 3 minutes; cached afterwards)"
    );
    let guest = guest_rig::build_guest()?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(DemoError::Interrupted);
    }
    if !args.inside && (guest_rig::host_is_software_nested() || !guest_rig::host_has_kvm()) {
        eprintln!(
            "thinvm demo: this host's /dev/kvm cannot run Linux user space (software-nested or missing); running the demo inside the test rig (QEMU's TCG emulating AMD SVM, guest-images/rig)"
        );
        std::fs::create_dir_all(&args.out)
            .map_err(io(format!("creating {}", args.out.display())))?;
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
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        return Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(0, 255) as u8
        ));
    }
    run_here(args, &exe, &guest)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Removes the work directory on every exit path.
struct WorkDir(PathBuf);
impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One VMM's run of the demo steps.
struct RunResult {
    rows: Vec<Row>,
    samples: Vec<Sample>,
    /// When each step ended (ms since the run started).
    step_ends_ms: Vec<u64>,
    overlay: PathBuf,
}

fn run_here(args: &DemoArgs, exe: &Path, guest: &guest_rig::Guest) -> Result<ExitCode> {
    let work =
        WorkDir(guest_rig::scratch_dir().join(format!("thinvm-demo-{}", std::process::id())));
    std::fs::create_dir_all(&work.0).map_err(io("creating the work directory"))?;
    let mut vmms = vec![Vmm::Thinvm(exe)];
    if args.compare_qemu {
        vmm::require_qemu()?;
        vmms.push(Vmm::Qemu);
    }
    let all = steps(args.fill_mib);
    let mut runs = Vec::new();
    for vmm in &vmms {
        runs.push(run_series(args, vmm, guest, &work.0, &all)?);
    }
    // Results next to the overlays.
    std::fs::create_dir_all(&args.out).map_err(io(format!("creating {}", args.out.display())))?;
    let chart_path = args.out.join("overlay-size.svg");
    let mut saved = Vec::new();
    for (vmm, run) in vmms.iter().zip(&runs) {
        let dest = args.out.join(match vmm {
            Vmm::Thinvm(_) => "overlay.qcow2",
            Vmm::Qemu => "overlay-qemu.qcow2",
        });
        copy_sparse(&run.overlay, &dest)?;
        saved.push(dest.display().to_string());
    }
    let series: Vec<chart::Series> = vmms
        .iter()
        .zip(&runs)
        .map(|(vmm, run)| chart::Series {
            name: vmm.name(),
            samples: &run.samples,
            step_ends_ms: &run.step_ends_ms,
        })
        .collect();
    let labels: Vec<String> = all.iter().map(|(_, label)| label.clone()).collect();
    chart::draw(&chart_path, &series, &labels).map_err(DemoError::Step)?;
    let json = match (runs.first(), runs.get(1)) {
        (Some(t), Some(q)) => serde_json::json!({
            "rows": t.rows, "samples": t.samples,
            "qemu": { "rows": q.rows, "samples": q.samples },
        }),
        (Some(t), None) => serde_json::json!({ "rows": t.rows, "samples": t.samples }),
        _ => serde_json::json!({}),
    };
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )
    .map_err(io("writing results.json"))?;
    println!(
        "\nSaved: {} (the overlay{}), {} (chart of the size over time), {}",
        saved.join(", "),
        if saved.len() > 1 { "s" } else { "" },
        chart_path.display(),
        args.out.join("results.json").display()
    );
    for (vmm, run) in vmms.iter().zip(&runs) {
        let last = run
            .rows
            .last()
            .map(|r| (r.allocated, r.apparent))
            .unwrap_or((0, 0));
        let peak = run.rows.iter().map(|r| r.allocated).max().unwrap_or(0);
        println!(
            "{}: the overlay peaked at {} allocated and ended at {} allocated / {} apparent.",
            vmm.name(),
            human_size(peak),
            human_size(last.0),
            human_size(last.1)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every step under one VMM on its own fresh overlay.
fn run_series(
    args: &DemoArgs,
    vmm: &Vmm,
    guest: &guest_rig::Guest,
    work: &Path,
    all: &[(String, String)],
) -> Result<RunResult> {
    let overlay = work.join(format!("overlay-{}.qcow2", vmm.name()));
    let version = block::qcow2::Qcow2Version::from_compat(&args.compat)?;
    block::qcow2::create(
        &overlay,
        &block::qcow2::CreateOptions {
            backing_file: Some(guest.base_qcow2.display().to_string()),
            backing_format: Some(block::ImageFormat::Qcow2),
            version,
            ..Default::default()
        },
    )?;
    println!(
        "thinvm demo: {}: fresh qcow2 overlay (compat {}) on the guest's base image; the guest boots once per step",
        vmm.name(),
        args.compat
    );
    let start = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let mut step_ends_ms = Vec::new();
    let (a0, p0) = usage(&overlay);
    let mut rows = vec![Row {
        step: "create".into(),
        what: "fresh overlay".into(),
        guest_ms: None,
        wall_ms: 0,
        allocated: a0,
        apparent: p0,
        check: check_status(&overlay),
    }];
    push_sample(&samples, &start, &overlay);
    // Inside the rig the console is a serial line: plain lines, no spinner.
    let tty = std::io::stderr().is_terminal() && std::env::var_os("THINVM_IN_RIG").is_none();
    for (i, (workload, label)) in all.iter().enumerate() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        let bar = progress(
            tty,
            &format!("{}: step {}/{}: {label}", vmm.name(), i + 1, all.len()),
        );
        let t0 = Instant::now();
        let guest_ms = run_step(
            vmm,
            guest,
            &overlay,
            workload,
            &samples,
            &start,
            bar.as_ref(),
        )?;
        let wall_ms = t0.elapsed().as_millis() as u64;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let (alloc, app) = usage(&overlay);
        step_ends_ms.push(start.elapsed().as_millis() as u64);
        let check = check_status(&overlay);
        println!(
            "  {}: step {}/{}: {label}: {:.1}s; overlay allocated {}, apparent {}; check: {check}",
            vmm.name(),
            i + 1,
            all.len(),
            wall_ms as f64 / 1000.0,
            human_size(alloc),
            human_size(app)
        );
        rows.push(Row {
            step: workload.split(':').next().unwrap_or(workload).to_string(),
            what: label.clone(),
            guest_ms,
            wall_ms,
            allocated: alloc,
            apparent: app,
            check,
        });
        push_sample(&samples, &start, &overlay);
    }
    println!("\n{}:", vmm.name());
    print_table(&rows);
    let samples = match samples.lock() {
        Ok(s) => s.clone(),
        Err(p) => p.into_inner().clone(),
    };
    Ok(RunResult {
        rows,
        samples,
        step_ends_ms,
        overlay,
    })
}

fn progress(tty: bool, msg: &str) -> Option<indicatif::ProgressBar> {
    if !tty {
        println!("  {msg} ...");
        return None;
    }
    let b = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        b.set_style(style);
    }
    b.set_message(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(120));
    Some(b)
}

fn push_sample(samples: &Arc<Mutex<Vec<Sample>>>, start: &Instant, overlay: &Path) {
    let (a, p) = usage(overlay);
    let s = Sample {
        t_ms: start.elapsed().as_millis() as u64,
        allocated: a,
        apparent: p,
    };
    match samples.lock() {
        Ok(mut v) => v.push(s),
        Err(p) => p.into_inner().push(s),
    }
}

/// Boots the guest for one workload step; returns the step's guest-side time.
fn run_step(
    vmm: &Vmm,
    guest: &guest_rig::Guest,
    overlay: &Path,
    workload: &str,
    samples: &Arc<Mutex<Vec<Sample>>>,
    start: &Instant,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Option<u64>> {
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 pci=off quiet thinvm.root=vda thinvm.workload={workload}"
    );
    let mut child = vmm
        .command(guest, overlay, &cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {}", vmm.name())))?;
    // Sample the overlay's size while the guest works.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, samples, overlay, start) =
            (done.clone(), samples.clone(), overlay.to_path_buf(), *start);
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                push_sample(&samples, &start, &overlay);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut guest_ms = None;
    let mut errors = Vec::new();
    let mut done_seen = false;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if INTERRUPTED.load(Ordering::SeqCst) {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            }
            if let Some(rest) = line.trim_end().strip_prefix("THINVM-RESULT ") {
                guest_ms = rest
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok());
                if let Some(b) = bar {
                    b.set_message(format!("{} (done in the guest)", b.message()));
                }
            } else if line.starts_with("THINVM-ERROR") {
                errors.push(line.trim_end().to_string());
            } else if line.trim_end() == "THINVM-DONE" {
                done_seen = true;
                if vmm.stop_after_done() {
                    // QEMU microvm does not end when its guest resets (inside the rig):
                    // stop it once the guest is done (it flushes its images on SIGTERM).
                    // SAFETY: signalling our own child process.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(io(format!("waiting for {}", vmm.name())))?;
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(DemoError::Interrupted);
    }
    let ended_well = if vmm.stop_after_done() {
        done_seen
    } else {
        status.success()
    };
    if !ended_well || !errors.is_empty() {
        return Err(DemoError::Step(format!(
            "step {workload} failed ({status}): {}\n{}",
            errors.join("; "),
            stderr.trim()
        )));
    }
    Ok(guest_ms)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| {:<9} | {:<28} | {:>9} | {:>9} | {:>11} | {:>11} | {:<14} |",
        "step", "what", "guest", "boot+step", "allocated", "apparent", "image check"
    );
    println!(
        "|{}|",
        [
            "-----------",
            "------------------------------",
            "----------:",
            "----------:",
            "------------:",
            "------------:",
            "----------------"
        ]
        .join("|")
    );
    for r in rows {
        println!(
            "| {:<9} | {:<28} | {:>9} | {:>9} | {:>11} | {:>11} | {:<14} |",
            r.step,
            r.what,
            r.guest_ms
                .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                .unwrap_or_default(),
            if r.wall_ms > 0 {
                format!("{:.1}s", r.wall_ms as f64 / 1000.0)
            } else {
                String::new()
            },
            human_size(r.allocated),
            human_size(r.apparent),
            r.check
        );
    }
}

/// Copies a file keeping holes (the overlay is sparse after reclamation).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(io("copying the overlay"))?;
    if !status.success() {
        return Err(DemoError::Step(format!(
            "cp {} {} failed",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}
