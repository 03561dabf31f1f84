//! The synchronous engine (`aio=sync`): every operation runs inside [`Engine::submit`], on
//! the calling thread, one after another.

use std::os::unix::io::RawFd;

use super::api::{run_sync, Aio, Completion, DataOp, Engine};

/// Runs each operation at once; completions wait in a list until reaped.
#[derive(Default)]
pub struct SyncEngine {
    done: Vec<Completion>,
}

impl Engine for SyncEngine {
    fn aio(&self) -> Aio {
        Aio::Sync
    }

    unsafe fn submit(&mut self, tag: u64, op: DataOp) {
        let r = run_sync(&op);
        self.done.push((tag, r));
    }

    fn reap(&mut self, _wait: bool, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn notifier(&self) -> Option<RawFd> {
        None
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
