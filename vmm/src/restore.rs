//! `thinvm restore DIR`: a clone of a snapshot. Guest RAM is the snapshot's memory file
//! mapped copy-on-write (clones share its page cache); each disk runs on a fresh overlay of
//! its own over the snapshot's frozen layer (`--ephemeral`: a temporary one, deleted at the
//! end; else a file in `--overlay-dir`, default the snapshot directory); the vsock device
//! gets a new socket and tells the guest its connections were reset. Everything is checked
//! (version, CPU model, files) before a VM is created: a snapshot that cannot be restored is
//! refused with the reason, never half-restored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{parse_serial, VmConfig};
use crate::error::{Result, VmmError};
use crate::lifecycle::{timing_mark, ExitReason, ExitState};
use crate::runner::{self, Launch};
use crate::snapshot::state::{self, SnapshotState};
use crate::snapshot::{memory, vm as vm_state};
use crate::testvm_config::{DebugExitConfig, TestVmOptions, VsockOptions};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// `thinvm restore`'s options, as given.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The snapshot directory (from `thinvm ctl PATH snapshot DIR`).
    pub dir: PathBuf,
    /// Each disk on a temporary overlay, deleted when the clone ends.
    pub ephemeral: bool,
    /// Where the clone's disk overlays go without `ephemeral` (`None`: the snapshot
    /// directory).
    pub overlay_dir: Option<PathBuf>,
    /// `--serial` (`None`: stdio, or none with `--exec`).
    pub serial: Option<String>,
    /// seccomp filters for thinvm's threads.
    pub seccomp: bool,
    pub testvm: TestVmOptions,
}

fn bad(msg: impl Into<String>) -> VmmError {
    VmmError::Config(msg.into())
}

