//! The VMM's error type: one variant per kind of failure, each naming the operation that
//! failed and carrying the error that made it fail as its source.

/// Everything that can stop thinvm from starting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Bad options or a refused snapshot: nothing ran.
    #[error("{0}")]
    Config(String),
    /// This host has no KVM thinvm can use (what to do is in the message).
    #[error("/dev/kvm: {0}")]
    KvmUnavailable(String),
    /// A KVM system or VM ioctl (`op`: which, and on what).
    #[error("/dev/kvm: {op}: {source}")]
    Kvm {
        op: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saving or restoring the VM's KVM state (a snapshot).
    #[error("/dev/kvm: {0}")]
    KvmState(String),
    #[error("kernel {path}: {msg}")]
    Kernel { path: String, msg: String },
    #[error("initrd {path}: {msg}")]
    Initrd { path: String, msg: String },
    /// Writing boot structures into guest memory (`what`: which, and where).
    #[error("guest memory: {what}: {source}")]
    GuestMemory {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Allocating or mapping guest memory.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A vCPU ioctl (`op`: which).
    #[error("vCPU {id}: {op}: {source}")]
    VcpuIoctl {
        id: u32,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Starting a vCPU's thread.
    #[error("vCPU {id}: cannot start thread: {source}")]
    VcpuThread {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {id}: {msg}")]
    Vcpu { id: u32, msg: String },
    /// Placing a device on the port or MMIO bus (`what`: which device).
    #[error("device setup: {what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::bus::BusError,
    },
    #[error("device setup: {0}")]
    Device(String),
    /// More virtio-mmio devices than the IOAPIC has pins for.
    #[error(
        "device setup: no virtio-mmio slot for device {index} ({} devices at most, disks included)",
        crate::config::MAX_DISKS
    )]
    NoVirtioSlot { index: usize },
    #[error("disk {path}: {msg}")]
    Disk { path: String, msg: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Building a seccomp filter (`what`: which part, of which thread kind's filter).
    #[error("seccomp: {what}: {source}")]
    SeccompFilter {
        what: String,
        #[source]
        source: seccompiler::BackendError,
    },
    /// Installing a filter on the calling thread.
    #[error("seccomp: cannot install the {kind} filter: {source}")]
    SeccompApply {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("seccomp: {0}")]
    Seccomp(String),
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }

    /// A failed KVM ioctl on the system or VM descriptor.
    pub fn kvm(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        let op = op.into();
        move |source| VmmError::Kvm { op, source }
    }

    /// A failed ioctl on vCPU `id`.
    pub fn vcpu(id: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VmmError::VcpuIoctl { id, op, source }
    }

    /// A failed write of `what` into guest memory.
    pub fn guest_memory(
        what: impl Into<String>,
    ) -> impl FnOnce(vm_memory::GuestMemoryError) -> Self {
        let what = what.into();
        move |source| VmmError::GuestMemory { what, source }
    }

    /// A device that could not be placed on its bus.
    pub fn bus(what: &'static str) -> impl FnOnce(devices::bus::BusError) -> Self {
        move |source| VmmError::Bus { what, source }
    }
}

/// Result alias of the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
