//! `--disk`s as virtio-blk devices on virtio-mmio: opening (or, with `--ephemeral`,
//! overlaying) the images, placing each device in the MMIO hole with its IRQ, ioeventfd and
//! irqfd, announcing it on the kernel command line, and the per-disk statistics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use block::{DetectZeroes, DiskImage, HostUsage, ImageFormat, OpenOptions, ProbePolicy};
use devices::bus::Bus;
use devices::virtio::block::{serial_bytes, Block, BlockConfig, BlockStats, ThreadInit};
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use units::human_size;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use crate::config::{DiscardMode, DiskConfig, VmConfig};
use crate::error::{Result, VmmError};
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vm::Vm;

/// A temporary overlay deleted when dropped (every exit path that runs destructors:
/// normal end, guest reset, SIGINT/SIGTERM/SIGHUP, errors).
pub struct TempOverlay(PathBuf);

impl Drop for TempOverlay {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove ephemeral overlay {}: {e}", self.0.display());
            }
        }
    }
}

struct Disk {
    name: String,
    shown_path: String,
    transport: Arc<Mutex<MmioTransport>>,
    stats: Arc<BlockStats>,
    before: HostUsage,
    _overlay: Option<TempOverlay>,
    /// What a snapshot needs.
    handle: DiskHandle,
}

/// A disk as snapshots see it: its slot, options, the image file the device runs on, and
/// the means to pause the device and work on its image.
#[derive(Clone)]
pub struct DiskHandle {
    pub slot: usize,
    pub config: DiskConfig,
    /// The image the device runs on (the temporary overlay with --ephemeral).
    pub path: PathBuf,
    pub format: ImageFormat,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub jobs: devices::virtio::block::ImageJobs,
}

/// The VM's disks.
#[derive(Default)]
pub struct DiskSet {
    disks: Vec<Disk>,
    /// Guest memory, for the queue-state report (ring indices read live).
    mem: Option<GuestMemoryMmap>,
}

/// The guest's name of disk `index`: vda, vdb, ... (thinvm attaches fewer than 26 disks,
/// `MAX_DISKS`; a larger index is named by its number).
fn guest_disk_name(index: usize) -> String {
    match u8::try_from(index).ok().filter(|&i| i < 26) {
        Some(i) => format!("vd{}", char::from(b'a' + i)),
        None => format!("disk {index}"),
    }
}

/// A stable 20-byte serial derived from the image path (or `serial=`).
fn disk_serial(d: &DiskConfig) -> [u8; 20] {
    if let Some(s) = &d.serial {
        return serial_bytes(s);
    }
    let canon = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
    // FNV-1a of the canonical path: stable across runs, different per image.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    serial_bytes(&format!("thinvm-{h:012x}"))
}

