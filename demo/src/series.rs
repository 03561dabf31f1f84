//! One VMM's run of the demo: a fresh overlay on the guest's base image, then every step,
//! with a progress line per step and the result table at the end.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use units::human_size;

use crate::args::DemoArgs;
use crate::error::{DemoError, Result};
use crate::interrupt::interrupted;
use crate::overlay::{check_status, usage};
use crate::sample::{ms_since, push_sample, Sample};
use crate::step::run_step;
use crate::table::{print_table, Row};
use crate::vmm::Vmm;

/// One VMM's run of the demo steps.
pub struct RunResult {
    pub rows: Vec<Row>,
    pub samples: Vec<Sample>,
    /// When each step ended (ms since the run started).
    pub step_ends_ms: Vec<u64>,
    pub overlay: PathBuf,
}

/// Runs every step under one VMM on its own fresh overlay.
pub fn run_series(
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
        if interrupted() {
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
        let wall_ms = ms_since(&t0);
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let (alloc, app) = usage(&overlay);
        step_ends_ms.push(ms_since(&start));
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

/// A spinner with `msg` on a terminal; otherwise `msg` printed once as a plain line.
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
