//! The 16550A UART (vm-superio) on the port I/O bus, with its interrupt delivered through an
//! irqfd and its output going to stdout, a file, or nowhere.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The interrupt line of the UART: an EventFd registered as an irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where guest output goes.
pub enum SerialOutput {
    Stdout,
    File(std::fs::File),
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOutput::Stdout => {
                let mut out = std::io::stdout().lock();
                let n = out.write(buf)?;
                out.flush()?;
                Ok(n)
            }
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOutput::Stdout => std::io::stdout().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A 16550 UART at 8 consecutive ports.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// `irq_evt` is the UART's interrupt (registered by the VMM as an irqfd).
    pub fn new(irq_evt: EventFd, out: SerialOutput) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq_evt), out),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The UART's state (a snapshot).
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state (a restored VM).
    pub fn restored(
        irq_evt: EventFd,
        out: SerialOutput,
        s: &SerialSnapshot,
    ) -> Result<Self, SerialStateError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &state,
            EventFdTrigger(irq_evt),
            vm_superio::serial::NoEvents,
            out,
        )?;
        Ok(SerialDevice { serial })
    }
}

/// Why a saved UART state was refused (vm-superio's: more bytes in its FIFO than it holds).
pub type SerialStateError = vm_superio::serial::Error<std::io::Error>;

/// The 16550 register at `offset`, if there is one (offsets 0 to 7).
fn register(offset: u64) -> Option<u8> {
    u8::try_from(offset).ok().filter(|&r| r <= 7)
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (register(offset), &mut *data) {
            (Some(reg), [byte]) => *byte = self.serial.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(reg), [byte]) = (register(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(reg, *byte) {
            tracing::warn!("serial: write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let f = out.reopen().unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), SerialOutput::File(f));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(out.path()).unwrap(), b"hi\n");
        // Enable the receive interrupt, then feed input.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
