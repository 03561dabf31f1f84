//! `thinvm run` options ([`RunOptions`]) and their validation into a [`VmConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use block::{DetectZeroes, ImageFormat};
use devices::virtio::block::WriteErrorPolicy;

use crate::arch::layout::{MAX_MEMORY, MIN_MEMORY, VIRTIO_MMIO_SLOTS};
use crate::error::{Result, VmmError};

/// The kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// Largest number of disks (one IOAPIC pin each, from IRQ 5 to 23).
pub const MAX_DISKS: usize = VIRTIO_MMIO_SLOTS;

/// `thinvm run`'s options as the user gave them (the binary's command line fills them in);
/// [`RunOptions::validate`] checks them into a [`VmConfig`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Guest kernel: a bzImage, or an ELF vmlinux; `None`: the default guest
    /// ([`crate::default_guest::fill_in`]).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`None`: [`DEFAULT_CMDLINE`]).
    pub cmdline: Option<String>,
    /// Guest RAM as `--memory` takes it (K/M/G suffixes).
    pub memory: String,
    pub cpus: u32,
    /// Each `--disk`'s option string.
    pub disks: Vec<String>,
    /// Every disk on a temporary overlay.
    pub ephemeral: bool,
    /// `--serial` (`None`: stdio, or none with `--exec`).
    pub serial: Option<String>,
    /// seccomp filters for thinvm's threads.
    pub seccomp: bool,
    /// ACPI tables for the guest.
    pub acpi: bool,
    /// Seconds between disk statistics.
    pub stats_interval: Option<u64>,
    pub testvm: crate::testvm_config::TestVmOptions,
}

/// `discard=` with QEMU's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discard requests succeed and do nothing; write-zeroes never unmaps.
    Ignore,
    /// Discards release space.
    Unmap,
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub format: Option<ImageFormat>,
    pub detect_zeroes: DetectZeroes,
    pub discard: DiscardMode,
    /// `cache=none`: O_DIRECT on the image and its backing chain.
    pub direct: bool,
    /// `aio=`: the I/O engine (`None`: io_uring where the kernel allows it, else threads).
    pub aio: Option<block::engine::Aio>,
    /// `num-queues=`: virtio-blk request queues (`None`: one per vCPU).
    pub num_queues: Option<u16>,
    /// `werror=`: a write that finds the host file system full waits for space (`enospc`,
    /// QEMU's default) or fails with an I/O error (`report`).
    pub werror: WriteErrorPolicy,
    pub serial: Option<String>,
}

/// Where guest console output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    Stdio,
    File(PathBuf),
    None,
}

/// A validated VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u32,
    pub disks: Vec<DiskConfig>,
    pub ephemeral: bool,
    pub serial: SerialConfig,
    pub seccomp: bool,
    pub stats_interval: Option<Duration>,
    /// Options of disposable test VMs (debug exit, ...).
    pub testvm: crate::testvm_config::TestVmConfig,
    /// Write ACPI tables for the guest.
    pub acpi: bool,
}

fn bad(msg: impl Into<String>) -> VmmError {
    VmmError::Config(msg.into())
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad(format!("--disk {key}={v}: expected on or off"))),
    }
}

