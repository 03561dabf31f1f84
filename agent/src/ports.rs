//! The debug-exit port from inside a Linux guest: `ioperm` for the port, then one `out`.

/// Writes `value` (16 bits, QEMU isa-debug-exit's default width) to `port`; with thinvm's
/// `--debug-exit` the VM ends with status `(value << 1) | 1`. Returns only if no device
/// ended the VM (none is there, or the write was refused).
pub fn debug_exit(port: u16, value: u16) -> std::io::Result<()> {
    // SAFETY: ioperm changes this process's I/O permission bitmap for two ports only.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 2, 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an `out` to the port this process was just allowed to use; it touches no memory.
    unsafe {
        std::arch::asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack));
    }
    Ok(())
}
