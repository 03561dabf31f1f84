//! One step of the demo: the guest boots with a workload (fill, rm, zero-wipe, fstrim),
//! runs it and shuts down, while the overlay's size is sampled.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{io, DemoError, Result};
use crate::interrupt::interrupted;
use crate::sample::{push_sample, Sample};
use crate::vmm::Vmm;

/// The guest steps of the demo: (workload, label).
pub fn steps(fill: u64) -> Vec<(String, String)> {
    vec![
        (format!("fill:{fill}"), format!("write {fill} MiB of data")),
        ("rm".into(), "delete the file".into()),
        ("zero-wipe".into(), "wipe free space with zeros".into()),
        ("fstrim".into(), "fstrim".into()),
    ]
}

/// Boots the guest for one workload step; returns the step's guest-side time.
pub fn run_step(
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
            if interrupted() {
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
            } else if line.trim_end() == "THINVM-DONE" || line.starts_with("THINVM-DONE ") {
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
    if interrupted() {
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
