//! `thinvm run` options of disposable test VMs ([`TestVmOptions`], part of
//! [`crate::config::RunOptions`])
//! and their validation: the debug-exit port, the vsock device, a command to run through the
//! guest's agent, a time limit.

use crate::error::{Result, VmmError};
use devices::legacy::debug_exit::{DEFAULT_PORT, DEFAULT_SIZE};

/// Test-VM options of `thinvm run` and `thinvm restore`, as given.
#[derive(Clone, Debug, Default)]
pub struct TestVmOptions {
    /// `--debug-exit [port=PORT][,size=1|2|4]` (`Some("")`: QEMU's defaults).
    pub debug_exit: Option<String>,
    /// `--vsock cid=N,uds=PATH`.
    pub vsock: Option<String>,
    /// `--exec COMMAND`: run it in the guest through its agent.
    pub exec: Option<String>,
    /// `--timeout SECS`.
    pub timeout: Option<u64>,
    /// `--api-socket PATH`.
    pub api_socket: Option<std::path::PathBuf>,
}

/// The vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockOptions {
    pub cid: u64,
    pub uds: std::path::PathBuf,
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
    pub vsock: Option<VsockOptions>,
    pub exec: Option<String>,
    pub timeout: Option<std::time::Duration>,
    pub api_socket: Option<std::path::PathBuf>,
}

/// The guest CID `--exec` uses when no `--vsock` is given.
pub const EXEC_CID: u64 = 3;

/// A Unix socket path of its own for a VM that needs one (`--exec` without `--vsock`).
fn temp_socket_path() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("thinvm-{}-{nanos:x}.vsock", std::process::id()))
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
                    Some(1) => 1,
                    Some(2) => 2,
                    Some(4) => 4,
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

/// Parses `--vsock cid=N,uds=PATH`.
pub fn parse_vsock(s: &str) -> Result<VsockOptions> {
    let (mut cid, mut uds) = (None, None);
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("--vsock: '{item}' is not key=value")))?;
        match k {
            "cid" | "guest_cid" | "guest-cid" => {
                cid = Some(
                    parse_int(v)
                        .filter(|c| (3..u64::from(u32::MAX)).contains(c))
                        .ok_or_else(|| {
                            bad(format!(
                                "--vsock cid={v}: expected 3 to 4294967294 (0-2 are reserved)"
                            ))
                        })?,
                )
            }
            "uds" | "path" | "uds_path" => {
                if v.is_empty() {
                    return Err(bad("--vsock uds=: a path is needed"));
                }
                // Room for "_<port>" in a Unix socket address (108 bytes).
                if v.len() > 90 {
                    return Err(bad(format!(
                        "--vsock uds={v}: too long for a Unix socket path (at most 90 bytes, leaving room for _PORT)"
                    )));
                }
                uds = Some(std::path::PathBuf::from(v))
            }
            other => {
                return Err(bad(format!(
                    "--vsock: unknown option '{other}' (known: cid, uds)"
                )))
            }
        }
    }
    Ok(VsockOptions {
        cid: cid.ok_or_else(|| bad("--vsock: cid= is required"))?,
        uds: uds.ok_or_else(|| bad("--vsock: uds= is required"))?,
    })
}

impl TestVmOptions {
    /// Validates the options.
    pub fn validate(&self) -> Result<TestVmConfig> {
        Ok(TestVmConfig {
            debug_exit: self
                .debug_exit
                .as_deref()
                .map(parse_debug_exit)
                .transpose()?,
            vsock: match (self.vsock.as_deref(), &self.exec) {
                (Some(v), _) => Some(parse_vsock(v)?),
                (None, Some(_)) => Some(VsockOptions {
                    cid: EXEC_CID,
                    uds: temp_socket_path(),
                }),
                (None, None) => None,
            },
            exec: self.exec.clone(),
            timeout: match self.timeout {
                Some(0) => return Err(bad("--timeout 0: at least 1 second")),
                t => t.map(std::time::Duration::from_secs),
            },
            api_socket: self.api_socket.clone(),
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

    #[test]
    fn vsock_options() {
        assert_eq!(
            parse_vsock("cid=3,uds=/tmp/v.sock").unwrap(),
            VsockOptions {
                cid: 3,
                uds: "/tmp/v.sock".into()
            }
        );
        assert!(parse_vsock("cid=2,uds=/x").is_err());
        assert!(parse_vsock("cid=4294967295,uds=/x").is_err());
        assert!(parse_vsock("uds=/x").is_err());
        assert!(parse_vsock("cid=3").is_err());
        assert!(parse_vsock(&format!("cid=3,uds=/{}", "a".repeat(100))).is_err());
        assert!(parse_vsock("cid=3,uds=/x,port=1").is_err());
    }
}
