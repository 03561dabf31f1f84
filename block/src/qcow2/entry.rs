//! L1, L2 and refcount table entries: their bit layout (host offset, COPIED, COMPRESSED,
//! ZERO, reserved bits), reading and writing them in a table, and decoding an L2 entry
//! into what it says before the image checks where it points.

/// Host offset bits of L1 and L2 entries.
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of refcount table entries.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits 56..=61 of a standard L2 entry / L1 entry: reserved, must be zero.
pub(crate) const RESERVED_HIGH: u64 = 0x3f00_0000_0000_0000;
/// Bits 0..=8 of an L1 entry: reserved, must be zero.
pub(crate) const L1E_RESERVED_LOW: u64 = 0x1ff;
/// The cluster's refcount is exactly 1 (it may be written in place).
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entries: the cluster holds compressed data (bits 0..=61 are its descriptor).
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entries (v3): the cluster reads as zeros.
pub(crate) const OFLAG_ZERO: u64 = 1;

/// Entry `i` of a table of big-endian 64-bit entries (an L1 or L2 table).
pub(crate) fn read_l2(table: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&table[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

/// Sets entry `i` of a table of big-endian 64-bit entries.
pub(crate) fn write_l2(table: &mut [u8], i: usize, v: u64) {
    table[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Whether an L1 entry has reserved bits set that the driver refuses (bits 0..=8 and
/// 56..=61).
pub(crate) fn l1_reserved_bits(entry: u64) -> bool {
    entry & (RESERVED_HIGH | L1E_RESERVED_LOW) != 0
}

/// What an L2 entry says, before the image checks where it points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L2Entry {
    /// Compressed data: the descriptor bits (0..=61, see
    /// [`super::compressed::CompressedExtent::decode`]).
    Compressed { descriptor: u64 },
    /// A standard cluster: `host` 0 when none is allocated; `zero` = reads as zeros.
    Standard { host: u64, copied: bool, zero: bool },
}

/// An L2 entry whose reserved bits 56..=61 are set (it would point beyond 2^56).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReservedBits;

impl L2Entry {
    /// Decodes a raw L2 entry; a standard entry with reserved high bits set is refused.
    pub(crate) fn decode(e: u64) -> Result<Self, ReservedBits> {
        if e & OFLAG_COMPRESSED != 0 {
            return Ok(L2Entry::Compressed {
                descriptor: e & !(OFLAG_COMPRESSED | OFLAG_COPIED),
            });
        }
        if e & RESERVED_HIGH != 0 {
            return Err(ReservedBits);
        }
        Ok(L2Entry::Standard {
            host: e & L2E_OFFSET_MASK,
            copied: e & OFLAG_COPIED != 0,
            zero: e & OFLAG_ZERO != 0,
        })
    }

    /// The raw entry. `host` must be a cluster-aligned offset below 2^56 (bits outside the
    /// offset field are dropped), a descriptor fits in bits 0..=61.
    pub(crate) fn encode(self) -> u64 {
        match self {
            L2Entry::Compressed { descriptor } => {
                OFLAG_COMPRESSED | (descriptor & !(OFLAG_COMPRESSED | OFLAG_COPIED))
            }
            L2Entry::Standard { host, copied, zero } => {
                (host & L2E_OFFSET_MASK)
                    | if copied { OFLAG_COPIED } else { 0 }
                    | if zero { OFLAG_ZERO } else { 0 }
            }
        }
    }
}

/// The L2 entry of a data cluster at `host` that this image alone references (COPIED set).
pub(crate) fn owned_data(host: u64) -> u64 {
    L2Entry::Standard {
        host,
        copied: true,
        zero: false,
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries_round_trip() {
        for host in [0u64, 0x1_0000, 0x00ff_ffff_ffff_0000] {
            for copied in [false, true] {
                for zero in [false, true] {
                    let e = L2Entry::Standard { host, copied, zero };
                    let raw = e.encode();
                    assert_eq!(L2Entry::decode(raw), Ok(e), "{raw:#x}");
                    assert_eq!(raw & L2E_OFFSET_MASK, host);
                    assert_eq!(raw >> 63 == 1, copied);
                    assert_eq!(raw & 1 == 1, zero);
                }
            }
        }
        // The exact layout of one entry, bit by bit.
        let raw = L2Entry::Standard {
            host: 0x5_0000,
            copied: true,
            zero: true,
        }
        .encode();
        assert_eq!(raw, 0x8000_0000_0005_0001);
        assert_eq!(owned_data(0x5_0000), 0x8000_0000_0005_0000);
    }

    #[test]
    fn compressed_entries_round_trip_and_keep_their_descriptor() {
        let descriptor = 0x3fff_ffff_ffff_ffff;
        let raw = L2Entry::Compressed { descriptor }.encode();
        assert_eq!(raw, 0x7fff_ffff_ffff_ffff);
        assert_eq!(L2Entry::decode(raw), Ok(L2Entry::Compressed { descriptor }));
        // COPIED is not part of a descriptor (QEMU never sets it on compressed entries).
        assert_eq!(
            L2Entry::decode(raw | OFLAG_COPIED),
            Ok(L2Entry::Compressed { descriptor })
        );
        // Compressed entries use bits 56..=61 for the sector count: not reserved there.
        assert!(L2Entry::decode(OFLAG_COMPRESSED | RESERVED_HIGH).is_ok());
    }

    #[test]
    fn reserved_high_bits_are_refused() {
        for bit in 56..=61 {
            let raw = 0x1_0000 | (1u64 << bit);
            assert_eq!(L2Entry::decode(raw), Err(ReservedBits), "bit {bit}");
            assert_eq!(L2Entry::decode(raw | OFLAG_COPIED), Err(ReservedBits));
        }
        assert!(L2Entry::decode(0x1_0000 | (1 << 55)).is_ok());
    }

    #[test]
    fn l1_reserved_bits_are_the_low_nine_and_56_to_61() {
        assert!(!l1_reserved_bits(0x1_0000 | OFLAG_COPIED));
        assert!(!l1_reserved_bits(0x00ff_ffff_ffff_fe00));
        for bit in (0..9).chain(56..62) {
            assert!(l1_reserved_bits(0x1_0000 | (1u64 << bit)), "bit {bit}");
        }
    }

    #[test]
    fn table_entries_are_big_endian_at_their_index() {
        let mut table = vec![0u8; 32];
        write_l2(&mut table, 2, 0x0102_0304_0506_0708);
        assert_eq!(&table[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(table[..16], [0u8; 16]);
        assert_eq!(read_l2(&table, 2), 0x0102_0304_0506_0708);
        assert_eq!(read_l2(&table, 3), 0);
    }
}
