//! The i8042 keyboard controller, reduced to what a VMM needs: the CPU reset line.
//! Linux with `reboot=k` writes 0xfe (pulse reset) to port 0x64.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Command port offset (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0" = CPU reset.
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 at ports 0x60..=0x64.
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// `reset_evt` is written when the guest asks for a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data port: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "data port write must not reset");
        dev.write(4, &[0xd1]);
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0xffu8];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
    }
}
