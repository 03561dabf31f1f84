//! A guest request as a plan: what the image's metadata says must happen, as data, for one
//! executor to carry out (Cloud Hypervisor's qcow2 `metadata.rs` idea).
//!
//! A plan has
//! * stages of data operations ([`DataOp`]: host reads and writes with their buffers), run
//!   one stage after the other, the operations of a stage side by side: the copy-on-write
//!   reads of a partially written new cluster come first, its data write second;
//! * metadata actions, applied in order once all data is in the file (only then may an L2
//!   entry point at a new cluster: refcounts before L2 on allocation);
//! * the clusters it allocated, given back if the data cannot be written;
//! * the bounce buffers its operations read into and write from (copy-on-write parts).
//!
//! The executor is [`crate::pipeline::Pipeline`] (many requests in flight) or
//! [`Plan::run_sync`] (one request, on the calling thread).

use std::io;

use crate::engine::{run_sync, DataOp};
use crate::host_file::AlignedBuf;

/// A metadata change applied after a plan's data operations succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// qcow2: guest cluster `gc` now maps to L2 entry `entry`; whatever it mapped before is
    /// released.
    Map { gc: u64, entry: u64 },
    /// Zero detection: the request's bytes `offset..offset + len` (guest) were all zeros, to
    /// be zeroed or unmapped instead of written.
    Zeroes { offset: u64, len: u64 },
}

/// What one read or write request needs done.
#[derive(Default)]
pub struct Plan {
    pub(crate) stages: Vec<Vec<DataOp>>,
    pub(crate) actions: Vec<Action>,
    /// Host clusters allocated for the plan (first cluster, count), given back if a data
    /// operation fails.
    pub(crate) new_clusters: Vec<(u64, u64)>,
    pub(crate) bounce: Vec<AlignedBuf>,
    /// Whether it is a write's plan (reads have no metadata to finish).
    pub(crate) write: bool,
}

impl Plan {
    /// An empty write plan.
    pub(crate) fn write() -> Self {
        Plan {
            write: true,
            ..Plan::default()
        }
    }

    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Data operations of all stages.
    pub fn ops(&self) -> usize {
        self.stages.iter().map(|s| s.len()).sum()
    }

    /// Adds `op` to stage `stage` (creating the stages up to it).
    pub(crate) fn push(&mut self, stage: usize, op: DataOp) {
        if op.is_empty() {
            return;
        }
        while self.stages.len() <= stage {
            self.stages.push(Vec::new());
        }
        self.stages[stage].push(op);
    }

    /// Adds every stage of `other` (a backing file's read plan) to the same stages here,
    /// shifted by `stage`.
    pub(crate) fn merge(&mut self, stage: usize, other: Plan) {
        for (i, ops) in other.stages.into_iter().enumerate() {
            for op in ops {
                self.push(stage + i, op);
            }
        }
        self.bounce.extend(other.bounce);
        self.actions.extend(other.actions);
        self.new_clusters.extend(other.new_clusters);
    }

    /// Runs every data operation on the calling thread, stage after stage; stops at the first
    /// error.
    pub fn run_sync(&self) -> io::Result<()> {
        for stage in &self.stages {
            for op in stage {
                run_sync(op)?;
            }
        }
        Ok(())
    }
}
