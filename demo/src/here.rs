//! The demo on this host: each VMM's series in a work directory, then the overlays, the
//! chart and results.json saved to `--out`, and a summary.

use std::path::Path;
use std::process::ExitCode;

use units::human_size;

use crate::args::DemoArgs;
use crate::chart;
use crate::error::{io, Result};
use crate::overlay::copy_sparse;
use crate::series::run_series;
use crate::step::steps;
use crate::vmm::{self, Vmm};

/// Runs the demo here; `exe` is this thinvm binary.
pub fn run_here(args: &DemoArgs, exe: &Path, guest: &guest_rig::Guest) -> Result<ExitCode> {
    // Removed on every exit path (when `work` drops).
    let scratch = guest_rig::scratch_dir();
    std::fs::create_dir_all(&scratch).map_err(io("creating the work directory"))?;
    let work = tempfile::Builder::new()
        .prefix("thinvm-demo-")
        .tempdir_in(&scratch)
        .map_err(io("creating the work directory"))?;
    let mut vmms = vec![Vmm::Thinvm(exe)];
    if args.compare_qemu {
        vmm::require_qemu()?;
        vmms.push(Vmm::Qemu);
    }
    let all = steps(args.fill_mib);
    let mut runs = Vec::new();
    for vmm in &vmms {
        runs.push(run_series(args, vmm, guest, work.path(), &all)?);
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
    chart::draw(&chart_path, &series, &labels)?;
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