/// Parses one `--disk` value.
pub fn parse_disk(s: &str) -> Result<DiskConfig> {
    let mut path = None;
    let mut d = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        format: None,
        detect_zeroes: DetectZeroes::Unmap,
        discard: DiscardMode::Unmap,
        direct: false,
        aio: None,
        num_queues: None,
        werror: WriteErrorPolicy::Enospc,
        serial: None,
    };
    let mut detect_given = false;
    for item in s.split(',') {
        if item.is_empty() {
            continue;
        }
        let (k, v) = match item.split_once('=') {
            Some(kv) => kv,
            // A bare first item is the path, like `--disk disk.qcow2`.
            None if path.is_none() => ("path", item),
            None => return Err(bad(format!("--disk: '{item}' is not key=value"))),
        };
        match k {
            "path" | "file" => path = Some(PathBuf::from(v)),
            "readonly" | "read-only" => d.read_only = on_off(k, v)?,
            "format" => {
                d.format = Some(
                    v.parse()
                        .map_err(|_| bad(format!("--disk format={v}: expected qcow2 or raw")))?,
                )
            }
            "detect-zeroes" | "detect_zeroes" => {
                detect_given = true;
                d.detect_zeroes = v.parse().map_err(|_| {
                    bad(format!("--disk detect-zeroes={v}: expected off, on or unmap"))
                })?
            }
            "discard" => {
                d.discard = match v {
                    "ignore" | "off" => DiscardMode::Ignore,
                    "unmap" | "on" => DiscardMode::Unmap,
                    _ => return Err(bad(format!("--disk discard={v}: expected ignore or unmap"))),
                }
            }
            "cache" => {
                d.direct = match v {
                    "none" | "directsync" => true,
                    "writeback" | "writethrough" | "unsafe" => false,
                    _ => return Err(bad(format!("--disk cache={v}: expected writeback or none"))),
                }
            }
            "aio" => {
                d.aio = Some(v.parse().map_err(|_| {
                    bad(format!("--disk aio={v}: expected io_uring, threads or sync"))
                })?)
            }
            "num-queues" => {
                let max = devices::virtio::block::MAX_QUEUES;
                d.num_queues = match v.parse::<u16>() {
                    Ok(n) if (1..=max).contains(&n) => Some(n),
                    _ => {
                        return Err(bad(format!(
                            "--disk num-queues={v}: expected a number from 1 to {max}"
                        )))
                    }
                }
            }
            "werror" => {
                d.werror = match v {
                    "enospc" => WriteErrorPolicy::Enospc,
                    "report" => WriteErrorPolicy::Report,
                    _ => return Err(bad(format!("--disk werror={v}: expected enospc or report"))),
                }
            }
            "serial" => {
                if v.len() > 20 {
                    return Err(bad(format!(
                        "--disk serial={v}: at most 20 characters (virtio-blk ID)"
                    )));
                }
                d.serial = Some(v.to_string())
            }
            other => {
                return Err(bad(format!(
                    "--disk: unknown option '{other}' (known: path, readonly, format, detect-zeroes, discard, cache, aio, num-queues, werror, serial)"
                )))
            }
        }
    }
    d.path = path.ok_or_else(|| bad(format!("--disk {s}: path= is required")))?;
    if d.read_only && !detect_given {
        d.detect_zeroes = DetectZeroes::Off;
    }
    Ok(d)
}

