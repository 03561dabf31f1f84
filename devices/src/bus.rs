//! Address-range dispatch of port I/O and MMIO accesses to devices.

/// A device reached by port I/O or MMIO. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