/// Creates a fresh qcow2 overlay over `base` in the temporary directory. The base is opened
/// first (read-only, under the guest's probing rules, see `block::probe`) to learn the format
/// the overlay records.
fn make_overlay(base: &Path, format: Option<ImageFormat>, index: usize) -> Result<TempOverlay> {
    let abs = std::fs::canonicalize(base).map_err(|source| VmmError::DiskPath {
        path: base.to_path_buf(),
        source,
    })?;
    let fmt = block::open(
        &abs,
        &OpenOptions {
            read_only: true,
            format,
            probe: ProbePolicy::Guest,
            ..OpenOptions::default()
        },
    )
    .map_err(|source| VmmError::DiskOpen {
        path: base.to_path_buf(),
        source,
    })?
    .format();
    let name = format!(
        "thinvm-ephemeral-{}-{index}-{}.qcow2",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let path = std::env::temp_dir().join(name);
    let overlay = TempOverlay(path.clone());
    block::qcow2::create(
        &path,
        &block::qcow2::CreateOptions {
            backing_file: Some(abs.display().to_string()),
            backing_format: Some(fmt),
            ..Default::default()
        },
    )
    .map_err(|source| VmmError::DiskOverlay {
        path: base.to_path_buf(),
        source,
    })?;
    Ok(overlay)
}

/// Attaches every `--disk`, appending `virtio_mmio.device=` entries to `cmdline`.
pub fn attach(vm: &Vm, mmio: &mut Bus, cfg: &VmConfig, cmdline: &mut String) -> Result<DiskSet> {
    let mut set = DiskSet {
        mem: Some(vm.memory.clone()),
        ..DiskSet::default()
    };
    let uses_default = cfg.disks.iter().any(|d| d.aio.is_none());
    let (default_aio, why_not_uring) = block::engine::default_aio();
    crate::lifecycle::timing_mark("io-uring-probe");
    // The I/O thread pool serves only aio=threads disks: with io_uring (the default where it
    // works) its 64 threads, each installing its seccomp filter, are not started at all.
    let threads = cfg
        .disks
        .iter()
        .any(|d| d.aio.unwrap_or(default_aio) == block::engine::Aio::Threads);
    if cfg.seccomp && threads {
        start_confined_io_pool()?;
        crate::lifecycle::timing_mark("io-pool");
    }
    if let (true, Some(why)) = (uses_default, why_not_uring) {
        // Said once, at start.
        tracing::warn!("io_uring is not available ({why}): disks use aio=threads");
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        let overlay = if cfg.ephemeral {
            Some(make_overlay(&d.path, d.format, i)?)
        } else {
            None
        };
        let (path, format) = match &overlay {
            Some(o) => (o.0.clone(), Some(ImageFormat::Qcow2)),
            None => (d.path.clone(), d.format),
        };
        // Locked as QEMU locks a VM's disk (block::lock): a writable disk excludes every
        // other user of its file, a read-only disk and every backing file (the base of
        // `--ephemeral` overlays) only writers, so many VMs can share one base.
        let mut image: Box<dyn DiskImage> = block::open(
            &path,
            &OpenOptions {
                read_only: d.read_only,
                format,
                direct: d.direct,
                probe: ProbePolicy::Guest,
                force_share: false,
            },
        )
        .map_err(|source| {
            let path = d.path.clone();
            if d.direct && source.is_direct_io_unsupported() {
                VmmError::DiskDirectIo { path, source }
            } else {
                VmmError::DiskOpen { path, source }
            }
        })?;
        // QEMU's rule: detect-zeroes=unmap needs discard=unmap, else it acts like "on".
        image.set_detect_zeroes(match (d.detect_zeroes, d.discard) {
            (DetectZeroes::Unmap, DiscardMode::Ignore) => DetectZeroes::On,
            (m, _) => m,
        });
        crate::lifecycle::timing_mark("disk-open");
        let before = image.host_usage().unwrap_or_default();
        let image_format = image.format();
        let thread_init: Option<ThreadInit> = if cfg.seccomp {
            let prog = seccomp::filter(ThreadKind::Block)?;
            Some(Box::new(move || {
                seccomp::apply(ThreadKind::Block, &prog).map_err(block::ThreadStartError::from)
            }))
        } else {
            None
        };
        let name = guest_disk_name(i);
        let block = Block::new(
            image,
            BlockConfig {
                read_only: d.read_only,
                discard_unmap: d.discard == DiscardMode::Unmap,
                serial: disk_serial(d),
                werror: d.werror,
                aio: Some(d.aio.unwrap_or(default_aio)),
                // One queue per vCPU by default, so each vCPU submits to its own.
                num_queues: d.num_queues.unwrap_or_else(|| {
                    u16::try_from(cfg.cpus)
                        .unwrap_or(u16::MAX)
                        .clamp(1, devices::virtio::block::MAX_QUEUES)
                }),
                name: format!("{name} ({})", path.display()),
                ..BlockConfig::default()
            },
            thread_init,
        )
        .map_err(|source| VmmError::DiskDevice {
            path: d.path.clone(),
            source,
        })?;
        let stats = block.stats();
        let jobs = block.image_jobs();
        let (base, gsi) = virtio_mmio_slot(i).ok_or(VmmError::NoVirtioSlot { index: i })?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
        vm.register_irqfd(&irq, gsi)?;
        let transport =
            MmioTransport::new(Box::new(block), vm.memory.clone(), irq).map_err(|source| {
                VmmError::Transport {
                    what: format!("disk {}", d.path.display()),
                    source,
                }
            })?;
        for (q, evt) in transport.notify_eventfds() {
            vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, q)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)
            .map_err(VmmError::bus("virtio-blk virtio-mmio"))?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        set.disks.push(Disk {
            name,
            shown_path: match &overlay {
                Some(o) => format!("{} (ephemeral overlay {})", d.path.display(), o.0.display()),
                None => d.path.display().to_string(),
            },
            handle: DiskHandle {
                slot: i,
                config: d.clone(),
                path: path.clone(),
                format: image_format,
                transport: transport.clone(),
                jobs,
            },
            transport,
            stats,
            before,
            _overlay: overlay,
        });
    }
    Ok(set)
}

