//! The VMM's error type.

/// Everything that can stop thinvm from starting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Config(String),
    #[error("/dev/kvm: {0}")]
    Kvm(String),
    #[error("kernel {path}: {msg}")]
    Kernel { path: String, msg: String },
    #[error("initrd {path}: {msg}")]
    Initrd { path: String, msg: String },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("vCPU {id}: {msg}")]
    Vcpu { id: u32, msg: String },
    #[error("device setup: {0}")]
    Device(String),
    #[error("disk {path}: {msg}")]
    Disk { path: String, msg: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
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
}

/// Result alias of the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
