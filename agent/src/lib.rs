//! thinvm's test agent: the protocol a host speaks with an agent in the guest over vsock to
//! run a command and get its output and exit status (see `docs/agent-protocol.md`), and the
//! guest side's building blocks.
//!
//! * [`protocol`]: frames and their kinds, shared by thinvm (host) and the agent (guest);
//! * [`vsock`]: `AF_VSOCK` sockets (the guest side listens on them);
//! * [`ports`]: the debug-exit port (how the guest's init reports a workload's status).

pub mod ports;
pub mod protocol;
pub mod vsock;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1025;