/// One statistics line per disk, and a queue-state line for each active queue.
fn report(disks: &[(String, String, Arc<BlockStats>, HostUsage)], mem: Option<&GuestMemoryMmap>) {
    for (name, path, stats, before) in disks {
        if let (Some(q), Some(mem)) = (stats.queue(), mem) {
            let _ = writeln!(
                std::io::stderr(),
                "thinvm: disk {name} queue: {}",
                q.describe(mem)
            );
        }
        let s = stats.snapshot();
        // (Not eprintln!: it panics when stderr cannot be written, e.g. on a full disk.)
        let _ = writeln!(
            std::io::stderr(),
            "thinvm: disk {name} {path}: reads {} ({}, {} merged), writes {} ({}, {} in batches, {} merged), flushes {}, discards {} ({}), write-zeroes {} ({}), errors {}; reclaimed: zero-detect {}, discard {}, write-zeroes {}; allocated {} -> {}, apparent {} -> {}",
            s.reads,
            human_size(s.read_bytes),
            s.merged_reads,
            s.writes,
            human_size(s.write_bytes),
            s.batched_writes,
            s.merged_writes,
            s.flushes,
            s.discards,
            human_size(s.discard_bytes),
            s.write_zeroes,
            human_size(s.write_zeroes_bytes),
            s.errors + s.unsupported + s.dropped,
            human_size(s.reclaim.zero_detect_bytes),
            human_size(s.reclaim.discard_bytes),
            human_size(s.reclaim.write_zeroes_bytes),
            human_size(before.allocated_bytes),
            human_size(s.usage.allocated_bytes),
            human_size(before.apparent_bytes),
            human_size(s.usage.apparent_bytes),
        );
    }
}

impl DiskSet {
    /// The disks, for snapshots.
    pub fn handles(&self) -> Vec<DiskHandle> {
        self.disks.iter().map(|d| d.handle.clone()).collect()
    }

    fn summary(&self) -> Vec<(String, String, Arc<BlockStats>, HostUsage)> {
        self.disks
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.shown_path.clone(),
                    d.stats.clone(),
                    d.before,
                )
            })
            .collect()
    }

    /// Prints the statistics (SIGUSR1, --stats-interval).
    pub fn stats_printer(&self) -> Box<dyn FnMut() + Send> {
        let disks = self.summary();
        let mem = self.mem.clone();
        Box::new(move || report(&disks, mem.as_ref()))
    }

    /// Stops the workers (final flush) and prints the final statistics.
    pub fn shutdown(&mut self) {
        for d in &self.disks {
            let mut t = crate::sync::lock(&d.transport);
            t.shutdown();
            if !t.found_by_driver() {
                // The most common way to boot without a disk, said where the user looks.
                let _ = writeln!(
                    std::io::stderr(),
                    "thinvm: disk {}: the guest never looked for it (a kernel without a virtio-mmio driver, or one that reads neither ACPI nor the virtio_mmio.device= command line: distribution kernels such as Debian's need --acpi on)",
                    d.name
                );
            }
        }
        if !self.disks.is_empty() {
            report(&self.summary(), None);
        }
    }
}

/// Starts the image crate's I/O threads (parallel data reads and writes of a request batch)
/// with the block worker's seccomp filter installed on each: the worker itself may not create
/// threads once confined. Once per process.
fn start_confined_io_pool() -> Result<()> {
    // The pool starts once: its outcome, a failure included, is kept for every later call.
    static STARTED: std::sync::OnceLock<std::result::Result<(), Arc<block::Error>>> =
        std::sync::OnceLock::new();
    if let Some(started) = STARTED.get() {
        return started.clone().map_err(VmmError::ConfinedIoPool);
    }
    let prog = seccomp::filter(ThreadKind::Block)?;
    STARTED
        .get_or_init(|| {
            block::start_pool(Box::new(move || {
                seccomp::apply(ThreadKind::Block, &prog).map_err(block::ThreadStartError::from)
            }))
            .map_err(Arc::new)
        })
        .clone()
        .map_err(VmmError::ConfinedIoPool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_disk_names_follow_linux_order() {
        assert_eq!(guest_disk_name(0), "vda");
        assert_eq!(guest_disk_name(crate::config::MAX_DISKS - 1), "vds");
        assert_eq!(guest_disk_name(25), "vdz");
        assert_eq!(guest_disk_name(256), "disk 256");
    }
}
