//! The kinds of thinvm thread that each get their own seccomp filter, and which rule
//! tables (`rules.rs`) make up each kind's filter.

use super::rules;

/// Thread kinds with their own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, shutdown, statistics, clean-up.
    Vmm,
    /// A vCPU thread: KVM_RUN and device emulation on exits.
    Vcpu,
    /// A block device worker or one of the image crate's I/O threads: image I/O.
    Block,
    /// The main thread of a VM with `--api-socket`: also serves pause, resume and snapshot
    /// requests (a snapshot writes its directory and swaps each disk's overlay).
    VmmApi,
    /// A vCPU thread of a VM with `--api-socket`: also saves its KVM state for a snapshot.
    VcpuApi,
    /// The virtio-vsock device's thread: its epoll loop over the VM's Unix sockets.
    Vsock,
    /// `--exec`'s agent client and its stdin forwarder.
    Exec,
}

impl ThreadKind {
    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "main (VMM)",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Block => "block I/O",
            ThreadKind::VmmApi => "main (VMM, API socket)",
            ThreadKind::VcpuApi => "vCPU (API socket)",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Exec => "exec client",
        }
    }

    /// The kind of the main thread (`api`: the VM has an API socket).
    pub fn main_thread(api: bool) -> ThreadKind {
        if api {
            ThreadKind::VmmApi
        } else {
            ThreadKind::Vmm
        }
    }

    /// The kind of a vCPU thread (`api`: the VM has an API socket).
    pub fn vcpu_thread(api: bool) -> ThreadKind {
        if api {
            ThreadKind::VcpuApi
        } else {
            ThreadKind::Vcpu
        }
    }

    /// The kind's tables (besides [`rules::COMMON`]): a kind with an API socket adds the
    /// snapshot's rules to those of its base kind.
    pub(super) fn tables(self) -> &'static [rules::Table] {
        match self {
            ThreadKind::Vmm => &[rules::VMM],
            ThreadKind::Vcpu => &[rules::VCPU],
            ThreadKind::Block => &[rules::BLOCK],
            ThreadKind::VmmApi => &[rules::VMM, rules::VMM_API],
            ThreadKind::VcpuApi => &[rules::VCPU, rules::VCPU_SNAPSHOT],
            ThreadKind::Vsock => &[rules::VSOCK],
            ThreadKind::Exec => &[rules::EXEC],
        }
    }
}