fn check_readable(path: &Path, what: &'static str) -> Result<()> {
    let input_err = |source| VmmError::InputFile {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::File::open(path)
        .and_then(|f| f.metadata())
        .map_err(input_err)?;
    if !meta.is_file() {
        return Err(VmmError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Parses the serial option.
pub fn parse_serial(s: &str) -> Result<SerialConfig> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        other => match other.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(bad(format!(
                "--serial {other}: expected stdio, file=PATH or none"
            ))),
        },
    }
}

/// Parses the memory size (K/M/G suffixes) and checks its bounds.
pub fn parse_memory(s: &str) -> Result<u64> {
    let v = units::parse_size(s)
        .map_err(|_| bad(format!("--memory {s}: not a size (examples: 256M, 1G)")))?;
    if v < MIN_MEMORY {
        return Err(bad(format!(
            "--memory {s}: too small (at least {} MiB)",
            MIN_MEMORY >> 20
        )));
    }
    if v > MAX_MEMORY {
        return Err(bad(format!(
            "--memory {s}: too large (at most {} GiB)",
            MAX_MEMORY >> 30
        )));
    }
    // Whole pages.
    Ok(v.div_ceil(4096) * 4096)
}

impl RunOptions {
    /// Validates the arguments (without touching KVM).
    pub fn validate(&self) -> Result<VmConfig> {
        let kernel = self
            .kernel
            .clone()
            .ok_or_else(|| bad("--kernel: no kernel (and no default guest)"))?;
        check_readable(&kernel, "kernel")?;
        crate::arch::boot::probe_kernel(&kernel)?;
        if let Some(i) = &self.initrd {
            check_readable(i, "initrd")?;
        }
        let mem_size = parse_memory(&self.memory)?;
        if self.cpus == 0 {
            return Err(bad("--cpus 0: at least one vCPU is needed"));
        }
        if self.cpus > 254 {
            return Err(bad(format!(
                "--cpus {}: too many (at most 254 without ACPI)",
                self.cpus
            )));
        }
        let disks = self
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<Vec<_>>>()?;
        if disks.len() > MAX_DISKS {
            return Err(bad(format!(
                "{} disks given, at most {MAX_DISKS} are supported",
                disks.len()
            )));
        }
        for d in &disks {
            check_readable(&d.path, "disk")?;
        }
        let serial = parse_serial(self.serial.as_deref().unwrap_or(
            if self.testvm.exec.is_some() {
                "none"
            } else {
                "stdio"
            },
        ))?;
        if let Some(0) = self.stats_interval {
            return Err(bad("--stats-interval 0: must be at least 1 second"));
        }
        Ok(VmConfig {
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            mem_size,
            cpus: self.cpus,
            disks,
            ephemeral: self.ephemeral,
            serial,
            seccomp: self.seccomp,
            stats_interval: self.stats_interval.map(Duration::from_secs),
            testvm: self.testvm.validate()?,
            acpi: self.acpi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options() {
        let d = parse_disk(
            "path=a.qcow2,readonly=on,format=raw,detect-zeroes=on,discard=ignore,cache=none,serial=xyz",
        )
        .unwrap();
        assert_eq!(d.path, PathBuf::from("a.qcow2"));
        assert!(d.read_only);
        assert_eq!(d.format, Some(ImageFormat::Raw));
        assert_eq!(d.detect_zeroes, DetectZeroes::On);
        assert_eq!(d.discard, DiscardMode::Ignore);
        assert_eq!(d.serial.as_deref(), Some("xyz"));
        assert!(d.direct);
        let d = parse_disk("b.qcow2").unwrap();
        assert_eq!(d.detect_zeroes, DetectZeroes::Unmap);
        assert_eq!(d.discard, DiscardMode::Unmap);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=a,bogus=1").is_err());
        assert!(parse_disk("path=a,detect-zeroes=maybe").is_err());
        assert!(parse_disk("path=a,cache=sometimes").is_err());
        assert!(!parse_disk("path=a,cache=writeback").unwrap().direct);
        assert!(parse_disk("path=a,serial=123456789012345678901").is_err());
        assert_eq!(
            parse_disk("path=a").unwrap().werror,
            WriteErrorPolicy::Enospc
        );
        assert_eq!(
            parse_disk("path=a,werror=report").unwrap().werror,
            WriteErrorPolicy::Report
        );
        assert!(parse_disk("path=a,werror=stop").is_err());
        assert_eq!(parse_disk("path=a").unwrap().aio, None);
        assert_eq!(
            parse_disk("path=a,aio=sync").unwrap().aio,
            Some(block::engine::Aio::Sync)
        );
        assert_eq!(
            parse_disk("path=a,aio=io_uring").unwrap().aio,
            Some(block::engine::Aio::IoUring)
        );
        assert!(parse_disk("path=a,aio=native").is_err());
        assert_eq!(parse_disk("path=a").unwrap().num_queues, None);
        assert_eq!(
            parse_disk("path=a,num-queues=4").unwrap().num_queues,
            Some(4)
        );
        assert!(parse_disk("path=a,num-queues=0").is_err());
        assert!(parse_disk("path=a,num-queues=17").is_err());
    }

    #[test]
    fn memory_and_serial() {
        assert_eq!(parse_memory("256M").unwrap(), 256 << 20);
        assert!(parse_memory("1M").is_err());
        assert!(parse_memory("abc").is_err());
        assert!(parse_memory("5T").is_err());
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
    }
}
