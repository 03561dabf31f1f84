//! Loading the kernel (bzImage or ELF vmlinux), the initrd and the command line, and writing
//! the boot information (Linux zero page with its e820 map, or PVH start info).

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use super::layout::*;
use super::regs::EntryMode;
use crate::error::{Result, VmmError};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PVH_MAGIC: u32 = 0x336e_c578;

/// Kernel image formats thinvm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Looks at the first bytes of a kernel file.
pub fn probe_kernel(path: &Path) -> Result<KernelFormat> {
    let file_err = |op| {
        move |source| VmmError::KernelFile {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let mut f = File::open(path).map_err(file_err("open"))?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(file_err("read"))?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(VmmError::KernelFormat {
        path: path.to_path_buf(),
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The guest's memory map.
fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        // The BIOS area, where the ACPI tables are.
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(mem_size) {
        if start == 0 {
            if len > HIMEM_START {
                v.push((HIMEM_START, len - HIMEM_START, E820_RAM));
            }
        } else {
            v.push((start, len, E820_RAM));
        }
    }
    v
}

/// What the kernel loader placed where.
pub struct Loaded {
    pub entry: EntryMode,
    pub format: KernelFormat,
}

/// Loads kernel, initrd and command line and writes the boot information.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<Loaded> {
    let format = probe_kernel(kernel)?;
    let mut f = File::open(kernel).map_err(|source| VmmError::KernelFile {
        path: kernel.to_path_buf(),
        op: "open",
        source,
    })?;
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(|source| VmmError::KernelLoad {
        path: kernel.to_path_buf(),
        source,
    })?;
    let low_end = mem_size.min(MMIO_HOLE_START);
    if result.kernel_end > low_end {
        return Err(VmmError::KernelTooLarge {
            path: kernel.to_path_buf(),
            end: result.kernel_end,
            ram_end: low_end,
        });
    }

    // Command line.
    let cmdline_err = |source| VmmError::Cmdline { source };
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(cmdline_err)?;
    cl.insert_str(cmdline).map_err(cmdline_err)?;
    load_cmdline(mem, GuestAddress(u64::from(CMDLINE_ADDR)), &cl)
        .map_err(|source| VmmError::CmdlineWrite { source })?;
    // With its NUL; at most CMDLINE_MAX, which `insert_str` enforced.
    let cmdline_len = u32::try_from(cmdline.len() + 1)
        .map_err(|_| cmdline_err(linux_loader::cmdline::Error::TooLarge))?;

    // Initrd: as high as possible in low memory, page aligned, above the kernel.
    let initrd_info = match initrd {
        None => None,
        Some(p) => {
            let file_err = |op| {
                move |source| VmmError::InitrdFile {
                    path: p.to_path_buf(),
                    op,
                    source,
                }
            };
            let too_large = |size| VmmError::InitrdTooLarge {
                path: p.to_path_buf(),
                size,
            };
            let mut file = File::open(p).map_err(file_err("open"))?;
            let size = file
                .seek(std::io::SeekFrom::End(0))
                .map_err(file_err("read"))?;
            file.rewind().map_err(file_err("read"))?;
            let mut max = low_end;
            if let Some(h) = result.setup_header {
                if h.initrd_addr_max != 0 {
                    max = max.min(u64::from(h.initrd_addr_max) + 1);
                }
            }
            let addr = max
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|&a| a >= result.kernel_end)
                .ok_or_else(|| too_large(size))?;
            let len = usize::try_from(size).map_err(|_| too_large(size))?;
            let mut slice = mem.get_slice(GuestAddress(addr), len).map_err(|source| {
                VmmError::InitrdMemory {
                    path: p.to_path_buf(),
                    source,
                }
            })?;
            file.read_exact_volatile(&mut slice)
                .map_err(|source| VmmError::InitrdRead {
                    path: p.to_path_buf(),
                    source,
                })?;
            Some((addr, size))
        }
    };

    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => {
            write_pvh(mem, mem_size, initrd_info, rsdp)?;
            EntryMode::Pvh32 { entry: addr.0 }
        }
        _ => {
            let mut params = boot_params::default();
            if let Some(h) = result.setup_header {
                params.hdr = h;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.acpi_rsdp_addr = rsdp.unwrap_or(0);
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR;
            params.hdr.cmdline_size = cmdline_len;
            if params.hdr.kernel_alignment == 0 {
                params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            if let (Some((addr, size)), Some(p)) = (initrd_info, initrd) {
                // The initrd lies below the MMIO hole (placed so above), within 32 bits.
                let too_large = || VmmError::InitrdTooLarge {
                    path: p.to_path_buf(),
                    size,
                };
                params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| too_large())?;
                params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| too_large())?;
            }
            let map = e820_map(mem_size);
            params.e820_entries = u8::try_from(map.len())
                .ok()
                .filter(|&n| usize::from(n) <= params.e820_table.len())
                .ok_or(VmmError::E820Entries { entries: map.len() })?;
            for (entry, &(addr, size, t)) in params.e820_table.iter_mut().zip(&map) {
                *entry = boot_e820_entry {
                    addr,
                    size,
                    r#type: t,
                };
            }
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(|source| VmmError::BootInfo {
                what: "zero page",
                source,
            })?;
            let entry = match format {
                // The 64-bit entry point of a bzImage's protected-mode kernel.
                KernelFormat::BzImage => result.kernel_load.0 + 0x200,
                KernelFormat::Elf => result.kernel_load.0,
            };
            EntryMode::Long64 { entry }
        }
    };
    Ok(Loaded { entry, format })
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, t)| hvm_memmap_table_entry {
            addr,
            size,
            type_: t,
            reserved: 0,
        })
        .collect();
    let memmap_entries =
        u32::try_from(map.len()).map_err(|_| VmmError::E820Entries { entries: map.len() })?;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: u64::from(CMDLINE_ADDR),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|source| {
        VmmError::BootInfo {
            what: "PVH start info",
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_the_hole() {
        let m = e820_map(4 << 30);
        assert!(m.contains(&(HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM)));
        assert!(m.contains(&(1 << 32, (4 << 30) - MMIO_HOLE_START, E820_RAM)));
        assert!(m
            .iter()
            .all(|&(a, s, _)| a + s <= MMIO_HOLE_START || a >= MMIO_HOLE_END));
    }
}
