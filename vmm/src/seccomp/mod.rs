//! seccomp filters (seccompiler) for thinvm's threads, installed once the VM is set up: each
//! thread kind may make only the system calls in its table (`rules.rs`: the calls, their
//! arguments, and why each is needed), every other call stops thinvm with SIGSYS
//! (`report.rs`). `--seccomp off` disables them for debugging.
//!
//! What the filters enforce beyond a list of calls: vCPU threads issue only the KVM ioctls
//! of their run loop; the main thread only restores the terminal (never `TIOCSTI`); no thread
//! maps or protects memory executable, creates threads or processes, opens files or sockets.

mod ioctls;
mod report;
mod rules;
mod thread_kind;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Result, VmmError};
use rules::{Arg, Test, Width};

pub use thread_kind::ThreadKind;

/// One argument condition in seccompiler's terms.
fn condition(a: &Arg, kick_signal: i32) -> Result<SeccompCondition> {
    let len = match a.width {
        Width::Bits32 => SeccompCmpArgLen::Dword,
        Width::Bits64 => SeccompCmpArgLen::Qword,
    };
    let (op, value) = match a.test {
        Test::Eq(v) => (SeccompCmpOp::Eq, v),
        Test::Masked { mask, value } => (SeccompCmpOp::MaskedEq(mask), value),
        Test::KickSignal => (
            SeccompCmpOp::Eq,
            u64::try_from(kick_signal).map_err(|_| VmmError::KickSignal(kick_signal))?,
        ),
    };
    SeccompCondition::new(a.index, len, op, value).map_err(|source| VmmError::SeccompFilter {
        what: format!("argument {}", a.index),
        source,
    })
}

/// The rules of `kind` (common ones included) as seccompiler rule chains per call number. A
/// call allowed without conditions gets an empty chain, which seccompiler allows outright
/// (whatever conditional rules the call also has).
fn rule_map(kind: ThreadKind, kick_signal: i32) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let tables = kind.tables();
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut outright = Vec::new();
    let calls = tables.iter().flat_map(|t| t.calls.iter());
    for r in rules::COMMON.iter().chain(calls) {
        let conds = r
            .args
            .iter()
            .map(|a| condition(a, kick_signal))
            .collect::<Result<Vec<_>>>()?;
        let chain = map.entry(r.call.nr).or_default();
        if conds.is_empty() {
            outright.push(r.call.nr);
        } else {
            chain.push(
                SeccompRule::new(conds).map_err(|source| VmmError::SeccompFilter {
                    what: format!("{:?} rule for {}", kind, r.call.name()),
                    source,
                })?,
            );
        }
    }
    let ioctls: Vec<&rules::Ioctl> = tables.iter().flat_map(|t| t.ioctls.iter()).collect();
    if !ioctls.is_empty() {
        let chain = map.entry(libc::SYS_ioctl).or_default();
        for i in ioctls {
            let arg = Arg {
                index: 1,
                width: Width::Bits32,
                test: Test::Eq(i.request),
            };
            chain.push(
                SeccompRule::new(vec![condition(&arg, kick_signal)?]).map_err(|source| {
                    VmmError::SeccompFilter {
                        what: format!("ioctl {}", i.name),
                        source,
                    }
                })?,
            );
        }
    }
    for nr in outright {
        map.insert(nr, Vec::new());
    }
    Ok(map)
}

/// The compiled filter for a thread kind: allowed calls pass, anything else traps (SIGSYS).
/// Each kind is compiled once per process (every disk's worker, the I/O pool and a restored
/// VM's threads share it).
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    static COMPILED: std::sync::Mutex<Vec<(ThreadKind, BpfProgram)>> =
        std::sync::Mutex::new(Vec::new());
    let mut compiled = crate::sync::lock(&COMPILED);
    if let Some((_, prog)) = compiled.iter().find(|(k, _)| *k == kind) {
        return Ok(prog.clone());
    }
    let prog = compile(kind)?;
    compiled.push((kind, prog.clone()));
    Ok(prog)
}

fn compile(kind: ThreadKind) -> Result<BpfProgram> {
    let kick = crate::vstate::kick::kick_signal();
    let f = SeccompFilter::new(
        rule_map(kind, kick)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| VmmError::SeccompFilter {
        what: format!("{kind:?} filter"),
        source,
    })?;
    f.try_into().map_err(
        |source: seccompiler::BackendError| VmmError::SeccompFilter {
            what: format!("{kind:?} filter"),
            source,
        },
    )
}

/// Installs `kind`'s compiled filter on the calling thread.
pub fn apply(kind: ThreadKind, prog: &BpfProgram) -> Result<()> {
    seccompiler::apply_filter(prog).map_err(|source| VmmError::SeccompApply {
        kind: kind.name(),
        source,
    })?;
    report::set_thread_kind(kind);
    Ok(())
}

/// Prepares the process for its filters, before any thread is confined: installs the SIGSYS
/// reporter, and stops glibc's malloc from ever shrinking a per-thread heap. (The first such
/// shrink reads /proc/sys/vm/overcommit_memory, and no confined thread may open a file;
/// with the trim threshold at its maximum, free memory at the top of a heap is kept for reuse
/// instead, and large blocks are still mapped and unmapped on their own.)
pub fn prepare_process() -> Result<()> {
    // SAFETY: mallopt only changes malloc's tuning parameters.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
        return Err(VmmError::MallocTrim);
    }
    report::install()
}

#[cfg(test)]
mod tests;
