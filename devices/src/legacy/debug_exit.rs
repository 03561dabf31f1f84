//! A debug-exit port with the semantics of QEMU's `isa-debug-exit`: a guest write of value
//! `v` (1, 2 or 4 bytes, little endian) anywhere in the device's port range ends the VM, and
//! the VMM exits with status `(v << 1) | 1` (so a guest can never make it exit 0, and the
//! status tells a guest's answer from a VMM error). Reads return 0, as in QEMU.
//!
//! QEMU's defaults are `iobase=0x501`, `iosize=2`. The process exit status keeps the low 8
//! bits only, so values 0..=127 map to the odd statuses 1..=255 one to one, and larger values
//! wrap (128 gives 1 again), exactly as with QEMU.

use crate::bus::BusDevice;

/// QEMU's default port (`iobase`).
pub const DEFAULT_PORT: u16 = 0x501;
/// QEMU's default range length (`iosize`).
pub const DEFAULT_SIZE: u16 = 2;

/// What the VMM does with the value the guest wrote (it ends the VM).
pub type ExitSink = Box<dyn FnMut(u64) + Send>;

/// The debug-exit device.
pub struct DebugExit {
    on_exit: ExitSink,
}

impl DebugExit {
    /// `on_exit` receives each value the guest writes.
    pub fn new(on_exit: ExitSink) -> Self {
        DebugExit { on_exit }
    }

    /// The process exit status for a written value: `(v << 1) | 1`, keeping the 8 bits a
    /// process status has.
    pub fn exit_status(value: u64) -> u8 {
        let [low, ..] = ((value << 1) | 1).to_le_bytes();
        low
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Port I/O is 1, 2 or 4 bytes wide; anything else is not an access QEMU accepts.
        if !matches!(data.len(), 1 | 2 | 4) {
            return;
        }
        let value = data
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        (self.on_exit)(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (DebugExit, Arc<Mutex<Vec<u64>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            DebugExit::new(Box::new(move |v| s.lock().unwrap().push(v))),
            seen,
        )
    }

    #[test]
    fn writes_of_each_width_report_the_little_endian_value() {
        let (mut d, seen) = device();
        d.write(0, &[0x2a]);
        d.write(1, &[0x34, 0x12]);
        d.write(0, &[0x78, 0x56, 0x34, 0x12]);
        d.write(0, &[1, 2, 3]);
        d.write(0, &[]);
        assert_eq!(*seen.lock().unwrap(), vec![0x2a, 0x1234, 0x1234_5678]);
        let mut b = [0xffu8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn exit_status_is_qemus() {
        assert_eq!(DebugExit::exit_status(0), 1);
        assert_eq!(DebugExit::exit_status(0x2a), 85);
        assert_eq!(DebugExit::exit_status(127), 255);
        assert_eq!(DebugExit::exit_status(128), 1);
        assert_eq!(DebugExit::exit_status(0xffff_ffff), 255);
    }
}
