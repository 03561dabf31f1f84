//! The `thinvm` command line's argument types (clap). Binary-only: `main.rs` declares this
//! module and `lib.rs` does not, so the library takes plain option structs
//! ([`vmm::config::RunOptions`], [`vmm::restore::RestoreOptions`], [`vmm::ctl::Request`])
//! and does not depend on clap.

use std::path::PathBuf;

use vmm::config::RunOptions;
use vmm::ctl::Request;
use vmm::restore::RestoreOptions;
use vmm::testvm_config::TestVmOptions;

/// On/off switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        self == OnOff::On
    }
}

/// `thinvm run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest kernel: a bzImage, or an ELF vmlinux (PVH entry when it has the note).
    /// Without it, the default guest (built and cached on first use; its root disk is the
    /// cached base image, so --ephemeral or --disk is needed).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default "console=ttyS0 reboot=k panic=-1 pci=off";
    /// virtio-mmio disk announcements are appended).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM (K/M/G suffixes).
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// A virtio-blk disk; repeat for more.
    /// path=FILE[,readonly=on][,format=qcow2|raw][,detect-zeroes=off|on|unmap][,discard=ignore|unmap][,cache=writeback|none][,aio=io_uring|threads|sync][,num-queues=N][,werror=enospc|report][,serial=ID]
    ///
    /// Without format= the format is probed, and a probed image may not be turned against
    /// the host: a qcow2 image that names a backing file is refused (format=qcow2 if you trust
    /// it), and a raw image refuses writes that would make its first bytes look like qcow2
    /// (format=raw allows them).
    #[arg(long = "disk", value_name = "OPTIONS")]
    pub disks: Vec<String>,
    /// Run every disk on a temporary overlay that is deleted when the VM ends.
    #[arg(long)]
    pub ephemeral: bool,
    /// Serial console: stdio, file=PATH or none (default stdio; none with --exec).
    #[arg(long)]
    pub serial: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// seccomp filters for thinvm's threads.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: OnOff,
    /// ACPI tables (RSDP, XSDT, FADT, MADT, DSDT with the virtio-mmio disks and the serial
    /// port): how distribution kernels find the disks. The disks are also announced on the
    /// kernel command line (virtio_mmio.device=) for kernels without ACPI.
    #[arg(long, value_enum, default_value = "on")]
    pub acpi: OnOff,
    /// Print disk statistics every N seconds (they are always printed on exit and SIGUSR1).
    #[arg(long, value_name = "SECS")]
    pub stats_interval: Option<u64>,
    #[command(flatten)]
    pub testvm: TestVmArgs,
}

impl RunArgs {
    /// The options for the library.
    pub fn options(self) -> RunOptions {
        RunOptions {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory: self.memory,
            cpus: self.cpus,
            disks: self.disks,
            ephemeral: self.ephemeral,
            serial: self.serial,
            seccomp: self.seccomp.on(),
            acpi: self.acpi.on(),
            stats_interval: self.stats_interval,
            testvm: self.testvm.options(),
        }
    }
}

/// Test-VM options of `thinvm run` and `thinvm restore`.
#[derive(Debug, Default, clap::Args)]
pub struct TestVmArgs {
    /// QEMU's isa-debug-exit: a guest write of v to the port ends the VM, and thinvm exits
    /// with (v << 1) | 1. [port=PORT][,size=1|2|4] (QEMU's defaults: port=0x501,size=2).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    pub debug_exit: Option<String>,
    /// A virtio-vsock device: cid=N,uds=PATH. The host connects to PATH and sends
    /// "CONNECT <port>\n" to reach a guest listener; a guest connection to host port P
    /// reaches the Unix socket PATH_P (Firecracker's scheme).
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<String>,
    /// Run COMMAND in the guest (/bin/sh -c, through its test agent on vsock port 1025): its
    /// output streams to thinvm's, thinvm's standard input to it, and thinvm exits with its
    /// status (125 if the guest ends first). Adds a vsock device if --vsock is not given.
    #[arg(long, value_name = "COMMAND")]
    pub exec: Option<String>,
    /// Stop the VM after SECS seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// A Unix socket taking pause, resume and snapshot requests (thinvm ctl PATH ...).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

impl TestVmArgs {
    fn options(self) -> TestVmOptions {
        TestVmOptions {
            debug_exit: self.debug_exit,
            vsock: self.vsock,
            exec: self.exec,
            timeout: self.timeout,
            api_socket: self.api_socket,
        }
    }
}

/// `thinvm restore` arguments.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory (from `thinvm ctl PATH snapshot DIR`).
    pub dir: PathBuf,
    /// Run each disk on a temporary overlay, deleted when the clone ends.
    #[arg(long)]
    pub ephemeral: bool,
    /// Where the clone's disk overlays go without --ephemeral (default: the snapshot
    /// directory).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Serial console: stdio, file=PATH or none (default stdio; none with --exec).
    #[arg(long)]
    pub serial: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// seccomp filters for thinvm's threads.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: OnOff,
    #[command(flatten)]
    pub testvm: TestVmArgs,
}

impl RestoreArgs {
    /// The options for the library.
    pub fn options(self) -> RestoreOptions {
        RestoreOptions {
            dir: self.dir,
            ephemeral: self.ephemeral,
            overlay_dir: self.overlay_dir,
            serial: self.serial,
            seccomp: self.seccomp.on(),
            testvm: self.testvm.options(),
        }
    }
}

/// `thinvm ctl` arguments.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The VM's --api-socket.
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Stop the vCPUs.
    Pause,
    /// Let them run again.
    Resume,
    /// Whether the VM runs or is paused.
    Status,
    /// Take a snapshot into DIR (new or empty); the VM goes on (on new disk overlays).
    Snapshot { dir: String },
}

impl CtlCommand {
    /// The request for the library.
    pub fn request(self) -> Request {
        match self {
            CtlCommand::Pause => Request::Pause,
            CtlCommand::Resume => Request::Resume,
            CtlCommand::Status => Request::Status,
            CtlCommand::Snapshot { dir } => Request::Snapshot { dir },
        }
    }
}
