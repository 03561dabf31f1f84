//! `thinvm run` options of disposable test VMs (flattened into [`crate::config::RunArgs`])
//! and their validation: the debug-exit port.

use crate::error::{Result, VmmError};
use devices::legacy::debug_exit::{DEFAULT_PORT, DEFAULT_SIZE};

/// Test-VM options of `thinvm run`.
#[derive(Debug, Default, clap::Args)]
pub struct TestVmArgs {
    /// QEMU's isa-debug-exit: a guest write of v to the port ends the VM, and thinvm exits
    /// with (v << 1) | 1. [port=PORT][,size=1|2|4] (QEMU's defaults: port=0x501,size=2).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    pub debug_exit: Option<String>,
}

/// Where the debug-exit device sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugExitConfig {
    pub port: u16,
    pub size: u16,
}

/// Validated test-VM options.
#[derive(Clone, Debug, Default)]
pub struct TestVmConfig {
    pub debug_exit: Option<DebugExitConfig>,
}

fn bad(msg: impl Into<String>) -> VmmError {
    VmmError::Config(msg.into())
}

fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Ports KVM's in-kernel devices (PIC, PIT, speaker, ELCR) answer without an exit: a device
/// there would never see a write.
const IN_KERNEL_PORTS: &[(u16, u16, &str)] = &[
    (0x20, 2, "the in-kernel PIC"),
    (0xa0, 2, "the in-kernel PIC"),
    (0x40, 4, "the in-kernel PIT"),
    (0x61, 1, "the in-kernel PC speaker port"),
    (0x4d0, 2, "the in-kernel ELCR"),
];

/// Parses `--debug-exit [port=PORT][,size=1|2|4]`.
pub fn parse_debug_exit(s: &str) -> Result<DebugExitConfig> {
    let mut c = DebugExitConfig {
        port: DEFAULT_PORT,
        size: DEFAULT_SIZE,
    };
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("--debug-exit: '{item}' is not key=value")))?;
        match k {
            "port" | "iobase" => {
                c.port = parse_int(v)
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| bad(format!("--debug-exit port={v}: not a port (0..=0xffff)")))?
            }
            "size" | "iosize" => {
                c.size = match parse_int(v) {
                    Some(n @ (1 | 2 | 4)) => n as u16,
                    _ => return Err(bad(format!("--debug-exit size={v}: expected 1, 2 or 4"))),
                }
            }
            other => {
                return Err(bad(format!(
                    "--debug-exit: unknown option '{other}' (known: port, size)"
                )))
            }
        }
    }
    if u32::from(c.port) + u32::from(c.size) > 0x1_0000 {
        return Err(bad(format!(
            "--debug-exit port={:#x},size={}: beyond the last port",
            c.port, c.size
        )));
    }
    for &(start, len, what) in IN_KERNEL_PORTS {
        if c.port < start + len && start < c.port + c.size {
            return Err(bad(format!(
                "--debug-exit port={:#x}: taken by {what}",
                c.port
            )));
        }
    }
    Ok(c)
}

impl TestVmArgs {
    /// Validates the options.
    pub fn validate(&self) -> Result<TestVmConfig> {
        Ok(TestVmConfig {
            debug_exit: self
                .debug_exit
                .as_deref()
                .map(parse_debug_exit)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_options() {
        assert_eq!(
            parse_debug_exit("").unwrap(),
            DebugExitConfig {
                port: 0x501,
                size: 2
            }
        );
        assert_eq!(
            parse_debug_exit("port=0x600,size=4").unwrap(),
            DebugExitConfig {
                port: 0x600,
                size: 4
            }
        );
        assert_eq!(parse_debug_exit("iobase=244").unwrap().port, 0xf4);
        assert!(parse_debug_exit("size=3").is_err());
        assert!(parse_debug_exit("port=0x10000").is_err());
        assert!(parse_debug_exit("port=0xffff,size=2").is_err());
        assert!(parse_debug_exit("port=0x40").is_err());
        assert!(parse_debug_exit("port=0x1f,size=2").is_err());
        assert!(parse_debug_exit("port").is_err());
        assert!(parse_debug_exit("color=red").is_err());
    }
}
