//! The VMM's error type: one variant per kind of failure, each naming the operation that
//! failed and carrying the error that made it fail as its source.

use std::path::PathBuf;

/// Everything that can stop thinvm from starting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A command-line option's value that is malformed or contradicts another option; the
    /// message names the option and the value (there is no underlying error). Nothing ran.
    #[error("{0}")]
    Config(String),
    /// `thinvm run` without --kernel, --disk or --ephemeral would write the default guest's
    /// shared base image.
    #[error(
        "the default guest's root disk is its shared, cached base image: add --ephemeral (a throw-away overlay over it), or give --disk, or --kernel"
    )]
    DefaultGuestNeedsOverlay,
    /// Building (or finding in the cache) the default guest failed.
    #[error("the default guest: {0}")]
    DefaultGuest(#[source] guest_rig::RigError),
    /// A file given on the command line (`what`: kernel, initrd, disk) cannot be opened.
    #[error("{what} {}: cannot read: {source}", path.display())]
    InputFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file given on the command line is a directory, a device, ...
    #[error("{what} {}: not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    /// More vCPUs than this host's KVM allows.
    #[error("--cpus {cpus}: this host's KVM allows at most {max}")]
    TooManyVcpus { cpus: u32, max: u32 },
    /// More vCPUs than a firmware table (`table`: the MP table, the MADT) can describe:
    /// APIC ids are bytes, the IOAPIC's being `cpus`.
    #[error("{cpus} vCPUs do not fit the {table} (1..=254)")]
    VcpusForTable { cpus: u32, table: &'static str },
    /// The MP table outgrew the EBDA.
    #[error("{cpus} CPUs: MP table too large")]
    MpTableTooLarge { cpus: u32 },
    /// More virtio-mmio devices than the DSDT names (VR00..VR99).
    #[error("ACPI tables: {count} virtio-mmio devices, at most 100 have a DSDT name")]
    AcpiTooManyDevices { count: usize },
    /// A virtio-mmio window a Memory32Fixed descriptor cannot describe.
    #[error(
        "ACPI tables: device {index} at {base:#x} (+{size:#x}) is above 4 GiB (Memory32Fixed)"
    )]
    AcpiDeviceAbove4G { index: u32, base: u64, size: u64 },
    /// The tables do not fit their area of guest memory.
    #[error("ACPI tables: they do not fit in {start:#x}..{end:#x}")]
    AcpiSpace { start: u64, end: u64 },
    /// `--vsock` with every virtio-mmio slot taken by disks.
    #[error(
        "--vsock: no virtio-mmio slot left ({} devices at most, disks included)",
        crate::arch::layout::VIRTIO_MMIO_SLOTS
    )]
    VsockNoSlot,
    /// `--debug-exit` ports that overlap another device's.
    #[error("--debug-exit port={port:#x},size={size}: overlaps another device's ports")]
    DebugExitOverlap {
        port: u16,
        size: u16,
        #[source]
        source: devices::bus::BusError,
    },
    /// `--api-socket` names a file that is not a socket (thinvm replaces only stale sockets).
    #[error("--api-socket {}: exists and is not a socket", path.display())]
    ApiSocketNotSocket { path: PathBuf },
    /// This host has no KVM device (what to do is in the message).
    #[error(
        "/dev/kvm: does not exist: this host has no KVM (enable virtualization in the firmware, load kvm_intel or kvm_amd, or run inside a VM with nested virtualization)"
    )]
    KvmMissing,
    /// This user may not open the KVM device (what to do is in the message).
    #[error(
        "/dev/kvm: permission denied: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root ({0})"
    )]
    KvmPermission(#[source] kvm_ioctls::Error),
    /// A KVM whose API version is not 12.
    #[error("/dev/kvm: unsupported KVM API version {0}")]
    KvmApiVersion(i32),
    /// A KVM without a capability thinvm needs (which).
    #[error("/dev/kvm: KVM lacks a required capability: {0}")]
    KvmCapability(&'static str),
    /// A KVM system or VM ioctl (`op`: which, and on what).
    #[error("/dev/kvm: {op}: {source}")]
    Kvm {
        op: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kernel file could not be opened or read (`op`: which).
    #[error("kernel {}: cannot {op}: {source}", path.display())]
    KernelFile {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a bzImage nor an ELF file.
    #[error(
        "kernel {}: not a Linux kernel: neither a bzImage (no 'HdrS' boot header) nor an ELF file",
        path.display()
    )]
    KernelFormat { path: PathBuf },
    /// linux-loader refused the kernel.
    #[error("kernel {}: cannot load: {source}", path.display())]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel, loaded, reaches past guest RAM below the MMIO hole.
    #[error(
        "kernel {}: ends at {end:#x}, beyond guest RAM ({ram_end:#x}); give the VM more memory",
        path.display()
    )]
    KernelTooLarge {
        path: PathBuf,
        end: u64,
        ram_end: u64,
    },
    /// The kernel command line is refused (too long, a NUL, not printable ASCII).
    #[error("kernel command line: {source}")]
    Cmdline {
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// The kernel command line could not be written into guest memory.
    #[error("kernel command line: {source}")]
    CmdlineWrite {
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd file could not be opened or read (`op`: which).
    #[error("initrd {}: cannot {op}: {source}", path.display())]
    InitrdFile {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Reading the initrd into guest RAM.
    #[error("initrd {}: cannot read: {source}", path.display())]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: vm_memory::VolatileMemoryError,
    },
    /// The initrd does not fit in guest RAM between the kernel and the MMIO hole (or the
    /// kernel's `initrd_addr_max`).
    #[error(
        "initrd {}: {size} bytes do not fit in guest RAM above the kernel; give the VM more memory",
        path.display()
    )]
    InitrdTooLarge { path: PathBuf, size: u64 },
    /// The guest RAM the initrd was to be read into.
    #[error("initrd {}: {source}", path.display())]
    InitrdMemory {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the boot information (`what`: the zero page or the PVH start info).
    #[error("guest memory: {what}: {source}")]
    BootInfo {
        what: &'static str,
        #[source]
        source: linux_loader::configurator::Error,
    },
    /// More e820 entries than the boot protocol holds (thinvm's map has at most five).
    #[error("guest memory: {entries} memory map entries, more than the boot protocol holds")]
    E820Entries { entries: usize },
    /// Writing boot structures into guest memory (`what`: which, and where).
    #[error("guest memory: {what}: {source}")]
    GuestMemory {
        what: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A guest RAM size this host cannot address.
    #[error("guest memory: {mem_size} bytes: more than this host addresses")]
    MemorySize { mem_size: u64 },
    /// Mapping `len` bytes of guest RAM at guest address `addr` (anonymous memory, or a
    /// snapshot's memory file).
    #[error("guest memory: cannot map {len} bytes at {addr:#x}: {source}")]
    MemoryMmap {
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused a mapping as a guest region.
    #[error("guest memory: region at {addr:#x}: {source}")]
    MemoryRegion {
        addr: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region reaching past the end of the guest address space.
    #[error("guest memory: region at {addr:#x} (+{len:#x}) overflows the address space")]
    MemoryRegionOverflow { addr: u64, len: usize },
    /// The snapshot directory could not be resolved.
    #[error("snapshot {}: {source}", dir.display())]
    SnapshotDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The snapshot's state file could not be read.
    #[error("{}: {source}", path.display())]
    SnapshotStateRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file lacks even the version fields: not a thinvm snapshot.
    #[error("{}: not a thinvm snapshot ({source})", path.display())]
    SnapshotNotThinvm {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A state file of this version that does not parse.
    #[error("{}: damaged snapshot state ({source})", path.display())]
    SnapshotStateDamaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A snapshot of another thinvm version, state format or CPU model, or whose state
    /// contradicts itself (`reason` says which).
    #[error("snapshot {} cannot be restored: {reason}", dir.display())]
    SnapshotRefused {
        dir: PathBuf,
        reason: SnapshotRefusal,
    },
    /// A file the snapshot's state names (`what`: the memory file, a disk image) is missing.
    #[error("snapshot {}: {what} {} is missing", dir.display(), file.display())]
    SnapshotFileMissing {
        dir: PathBuf,
        what: &'static str,
        file: PathBuf,
    },
    /// The state's devices are not in the order thinvm saves them.
    #[error("snapshot {}: state: {problem}", dir.display())]
    SnapshotStateInvalid { dir: PathBuf, problem: &'static str },
    /// A device (`device`: which) refused its saved virtio-mmio transport state.
    #[error("snapshot {}: {device}: {source}", dir.display())]
    SnapshotDevice {
        dir: PathBuf,
        device: String,
        #[source]
        source: devices::virtio::mmio::RestoreError,
    },
    /// A clone's disk overlay could not be created.
    #[error("clone overlay {}: {source}", path.display())]
    CloneOverlay {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// Not every vCPU parked within `wait` (pause, snapshot); they run again.
    #[error("{parked} of {total} vCPUs stopped within {wait:?}")]
    VcpusNotParked {
        parked: usize,
        total: usize,
        wait: std::time::Duration,
    },
    /// A parked vCPU's thread that is gone or did not answer (`problem`: which).
    #[error("vCPU {id} {problem}")]
    VcpuUnresponsive { id: usize, problem: &'static str },
    /// `resume` of a VM that was not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// A device that could not be paused (for a snapshot), or whose worker refused a job.
    #[error("a virtio device cannot be paused: {0}")]
    DevicePause(#[source] devices::virtio::PauseError),
    /// A snapshot into a directory that holds files.
    #[error("{}: the snapshot directory must be new or empty", dir.display())]
    SnapshotDirNotEmpty { dir: PathBuf },
    /// Writing a snapshot's directory, memory file or state file (`path`: which).
    #[error("{}: {source}", path.display())]
    SnapshotWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The snapshot state could not be encoded.
    #[error("snapshot state: {0}")]
    SnapshotStateEncode(#[source] serde_json::Error),
    /// A writable disk that is not qcow2 cannot be frozen as a layer.
    #[error(
        "disk {} is a {format} image: a snapshot freezes writable disks as qcow2 layers (use a qcow2 overlay, or --ephemeral)",
        path.display()
    )]
    SnapshotDiskNotQcow2 { path: PathBuf, format: &'static str },
    /// A disk whose backing file name is relative would lose it once moved.
    #[error(
        "disk {} names its backing file relatively ({backing}): moved into a snapshot it would not find it (use an absolute backing path, or --ephemeral)",
        path.display()
    )]
    SnapshotRelativeBacking { path: PathBuf, backing: String },
    /// Moving (or, across file systems, copying) a disk into the snapshot (`op`: which).
    #[error("{op} {} into the snapshot: {source}", path.display())]
    SnapshotDiskMove {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Flushing a disk before it is frozen.
    #[error("disk {}: flush: {source}", path.display())]
    SnapshotDiskFlush {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// A disk's worker dropped a job without answering.
    #[error("disk {}: the disk's worker dropped the job", path.display())]
    DiskWorkerGone { path: PathBuf },
    /// The new overlay over a frozen layer could not be created.
    #[error("the new overlay {}: {source}", path.display())]
    SnapshotOverlay {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// The disk's worker could not let go of its image (`path`) to freeze it.
    #[error("releasing {}: {source}", path.display())]
    DiskRelease {
        path: PathBuf,
        #[source]
        source: Box<VmmError>,
    },
    /// Freezing a disk failed and, putting it back, reopening it failed too.
    #[error("{error}; and the disk could not be reopened, its I/O fails: {reopen}")]
    DiskReopen {
        #[source]
        error: Box<VmmError>,
        reopen: Box<VmmError>,
    },
    /// A lock whose holder panicked (`what`: which).
    #[error("{what}: a thread panicked while holding its lock")]
    Poisoned { what: &'static str },
    /// A snapshot's memory file could not be opened or examined.
    #[error("snapshot memory file {}: {source}", path.display())]
    SnapshotMemoryFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's memory file whose size is not the snapshot's guest RAM.
    #[error(
        "snapshot memory file {}: {size} bytes, the snapshot's guest RAM is {ram}",
        path.display()
    )]
    SnapshotMemorySize { path: PathBuf, size: u64, ram: u64 },
    /// vm-memory refused the set of regions (overlapping, unordered).
    #[error("guest memory: {0}")]
    MemoryRegions(#[source] vm_memory::GuestRegionCollectionError),
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
    /// A KVM list (CPUID entries, MSRs) too long for its FAM wrapper (`what`: which).
    #[error("vCPU {id}: {what}: {source}")]
    VcpuList {
        id: u32,
        what: &'static str,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_GET_MSRS or KVM_SET_MSRS (`op`) stopped at MSR `index`, after `done` of `total`.
    #[error("vCPU {id}: {op} took {done} of {total} MSRs (MSR {index:#x} refused)")]
    VcpuMsrRefused {
        id: u32,
        op: &'static str,
        done: usize,
        total: usize,
        index: u32,
    },
    /// Placing a device on the port or MMIO bus (`what`: which device).
    #[error("device setup: {what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::bus::BusError,
    },
    /// The virtio-vsock device could not be created.
    #[error("device setup: vsock: {0}")]
    Vsock(#[source] devices::virtio::vsock::VsockError),
    /// A virtio-mmio transport could not be created (`what`: for which device).
    #[error("device setup: {what} virtio-mmio: {source}")]
    Transport {
        what: String,
        #[source]
        source: devices::virtio::mmio::TransportError,
    },
    /// A snapshot's serial port state was refused.
    #[error("device setup: serial port state: {0}")]
    SerialState(#[source] devices::legacy::SerialStateError),
    /// The event loop's epoll set could not be created.
    #[error("device setup: event manager: {0}")]
    EventManager(#[source] event_manager::Error),
    /// More virtio-mmio devices than the IOAPIC has pins for.
    #[error(
        "device setup: no virtio-mmio slot for device {index} ({} devices at most, disks included)",
        crate::arch::layout::VIRTIO_MMIO_SLOTS
    )]
    NoVirtioSlot { index: usize },
    /// A disk image could not be opened (`path`: as given to `--disk`).
    #[error("disk {}: {source}", path.display())]
    DiskOpen {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// A `cache=none` disk on a file system without O_DIRECT.
    #[error(
        "disk {}: {source}: the file system does not support O_DIRECT (cache=none); use cache=writeback",
        path.display()
    )]
    DiskDirectIo {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// `--ephemeral`: the overlay over `path` could not be created.
    #[error("disk {}: cannot create the ephemeral overlay: {source}", path.display())]
    DiskOverlay {
        path: PathBuf,
        #[source]
        source: block::Error,
    },
    /// A disk's path could not be made absolute (for an overlay's backing file name).
    #[error("disk {}: {source}", path.display())]
    DiskPath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The virtio-blk device of a disk could not start (its I/O engine, its threads).
    #[error("disk {}: cannot start the device: {source}", path.display())]
    DiskDevice {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// The vCPU kick signal is not a signal number (SIGRTMIN is negative?).
    #[error("seccomp: the vCPU kick signal {0} is not a signal number")]
    KickSignal(i32),
    /// glibc refused the malloc tuning confined threads need (see `seccomp::prepare_process`).
    #[error("seccomp: cannot set malloc's trim threshold")]
    MallocTrim,
    /// The handler that reports a forbidden system call could not be installed.
    #[error("seccomp: SIGSYS handler: {0}")]
    SigsysHandler(#[source] vmm_sys_util::errno::Error),
    /// The block crate's I/O threads could not start confined (the block crate says why;
    /// shared: the first attempt's error is kept for every later one).
    #[error("seccomp: block I/O threads: {0}")]
    ConfinedIoPool(#[source] std::sync::Arc<block::Error>),
    /// `thinvm ctl`: the VM's `--api-socket` (`socket`) could not be reached, or the request
    /// sent or the answer read (`op`: which).
    #[error("{}: {op}: {source}", socket.display())]
    Ctl {
        socket: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `thinvm ctl`: the VM's answer is not JSON.
    #[error("bad answer '{answer}': {source}")]
    CtlBadAnswer {
        answer: String,
        #[source]
        source: serde_json::Error,
    },
    /// The API socket: a request line that is not a request.
    #[error("bad request: {0}")]
    ApiBadRequest(#[source] serde_json::Error),
    /// The API socket: `snapshot` without an absolute `dir`.
    #[error("snapshot needs \"dir\": an absolute path")]
    ApiSnapshotDir,
    /// The API socket: a command it does not know.
    #[error("unknown command '{cmd}' (pause, resume, snapshot, status)")]
    ApiUnknownCommand { cmd: String },
    /// `--exec`: the connection to the guest's agent failed, or the agent broke the protocol.
    #[error("{0}")]
    Agent(#[source] thinvm_agent::protocol::ProtocolError),
    /// `--exec`: the agent closed the connection before it sent the command's status.
    #[error("the agent closed the connection before the command's status")]
    AgentClosed,
    /// `--exec`: an exit frame whose payload is not an exit status.
    #[error("a malformed exit status")]
    AgentExitStatus,
    /// `--exec`: a frame the host side never expects from the agent.
    #[error("unexpected {0:?} frame from the agent")]
    AgentUnexpectedFrame(thinvm_agent::protocol::Kind),
}

impl VmmError {
    /// Bad options or a snapshot refused before its guest ran (`thinvm restore` exits 1
    /// for these even with `--exec`).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            VmmError::Config(_)
                | VmmError::InputFile { .. }
                | VmmError::NotAFile { .. }
                | VmmError::VsockNoSlot
                | VmmError::SnapshotDir { .. }
                | VmmError::SnapshotStateRead { .. }
                | VmmError::SnapshotNotThinvm { .. }
                | VmmError::SnapshotStateDamaged { .. }
                | VmmError::SnapshotRefused { .. }
                | VmmError::SnapshotFileMissing { .. }
                | VmmError::SnapshotStateInvalid { .. }
                | VmmError::SnapshotDevice { .. }
                | VmmError::SnapshotMemoryFile { .. }
                | VmmError::SnapshotMemorySize { .. }
                | VmmError::CloneOverlay { .. }
        )
    }

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

/// Why a snapshot cannot be restored here ([`VmmError::SnapshotRefused`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRefusal {
    /// Seen in the version fields, before the rest of the state is parsed (it may well not
    /// parse): another state format or another thinvm version (`reads`: the format this
    /// thinvm reads).
    #[error(
        "it was written in state format {format} by thinvm {version}; this is thinvm {} (format {reads})",
        env!("CARGO_PKG_VERSION")
    )]
    Version {
        format: u32,
        version: String,
        reads: u32,
    },
    /// A state format this thinvm does not read (`reads`: the one it reads).
    #[error(
        "it was written in state format {format} by thinvm {version}; this thinvm reads format {reads} only"
    )]
    Format {
        format: u32,
        version: String,
        reads: u32,
    },
    /// Taken by another thinvm version.
    #[error(
        "it was taken by thinvm {version}; this is thinvm {} (snapshots are restored by the version that took them)",
        env!("CARGO_PKG_VERSION")
    )]
    ThinvmVersion { version: String },
    /// Taken on another CPU model (`taken`, `host`: each described).
    #[error(
        "it was taken on CPU {taken}; this host's CPU is {host} (a guest's CPU features must not change under it)"
    )]
    Cpu { taken: String, host: String },
    /// A guest RAM size thinvm does not create.
    #[error(
        "its guest RAM size {mem_size} is not whole pages from {} MiB to {} GiB",
        crate::arch::layout::MIN_MEMORY >> 20,
        crate::arch::layout::MAX_MEMORY >> 30
    )]
    MemorySize { mem_size: u64 },
    /// A vCPU count that does not match the vCPU states held.
    #[error("it describes {cpus} vCPUs but holds the state of {states}")]
    VcpuCount { cpus: u32, states: usize },
}

/// Result alias of the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
