//! Pausing, resuming and snapshotting a running VM (what `--api-socket` offers).
//!
//! A snapshot: the vCPUs are parked (pending I/O completed), every virtio device is paused
//! (drained: what it took from a queue is answered) and reports where its queues stand; then
//! the VM's and each vCPU's KVM state, the serial port and the transports are saved, guest RAM
//! is written, each writable disk is frozen as a qcow2 layer of the snapshot (the VM goes on
//! on a fresh overlay), and `state.json` is written last. Devices and vCPUs then resume,
//! unless the VM was paused before.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::SerialDevice;
use devices::virtio::mmio::{MmioTransport, TransportState};

use crate::disks::DiskHandle;
use crate::error::{Result, VmmError};
use crate::snapshot::state::{self, CpuModel, SavedDisk, SavedVsock, SnapshotState};
use crate::snapshot::{disks, memory, vm};
use crate::sync::lock;
use crate::vstate::vcpu::PauseControl;
use crate::vstate::vm::Vm;

/// How long the vCPUs have to park.
const PARK_WAIT: Duration = Duration::from_secs(5);

/// The vsock device, for snapshots.
#[derive(Clone)]
pub struct VsockHandle {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub slot: usize,
    pub cid: u64,
}

/// Everything the control needs of the running VM.
pub struct VmControl {
    pub vm: Arc<Vm>,
    pub pause: Arc<PauseControl>,
    pub kick: Arc<dyn Fn() + Send + Sync>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub disks: Vec<DiskHandle>,
    pub vsock: Option<VsockHandle>,
    pub debug_exit: Option<(u16, u16)>,
    pub mem_size: u64,
    pub cpus: u32,
    /// Paused on request (stays paused across a snapshot).
    user_paused: bool,
}

impl VmControl {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Arc<Vm>,
        pause: Arc<PauseControl>,
        kick: Arc<dyn Fn() + Send + Sync>,
        serial: Arc<Mutex<SerialDevice>>,
        disks: Vec<DiskHandle>,
        vsock: Option<VsockHandle>,
        debug_exit: Option<(u16, u16)>,
        mem_size: u64,
        cpus: u32,
    ) -> VmControl {
        VmControl {
            vm,
            pause,
            kick,
            serial,
            disks,
            vsock,
            debug_exit,
            mem_size,
            cpus,
            user_paused: false,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.user_paused
    }

    /// Parks the vCPUs (devices finish what they have and stay idle without guest kicks).
    pub fn pause(&mut self) -> Result<()> {
        if self.user_paused {
            return Ok(());
        }
        let kick = self.kick.clone();
        self.pause.pause_all(&*kick, PARK_WAIT)?;
        self.user_paused = true;
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) -> Result<()> {
        if !self.user_paused {
            return Err(VmmError::NotPaused);
        }
        self.pause.resume_all();
        self.user_paused = false;
        Ok(())
    }

    fn transports(&self) -> Vec<Arc<Mutex<MmioTransport>>> {
        let mut t: Vec<_> = self.disks.iter().map(|d| d.transport.clone()).collect();
        if let Some(v) = &self.vsock {
            t.push(v.transport.clone());
        }
        t
    }

    /// Takes a snapshot into `dir` (new, or an empty directory).
    pub fn snapshot(&mut self, dir: &Path) -> Result<()> {
        for d in &self.disks {
            disks::check(d)?;
        }
        let created = prepare_dir(dir)?;
        let was_paused = self.user_paused;
        if !was_paused {
            let kick = self.kick.clone();
            self.pause.pause_all(&*kick, PARK_WAIT)?;
        }
        // Devices: drained and paused, their transports' state taken.
        let transports = self.transports();
        let mut saved: Vec<TransportState> = Vec::new();
        let mut result = Ok(());
        for t in &transports {
            match lock(t).pause() {
                Ok(s) => saved.push(s),
                Err(e) => {
                    result = Err(VmmError::DevicePause(e));
                    break;
                }
            }
        }
        let result = result.and_then(|()| self.write_snapshot(dir, saved));
        // Everything goes on (the devices that were paused, then the vCPUs).
        for t in &transports {
            lock(t).resume();
        }
        if !was_paused {
            self.pause.resume_all();
        }
        if result.is_err() && created {
            // Nothing of the VM depends on the directory yet when it failed before the disks
            // were frozen; after, the frozen layers stay (the running disks use them).
            let keep = self
                .disks
                .iter()
                .any(|d| !d.config.read_only && dir.join(layer_name(d.slot)).exists());
            if !keep {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        result
    }

    /// Saves everything while the VM is parked and its devices paused.
    fn write_snapshot(&self, dir: &Path, mut saved: Vec<TransportState>) -> Result<()> {
        let vm_state = vm::save(&self.vm.fd)?;
        let vcpus = self.pause.save_all()?;
        let serial = lock(&self.serial).snapshot();
        let mem_path = dir.join(state::MEMORY_FILE);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&mem_path)
            .and_then(|f| {
                memory::write(&self.vm.memory, &f)?;
                f.sync_all()
            })
            .map_err(|source| VmmError::SnapshotWrite {
                path: mem_path.clone(),
                source,
            })?;
        let vsock_state = if self.vsock.is_some() {
            saved.pop()
        } else {
            None
        };
        // The disks last: once frozen, the running VM depends on the snapshot's layers.
        let mut frozen = Vec::new();
        let mut saved_disks = Vec::new();
        for (d, t) in self.disks.iter().zip(saved) {
            let layer = dir.join(layer_name(d.slot));
            match disks::freeze(d, &layer) {
                Ok(f) => frozen.push(f),
                Err(e) => {
                    frozen.iter().for_each(disks::abandon);
                    return Err(e);
                }
            }
            saved_disks.push(SavedDisk {
                slot: d.slot,
                image: if d.config.read_only {
                    std::fs::canonicalize(&d.path)
                        .unwrap_or_else(|_| d.path.clone())
                        .display()
                        .to_string()
                } else {
                    layer_name(d.slot)
                },
                in_snapshot: !d.config.read_only,
                options: disks::options(&d.config, d.format, t.queues.len()),
                transport: t,
            });
        }
        let s = SnapshotState {
            format: state::FORMAT_VERSION,
            thinvm_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu: CpuModel::host(),
            mem_size: self.mem_size,
            cpus: self.cpus,
            vm: vm_state,
            vcpus,
            serial,
            debug_exit: self.debug_exit,
            disks: saved_disks,
            vsock: match (&self.vsock, vsock_state) {
                (Some(v), Some(t)) => Some(SavedVsock {
                    slot: v.slot,
                    cid: v.cid,
                    transport: t,
                }),
                _ => None,
            },
        };
        state::store(dir, &s).inspect_err(|_| frozen.iter().for_each(disks::abandon))
    }
}

/// The file name of slot `slot`'s frozen layer.
pub fn layer_name(slot: usize) -> String {
    format!("disk{slot}.qcow2")
}

/// Creates `dir`, or accepts an empty one; true when created.
fn prepare_dir(dir: &Path) -> Result<bool> {
    let write_err = |source| VmmError::SnapshotWrite {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = std::fs::read_dir(dir).map_err(write_err)?.next().is_none();
            if empty {
                Ok(false)
            } else {
                Err(VmmError::SnapshotDirNotEmpty {
                    dir: dir.to_path_buf(),
                })
            }
        }
        Err(e) => Err(write_err(e)),
    }
}

/// A snapshot directory given relative to thinvm's working directory, made absolute.
pub fn absolute(dir: &str) -> PathBuf {
    let p = PathBuf::from(dir);
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|c| c.join(&p)).unwrap_or(p)
    }
}
