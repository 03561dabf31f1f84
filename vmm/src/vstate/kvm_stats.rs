//! A vCPU's KVM binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+), read from another thread
//! without taking the vCPU out of `KVM_RUN`: halt detection uses them to leave a vCPU that is
//! running alone, instead of interrupting every vCPU several times a second to ask.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::KVMIO;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// `struct kvm_stats_header`: six u32.
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name: flags u32, exponent i16, size u16, offset u32,
/// bucket_size u32.
const DESC_SIZE: usize = 16;
/// Bounds on what the kernel describes (x86 has ~60 vCPU statistics with names under 64
/// bytes); a larger block is not read.
const MAX_DESCS: usize = 1024;
const MAX_NAME: usize = 1024;

/// The two statistics halt detection reads, each one u64 in the data block.
pub struct VcpuStats {
    file: File,
    /// `blocking`: 1 while the vCPU waits in KVM for an interrupt (it executed `hlt`).
    blocking_at: u64,
    /// `exits`: the vCPU's exits from the guest, to KVM or further.
    exits_at: u64,
}

/// One reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSample {
    pub blocking: bool,
    pub exits: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_ne_bytes(b.get(at..end)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    Some(u16::from_ne_bytes(b.get(at..end)?.try_into().ok()?))
}

/// The data-block offsets of `names` in a stats file's header and descriptors (`header` is
/// the header's 24 bytes, `descs` the descriptor block it points at), each value one u64.
fn find_stats<const N: usize>(header: &[u8], descs: &[u8], names: [&str; N]) -> Option<[u64; N]> {
    let name_size = u32_at(header, 4)? as usize;
    let num_desc = u32_at(header, 8)? as usize;
    let data_offset = u64::from(u32_at(header, 20)?);
    let stride = DESC_SIZE.checked_add(name_size)?;
    let mut found = [None; N];
    for i in 0..num_desc {
        let d = descs.get(i.checked_mul(stride)?..)?;
        let size = u16_at(d, 6)?;
        let offset = u64::from(u32_at(d, 8)?);
        let name = d.get(DESC_SIZE..stride)?;
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        for (slot, want) in found.iter_mut().zip(names) {
            if size == 1 && name == want.as_bytes() {
                *slot = data_offset.checked_add(offset);
            }
        }
    }
    let mut out = [0u64; N];
    for (o, f) in out.iter_mut().zip(found) {
        *o = f?;
    }
    Some(out)
}

impl VcpuStats {
    /// The statistics of `vcpu`, or `None` where KVM has no stats file descriptor or its vCPU
    /// statistics lack `blocking` or `exits` (older kernels).
    pub fn open(vcpu: &VcpuFd) -> Option<VcpuStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor (or -1);
        // the vCPU fd is valid for the call.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0).ok()?;
        let name_size = u32_at(&header, 4)? as usize;
        let num_desc = u32_at(&header, 8)? as usize;
        let desc_offset = u64::from(u32_at(&header, 16)?);
        if num_desc > MAX_DESCS || name_size > MAX_NAME {
            return None;
        }
        let mut descs = vec![0u8; num_desc * (DESC_SIZE + name_size)];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        let [blocking_at, exits_at] = find_stats(&header, &descs, ["blocking", "exits"])?;
        let stats = VcpuStats {
            file,
            blocking_at,
            exits_at,
        };
        stats.sample()?;
        Some(stats)
    }

    /// The vCPU's statistics now (`None` if the read fails).
    pub fn sample(&self) -> Option<VcpuSample> {
        let read = |at: u64| {
            let mut b = [0u8; 8];
            self.file.read_exact_at(&mut b, at).ok()?;
            Some(u64::from_ne_bytes(b))
        };
        Some(VcpuSample {
            blocking: read(self.blocking_at)? != 0,
            exits: read(self.exits_at)?,
        })
    }
}

/// Which vCPUs halt detection must ask: those that may sit in `hlt` for good. A vCPU that is
/// not waiting in KVM, or that left the guest since the last look, is running and is left
/// alone (a kick costs it an exit to user space and back, each time).
pub struct IdleWatch {
    vcpus: Vec<VcpuStats>,
    last: Vec<Option<VcpuSample>>,
}

impl IdleWatch {
    /// A watch over every vCPU, or `None` when one of them has no usable statistics.
    pub fn new<'a>(vcpus: impl Iterator<Item = &'a VcpuFd>) -> Option<IdleWatch> {
        let vcpus = vcpus.map(VcpuStats::open).collect::<Option<Vec<_>>>()?;
        let last = vec![None; vcpus.len()];
        Some(IdleWatch { vcpus, last })
    }

    /// True when every vCPU waits in KVM and has not left the guest since the previous call
    /// (a vCPU whose statistics cannot be read counts as idle: it is asked, as without a
    /// watch).
    pub fn all_idle(&mut self) -> bool {
        let mut all = true;
        for (stats, last) in self.vcpus.iter().zip(self.last.iter_mut()) {
            let now = stats.sample();
            all &= idle(*last, now);
            *last = now;
        }
        all
    }
}

/// Whether a vCPU sampled `before` and then `now` was idle in between.
fn idle(before: Option<VcpuSample>, now: Option<VcpuSample>) -> bool {
    match (before, now) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(b), Some(n)) => n.blocking && n.exits == b.exits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, size: u16, offset: u32, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&0i16.to_ne_bytes());
        d.extend_from_slice(&size.to_ne_bytes());
        d.extend_from_slice(&offset.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend_from_slice(&n);
        d
    }

    fn header(name_size: u32, num_desc: u32, data_offset: u32) -> Vec<u8> {
        [0, name_size, num_desc, 0, 100, data_offset]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect()
    }

    #[test]
    fn finds_the_named_single_value_statistics() {
        let mut descs = desc("halt_wait_hist", 32, 0, 48);
        descs.extend(desc("exits", 1, 256, 48));
        descs.extend(desc("blocking_x", 1, 8, 48));
        descs.extend(desc("blocking", 1, 264, 48));
        let h = header(48, 4, 4096);
        assert_eq!(
            find_stats(&h, &descs, ["blocking", "exits"]),
            Some([4096 + 264, 4096 + 256])
        );
        // A histogram of the same name is not a value; a missing statistic is no watch.
        let h = header(48, 3, 4096);
        assert_eq!(find_stats(&h, &descs, ["blocking", "exits"]), None);
        let hist = desc("exits", 32, 0, 48);
        assert_eq!(find_stats(&header(48, 1, 0), &hist, ["exits"]), None);
    }

    #[test]
    fn a_header_promising_more_than_the_block_holds_is_refused() {
        let descs = desc("exits", 1, 0, 48);
        assert_eq!(find_stats(&header(48, 2, 0), &descs, ["exits", "x"]), None);
        assert_eq!(find_stats(&header(u32::MAX, 1, 0), &descs, ["exits"]), None);
    }

    #[test]
    fn idle_means_waiting_in_kvm_without_an_exit_since_the_last_look() {
        let s = |blocking, exits| Some(VcpuSample { blocking, exits });
        assert!(!idle(None, s(true, 5)), "the first look only records");
        assert!(idle(s(true, 5), s(true, 5)));
        assert!(!idle(s(true, 5), s(true, 6)), "it woke and halted again");
        assert!(!idle(s(false, 5), s(false, 5)), "running in the guest");
        assert!(idle(s(true, 5), None), "unreadable: asked as before");
    }
}
