//! Making guest ranges read as zeros (write-zeroes, discard, zero detection on writes):
//! whole clusters become ZERO or unallocated entries (v3, or v2 without a backing file) or
//! map to a shared zero cluster (v2 over a backing file), partial clusters are zeroed in
//! place or by copy-on-write (a discard never copies: a piece of a cluster the overlay does
//! not hold by itself is left as it reads), and released host clusters are queued to be freed.

use super::cluster::Mapping;
use super::entry::{owned_data, L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::image::Qcow2Image;
use super::pending::FreeReason;
use super::zero_clusters::ZeroCluster;
use crate::cast::usize_from;
use crate::error::Result;
use crate::zero::{is_zero, DetectZeroes};

impl Qcow2Image {
    /// A write of `len` zero bytes at `offset` that zero detection caught (detection on):
    /// whole clusters become zero clusters (unmapped under `unmap`), partial ones are zeroed.
    pub(crate) fn detected_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size;
        let unmap = self.detect_zeroes == DetectZeroes::Unmap;
        let mut pos = 0u64;
        while pos < len {
            let goff = offset + pos;
            let gc = goff / cs;
            let in_off = goff % cs;
            let n = (cs - in_off).min(len - pos);
            if n == cs {
                self.make_cluster_zero(gc, unmap, FreeReason::ZeroDetect)?;
            } else {
                self.zero_cluster_part(gc, in_off, n, unmap, FreeReason::ZeroDetect)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether the backing file reads as zeros over guest cluster `gc`.
    pub(crate) fn backing_reads_zero(&mut self, gc: u64) -> Result<bool> {
        let cs = self.cluster_size;
        let Some(b) = self.backing.as_mut() else {
            // No backing file, or one that was not opened: only the former reads as zeros.
            return Ok(!self.has_backing());
        };
        let bsize = b.virtual_size();
        let start = gc * cs;
        if start >= bsize {
            return Ok(true);
        }
        let len = cs.min(bsize - start);
        let st = b.block_status(start, len)?;
        if st.zero && st.length >= len {
            return Ok(true);
        }
        let mut buf = vec![0u8; usize_from(len)];
        b.read_at(start, &mut buf)?;
        Ok(is_zero(&buf))
    }

    /// Whether mapping `m` of cluster `gc` already reads as zeros everywhere.
    pub(crate) fn reads_as_zero(&mut self, gc: u64, m: Mapping) -> Result<bool> {
        Ok(match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => !self.has_backing() || self.backing_reads_zero(gc)?,
            Mapping::Data { host, .. } => self.zero_clusters.contains(host),
            Mapping::Compressed(_) => false,
        })
    }

    /// A shared zero cluster to map one more guest cluster to (v2 images with a backing
    /// file), allocating one when none is usable. Returns the L2 entry for `gc`.
    ///
    /// `qemu-img check` calls COPIED on a shared cluster, or a lone reference without it, a
    /// corruption, and no order of the L2 and refcount writes keeps a cluster consistent
    /// across a crash while it goes from one reference to two. So a zero cluster with one
    /// reference (COPIED) is never shared: when a second guest cluster needs zeros, both move
    /// to a fresh zero cluster whose refcount starts at 2 (refcount before L2, as for any
    /// allocation), and the old one is freed once the L2 change is on disk.
    pub(crate) fn zero_cluster_for(&mut self, gc: u64) -> Result<u64> {
        let cs = self.cluster_size;
        for z in self.zero_clusters.to_vec() {
            let rc = self.refcount(z.host / cs)?;
            if rc == 0 {
                self.zero_clusters.remove(z.host);
                continue;
            }
            match z.single_ref {
                Some(prev) => {
                    if rc == 1 && self.l2_entry(prev)? == z.host | OFLAG_COPIED {
                        let fresh = self.new_zero_cluster(2)?;
                        self.set_l2_entry(prev, fresh)?;
                        self.queue_free(z.host / cs, true, FreeReason::Internal);
                        self.zero_clusters.remove(z.host);
                        self.zero_clusters.insert(ZeroCluster {
                            host: fresh,
                            single_ref: None,
                        });
                        return Ok(fresh);
                    }
                    // Not in the state recorded: stop using it as a zero cluster.
                    self.zero_clusters.remove(z.host);
                }
                None if rc >= 2 && rc < self.rc_max => {
                    self.set_refcount(z.host / cs, rc + 1)?;
                    return Ok(z.host);
                }
                None => {}
            }
        }
        let host = self.new_zero_cluster(1)?;
        self.zero_clusters.insert(ZeroCluster {
            host,
            single_ref: Some(gc),
        });
        Ok(owned_data(host))
    }

    /// Allocates an all-zero cluster with refcount `refs`.
    pub(crate) fn new_zero_cluster(&mut self, refs: u64) -> Result<u64> {
        let (c, _) = self.alloc_clusters(1)?;
        let host = c * self.cluster_size;
        self.pwrite(
            &vec![0u8; usize_from(self.cluster_size)],
            host,
            "zero cluster",
        )?;
        if refs != 1 {
            self.set_refcount(c, refs)?;
        }
        Ok(host)
    }

    /// Makes guest cluster `gc` read as zeros, releasing its host cluster.
    pub(crate) fn make_cluster_zero(
        &mut self,
        gc: u64,
        unmap: bool,
        reason: FreeReason,
    ) -> Result<()> {
        let m = self.mapping(gc)?;
        let v3 = self.header.version >= 3;
        let backing = self.has_backing();
        match m {
            Mapping::Zero { host: None, .. } => return Ok(()),
            Mapping::Unallocated if !backing => return Ok(()),
            Mapping::Data { host, .. } if self.zero_clusters.contains(host) => return Ok(()),
            _ => {}
        }
        let new_entry = if !backing {
            0
        } else if v3 {
            OFLAG_ZERO
        } else if self.backing_reads_zero(gc)? {
            0
        } else if let (true, Mapping::Data { host, copied: true }) =
            (self.zero_clusters.is_empty(), m)
        {
            // No shared zero cluster yet: the cluster being zeroed becomes it, in place
            // (it is exclusively ours), so no new cluster is allocated at the file's end.
            self.pwrite(
                &vec![0u8; usize_from(self.cluster_size)],
                host,
                "zero cluster",
            )?;
            self.zero_clusters.insert(ZeroCluster {
                host,
                single_ref: Some(gc),
            });
            return Ok(());
        } else {
            self.zero_cluster_for(gc)?
        };
        if new_entry == 0 && m == Mapping::Unallocated {
            return Ok(());
        }
        self.set_l2_entry(gc, new_entry)?;
        self.release_mapping(m, unmap, reason);
        Ok(())
    }

    /// Zeroes `n` bytes at `in_off` inside guest cluster `gc`; the cluster is released when
    /// it ends up all zero.
    pub(crate) fn zero_cluster_part(
        &mut self,
        gc: u64,
        in_off: u64,
        n: u64,
        unmap: bool,
        reason: FreeReason,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let m = self.mapping(gc)?;
        if self.reads_as_zero(gc, m)? {
            return Ok(());
        }
        if reason == FreeReason::Discard && !self.writable_in_place(m)? {
            // A discard is a hint (virtio-blk, like SCSI UNMAP): a piece of a cluster the
            // overlay does not hold by itself (the backing file's, shared, compressed) is
            // left reading as it did, as QEMU leaves it. Zeroing it would copy the cluster
            // into the overlay: the file would grow on a request meant to shrink it.
            return Ok(());
        }
        let mut cluster = vec![0u8; usize_from(cs)];
        self.read_cluster(gc, m, &mut cluster)?;
        cluster[usize_from(in_off)..usize_from(in_off + n)].fill(0);
        if is_zero(&cluster) {
            return self.make_cluster_zero(gc, unmap, reason);
        }
        if self.writable_in_place(m)? {
            if let Mapping::Data { host, copied } = m {
                if !copied {
                    self.set_l2_entry(gc, owned_data(host))?;
                }
                let zeros = vec![0u8; usize_from(n)];
                return self.pwrite(&zeros, host + in_off, "guest data");
            }
        }
        self.write_sync_inner(gc * cs, &cluster)
    }

    /// Makes `[offset, offset + len)` read as zeros; whole clusters are released.
    pub(crate) fn zero_guest(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        reason: FreeReason,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            if n == cs {
                // Skip whole L2 ranges that have no table and need none.
                let l1_idx = usize_from(gc / self.l2_entries);
                let no_table = self
                    .l1
                    .get(l1_idx)
                    .is_some_and(|&e| e & L1E_OFFSET_MASK == 0);
                if no_table && !self.has_backing() {
                    let next = (gc / self.l2_entries + 1) * self.l2_entries * cs;
                    pos = next.min(end / cs * cs);
                    continue;
                }
                self.make_cluster_zero(gc, unmap, reason)?;
            } else {
                self.zero_cluster_part(gc, in_off, n, unmap, reason)?;
            }
            pos += n;
            if self.pending_free_bytes() >= super::pending::PENDING_FREE_BYTES {
                self.commit_frees()?;
            }
        }
        Ok(())
    }
}
