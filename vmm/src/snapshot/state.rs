//! The snapshot directory's `state.json`: a versioned description of the VM (serde). A
//! snapshot is only restored by the thinvm version and state format that wrote it, on the
//! CPU model it was taken on; anything else is refused before a VM is created.
//!
//! A snapshot directory holds `state.json` (written last: a directory without it is not a
//! snapshot), `memory` (guest RAM, zero pages as holes) and `diskN.qcow2` (each writable
//! disk's frozen layer, read-only from then on).

use std::path::Path;

use devices::legacy::SerialSnapshot;
use devices::virtio::mmio::TransportState;
use serde::{Deserialize, Serialize};

pub use super::cpu_model::CpuModel;
use super::vcpu::VcpuState;
use super::vm::VmKvmState;
use crate::arch::layout::{MAX_MEMORY, MIN_MEMORY};
use crate::error::{SnapshotRefusal, VmmError};

/// The state format this thinvm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";

/// A disk of the snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDisk {
    /// Its virtio-mmio slot.
    pub slot: usize,
    /// The frozen layer (a file of the snapshot directory), or, for a read-only disk, the
    /// image itself (an absolute path).
    pub image: String,
    /// Whether `image` lies in the snapshot directory.
    pub in_snapshot: bool,
    /// The disk's options as `--disk` takes them, without `path=`.
    pub options: String,
    pub transport: TransportState,
}

/// The vsock device of the snapshot (its connections are not kept: the clone's guest is told
/// they were reset).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVsock {
    pub slot: usize,
    pub cid: u64,
    pub transport: TransportState,
}

/// Everything a snapshot holds besides guest RAM and disk layers.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub format: u32,
    pub thinvm_version: String,
    pub cpu: CpuModel,
    pub mem_size: u64,
    pub cpus: u32,
    pub vm: VmKvmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// The debug-exit device: (port, size).
    pub debug_exit: Option<(u16, u16)>,
    pub disks: Vec<SavedDisk>,
    pub vsock: Option<SavedVsock>,
}

/// Why a snapshot cannot be restored here.
pub fn incompatibility(s: &SnapshotState) -> Option<SnapshotRefusal> {
    if s.format != FORMAT_VERSION {
        return Some(SnapshotRefusal::Format {
            format: s.format,
            version: s.thinvm_version.clone(),
            reads: FORMAT_VERSION,
        });
    }
    if s.thinvm_version != env!("CARGO_PKG_VERSION") {
        return Some(SnapshotRefusal::ThinvmVersion {
            version: s.thinvm_version.clone(),
        });
    }
    let cpu = CpuModel::host();
    if s.cpu.vendor != cpu.vendor || s.cpu.signature != cpu.signature {
        return Some(SnapshotRefusal::Cpu {
            taken: s.cpu.describe(),
            host: cpu.describe(),
        });
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&s.mem_size) || s.mem_size % 4096 != 0 {
        return Some(SnapshotRefusal::MemorySize {
            mem_size: s.mem_size,
        });
    }
    if s.vcpus.len() != s.cpus as usize || s.cpus == 0 {
        return Some(SnapshotRefusal::VcpuCount {
            cpus: s.cpus,
            states: s.vcpus.len(),
        });
    }
    None
}

/// Reads `DIR/state.json`: parsed, and refused (with the reason) when it cannot be restored
/// here.
pub fn load(dir: &Path) -> Result<SnapshotState, VmmError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(|source| VmmError::SnapshotStateRead {
        path: path.clone(),
        source,
    })?;
    // The version fields first, so a state from another version is refused for that (its
    // other fields may well not parse).
    #[derive(Deserialize)]
    struct Version {
        format: u32,
        thinvm_version: String,
    }
    let v: Version =
        serde_json::from_slice(&text).map_err(|source| VmmError::SnapshotNotThinvm {
            path: path.clone(),
            source,
        })?;
    if v.format != FORMAT_VERSION || v.thinvm_version != env!("CARGO_PKG_VERSION") {
        return Err(VmmError::SnapshotRefused {
            dir: dir.to_path_buf(),
            reason: SnapshotRefusal::Version {
                format: v.format,
                version: v.thinvm_version,
                reads: FORMAT_VERSION,
            },
        });
    }
    let s: SnapshotState =
        serde_json::from_slice(&text).map_err(|source| VmmError::SnapshotStateDamaged {
            path: path.clone(),
            source,
        })?;
    if let Some(reason) = incompatibility(&s) {
        return Err(VmmError::SnapshotRefused {
            dir: dir.to_path_buf(),
            reason,
        });
    }
    Ok(s)
}

/// Writes `DIR/state.json` (through a temporary file, so it appears whole or not at all).
pub fn store(dir: &Path, s: &SnapshotState) -> Result<(), VmmError> {
    let text = serde_json::to_vec(s).map_err(VmmError::SnapshotStateEncode)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::SnapshotWrite { path, source }
    };
    std::fs::write(&tmp, &text).map_err(write_err(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(write_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpu_is_described() {
        let c = CpuModel::host();
        assert_eq!(c.vendor.len(), 12);
        assert!(c.describe().contains("family"));
    }
}