/// A fresh overlay for a clone over `layer`, in `dir`.
fn clone_overlay(dir: &Path, layer: &Path, slot: usize) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(
        "clone-{}-{nanos:x}-disk{slot}.qcow2",
        std::process::id()
    ));
    block::qcow2::create(
        &path,
        &block::qcow2::CreateOptions {
            backing_file: Some(layer.display().to_string()),
            backing_format: Some(block::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .map_err(|source| VmmError::CloneOverlay {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Checks the snapshot and the options, and works out the clone's configuration (creating
/// its disk overlays last).
fn configure(args: &RestoreOptions, dir: &Path, s: &SnapshotState) -> Result<VmConfig> {
    if args.testvm.debug_exit.is_some() {
        return Err(bad(
            "--debug-exit: a clone has the snapshot's devices (its debug-exit port included)",
        ));
    }
    let mem = dir.join(state::MEMORY_FILE);
    let missing = |what, file| VmmError::SnapshotFileMissing {
        dir: dir.to_path_buf(),
        what,
        file,
    };
    let invalid = |problem| VmmError::SnapshotStateInvalid {
        dir: dir.to_path_buf(),
        problem,
    };
    if !mem.is_file() {
        return Err(missing("memory file", mem));
    }
    let mut images = Vec::new();
    for (i, d) in s.disks.iter().enumerate() {
        if d.slot != i {
            return Err(invalid("disks out of order"));
        }
        let image = if d.in_snapshot {
            dir.join(&d.image)
        } else {
            PathBuf::from(&d.image)
        };
        if !image.is_file() {
            return Err(missing("disk image", image));
        }
        images.push(image);
    }
    let mut testvm = args.testvm.validate()?;
    if let Some(v) = &s.vsock {
        if v.slot != s.disks.len() {
            return Err(invalid("the vsock device is not after the disks"));
        }
    }
    match (&s.vsock, &args.testvm.vsock) {
        (None, Some(_)) => return Err(bad("--vsock: the snapshot has no vsock device")),
        (Some(v), None) => {
            // --exec made a socket with CID 3; without --exec, one is made all the same.
            let uds = testvm.vsock.take().map(|o| o.uds).unwrap_or_else(|| {
                std::env::temp_dir().join(format!("thinvm-{}.vsock", std::process::id()))
            });
            testvm.vsock = Some(VsockOptions { cid: v.cid, uds });
        }
        _ => {}
    }
    if s.vsock.is_some() {
        if let Some(v) = &testvm.vsock {
            eprintln!(
                "thinvm: vsock socket {} (guest CID {})",
                v.uds.display(),
                v.cid
            );
        }
    } else if testvm.exec.is_some() {
        return Err(bad(
            "--exec: the snapshot has no vsock device for the agent",
        ));
    }
    testvm.debug_exit = s
        .debug_exit
        .map(|(port, size)| DebugExitConfig { port, size });
    let serial = parse_serial(args.serial.as_deref().unwrap_or(if testvm.exec.is_some() {
        "none"
    } else {
        "stdio"
    }))?;
    // The disks last (they create files).
    let overlay_dir = args
        .overlay_dir
        .clone()
        .unwrap_or_else(|| dir.to_path_buf());
    let mut disks = Vec::new();
    for (d, image) in s.disks.iter().zip(images) {
        let read_only = d.options.contains("readonly=on");
        let path = if args.ephemeral || read_only {
            image
        } else {
            clone_overlay(&overlay_dir, &image, d.slot)?
        };
        let cfg = crate::config::parse_disk(&format!("path={},{}", path.display(), d.options))?;
        if !args.ephemeral && !read_only {
            eprintln!("thinvm: disk {} on overlay {}", d.slot, path.display());
        }
        disks.push(cfg);
    }
    Ok(VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        mem_size: s.mem_size,
        cpus: s.cpus,
        disks,
        ephemeral: args.ephemeral,
        serial,
        seccomp: args.seccomp,
        stats_interval: None,
        testvm,
        // The guest's ACPI tables, if it had any, are in the restored memory.
        acpi: false,
    })
}

/// Restores and runs the clone: [`build`], [`Launch::run`].
pub fn restore(args: &RestoreOptions) -> Result<ExitReason> {
    build(args)?.run()
}

/// Builds the clone: its memory mapped from the snapshot, devices and vCPUs in their saved
/// state. Nothing runs yet.
pub fn build(args: &RestoreOptions) -> Result<Launch> {
    let dir = std::fs::canonicalize(&args.dir).map_err(|source| VmmError::SnapshotDir {
        dir: args.dir.clone(),
        source,
    })?;
    timing_mark("build");
    let s = state::load(&dir)?;
    let cfg = configure(args, &dir, &s)?;
    timing_mark("state-loaded");
    let (signals, kvm) = runner::open_kvm(cfg.cpus, cfg.seccomp)?;
    timing_mark("kvm-open");
    let memory = memory::map(&dir.join(state::MEMORY_FILE), &Vm::ram_ranges(s.mem_size)?)?;
    let vm = Arc::new(Vm::with_memory(&kvm, memory)?);
    vm_state::restore(&vm.fd, &s.vm)?;
    timing_mark("vm-memory");
    let exit = Arc::new(ExitState::new().map_err(|e| VmmError::io("eventfd", e))?);
    let devs = runner::attach_devices(&vm, &cfg, &exit, Some(&s.serial), true)?;
    timing_mark("devices");
    let device_err = |device: String| {
        let dir = dir.clone();
        move |source| VmmError::SnapshotDevice {
            dir,
            device,
            source,
        }
    };
    for (h, d) in devs.disk_set.handles().iter().zip(&s.disks) {
        h.transport
            .lock()
            .map_err(|_| VmmError::Poisoned {
                what: "disk transport",
            })?
            .restore(&d.transport)
            .map_err(device_err(format!("disk {}", d.slot)))?;
    }
    if let (Some(dev), Some(v)) = (&devs.vsock_dev, &s.vsock) {
        dev.transport
            .lock()
            .map_err(|_| VmmError::Poisoned {
                what: "vsock transport",
            })?
            .restore(&v.transport)
            .map_err(device_err("vsock".into()))?;
    }
    let mut vcpus = Vec::new();
    for v in &s.vcpus {
        vcpus.push(Vcpu::restored(&vm.fd, v)?);
    }
    timing_mark("vcpus-restored");
    Ok(Launch {
        kvm,
        vm,
        exit,
        devs,
        vcpus,
        signals,
        cfg,
    })
}
