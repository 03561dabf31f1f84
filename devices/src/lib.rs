//! thinvm's emulated devices.
//!
//! * [`legacy`]: the 16550 serial port and the i8042 controller (reset line only).
//! * [`virtio`]: the virtio-mmio transport and the virtio-blk device.
//!
//! Devices are reached through [`bus`]: port I/O and MMIO exits from the vCPUs are routed to
//! the device registered for the address.

#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod bus;
pub mod legacy;
pub mod virtio;
