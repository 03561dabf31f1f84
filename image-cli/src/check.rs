//! `thinvm image check`, with qemu-img's exit codes: 0 clean, 1 could not check,
//! 2 corruptions, 3 leaks only.

use std::path::Path;

use block::inspect::{CheckReport, RepairMode};
use serde_json::{json, Value};

use crate::args::{OutputFormat, RepairArg};
use crate::error::{CliError, Result};

fn to_json(r: &CheckReport) -> Value {
    let mut v = json!({
        "filename": r.filename,
        "format": r.format,
        "check-errors": r.check_errors,
    });
    if let Some(obj) = v.as_object_mut() {
        let mut put = |k: &str, x: Option<u64>| {
            if let Some(x) = x {
                obj.insert(k.into(), json!(x));
            }
        };
        put("image-end-offset", r.image_end_offset);
        put("total-clusters", r.total_clusters);
        if r.allocated_clusters.unwrap_or(0) > 0 {
            put("allocated-clusters", r.allocated_clusters);
            put("fragmented-clusters", r.fragmented_clusters);
            put("compressed-clusters", r.compressed_clusters);
        }
        let nz = |x: u64| (x > 0).then_some(x);
        put("corruptions", nz(r.corruptions));
        put("leaks", nz(r.leaks));
        put("corruptions-fixed", nz(r.corruptions_fixed));
        put("leaks-fixed", nz(r.leaks_fixed));
    }
    v
}

fn to_human(r: &CheckReport) -> String {
    let mut s = String::new();
    for m in &r.messages {
        s.push_str(m);
        s.push('\n');
    }
    if r.messages_dropped > 0 {
        s.push_str(&format!(
            "({} more messages not shown; every problem is counted below)\n",
            r.messages_dropped
        ));
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    }
    if r.corruptions > 0 {
        s.push_str(&format!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
            r.corruptions
        ));
    }
    if r.leaks > 0 {
        s.push_str(&format!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
            r.leaks
        ));
    }
    if r.check_errors > 0 {
        s.push_str(&format!(
            "\n{} internal errors have occurred during the check.\n",
            r.check_errors
        ));
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        if total > 0 && alloc > 0 {
            let pct = |x: u64, of: u64| 100.0 * x as f64 / of.max(1) as f64;
            s.push_str(&format!(
                "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                pct(alloc, total),
                pct(r.fragmented_clusters.unwrap_or(0), alloc),
                pct(r.compressed_clusters.unwrap_or(0), alloc),
            ));
        }
    }
    if let Some(end) = r.image_end_offset {
        s.push_str(&format!("Image end offset: {end}\n"));
    }
    s
}

/// Runs the check and returns the exit code.
pub fn run(
    file: &Path,
    repair: Option<RepairArg>,
    output: OutputFormat,
    quiet: bool,
    force_share: bool,
) -> Result<u8> {
    let mode = repair.map(|r| match r {
        RepairArg::Leaks => RepairMode::Leaks,
        RepairArg::All => RepairMode::All,
    });
    let report = match block::inspect::check_shared(file, mode, force_share) {
        Ok(r) => r,
        Err(e) => {
            // qemu-img: "could not check" is exit code 1.
            eprintln!("thinvm: {}", CliError::image(file, e));
            return Ok(1);
        }
    };
    if !quiet {
        match output {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&to_json(&report))?),
            OutputFormat::Human => print!("{}", to_human(&report)),
        }
    }
    Ok(if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}
