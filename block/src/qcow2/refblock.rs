//! Refcount block entries of every width (refcount_order 0..=6: 1 to 64 bits per entry):
//! reading, writing, and finding the nonzero ones a word at a time.

use crate::cast::usize_from;

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], index: u64, order: u32) -> u64 {
    let i = usize_from(index);
    match order {
        0 => u64::from((block[i / 8] >> (i % 8)) & 1),
        1 => u64::from((block[i / 4] >> (2 * (i % 4))) & 3),
        2 => u64::from((block[i / 2] >> (4 * (i % 2))) & 0xf),
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Calls `f(word, bits)` for each group of 64 entries (of the first `n` of `block`) that has
/// a nonzero entry, with bit `k` set where entry `64 * word + k` is nonzero. All-zero groups
/// are skipped a word at a time.
pub(crate) fn used_words(block: &[u8], order: u32, n: u64, mut f: impl FnMut(u64, u64)) {
    // Bytes that hold 64 entries.
    let group = 8usize << order;
    for (w, chunk) in block.chunks(group).enumerate() {
        let first = w as u64 * 64;
        if first >= n {
            break;
        }
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let mut bits = 0u64;
        for k in 0..(n - first).min(64) {
            if get_entry(block, first + k, order) != 0 {
                bits |= 1 << k;
            }
        }
        f(w as u64, bits);
    }
}

/// Writes entry `index`; returns the byte range touched `(pos, len)`.
pub fn set_entry(block: &mut [u8], index: u64, order: u32, value: u64) -> (usize, usize) {
    let i = usize_from(index);
    match order {
        0 => {
            let b = &mut block[i / 8];
            *b = (*b & !(1 << (i % 8))) | (((value & 1) as u8) << (i % 8));
            (i / 8, 1)
        }
        1 => {
            let sh = 2 * (i % 4);
            let b = &mut block[i / 4];
            *b = (*b & !(3 << sh)) | (((value & 3) as u8) << sh);
            (i / 4, 1)
        }
        2 => {
            let sh = 4 * (i % 2);
            let b = &mut block[i / 2];
            *b = (*b & !(0xf << sh)) | (((value & 0xf) as u8) << sh);
            (i / 2, 1)
        }
        3 => {
            block[i] = (value & 0xff) as u8;
            (i, 1)
        }
        4 => {
            block[2 * i..2 * i + 2].copy_from_slice(&((value & 0xffff) as u16).to_be_bytes());
            (2 * i, 2)
        }
        5 => {
            block[4 * i..4 * i + 4].copy_from_slice(&((value & 0xffff_ffff) as u32).to_be_bytes());
            (4 * i, 4)
        }
        _ => {
            block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes());
            (8 * i, 8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as u64;
            for i in 0..n {
                set_entry(&mut block, i, order, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, i, order),
                    (i * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
            set_entry(&mut block, 5, order, max);
            assert_eq!(get_entry(&block, 5, order), max);
            assert_eq!(get_entry(&block, 4, order), (4 * 7 + 3) & max);
            assert_eq!(get_entry(&block, 6, order), (6 * 7 + 3) & max);
        }
    }

    #[test]
    fn sub_byte_entries_are_packed_lowest_bits_first_and_masked() {
        let mut block = vec![0u8; 4];
        // 1-bit entries: entry 9 is bit 1 of byte 1.
        assert_eq!(set_entry(&mut block, 9, 0, 1), (1, 1));
        assert_eq!(block, [0, 0b10, 0, 0]);
        // 4-bit entries: entry 3 is the high nibble of byte 1; a wider value is cut to 4 bits
        // without touching its neighbour.
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 2, 2, 0x5);
        assert_eq!(set_entry(&mut block, 3, 2, 0x1f), (1, 1));
        assert_eq!(block, [0, 0xf5, 0, 0]);
        assert_eq!(get_entry(&block, 3, 2), 0xf);
        assert_eq!(get_entry(&block, 2, 2), 0x5);
    }

    #[test]
    fn touched_byte_ranges_and_big_endian_wide_entries() {
        let mut block = vec![0u8; 64];
        assert_eq!(set_entry(&mut block, 3, 4, 0x0102), (6, 2));
        assert_eq!(&block[6..8], &[1, 2]);
        assert_eq!(set_entry(&mut block, 3, 5, 0x0a0b_0c0d), (12, 4));
        assert_eq!(&block[12..16], &[0xa, 0xb, 0xc, 0xd]);
        assert_eq!(set_entry(&mut block, 7, 6, u64::MAX - 1), (56, 8));
        assert_eq!(get_entry(&block, 7, 6), u64::MAX - 1);
        // The last entry of the block, at every width.
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let last = 64 * 8 / (1u64 << order) - 1;
            set_entry(&mut block, last, order, 1);
            assert_eq!(get_entry(&block, last, order), 1, "order {order}");
            assert_eq!(block[..63], [0u8; 63], "order {order}");
        }
    }

    #[test]
    fn used_words_reports_nonzero_entries_and_skips_zero_groups() {
        // 16-bit entries, 256 per 512-byte block: used at 0, 63, 64 and 130.
        let mut block = vec![0u8; 512];
        for i in [0, 63, 64, 130] {
            set_entry(&mut block, i, 4, 7);
        }
        let mut calls = Vec::new();
        used_words(&block, 4, 256, |w, bits| calls.push((w, bits)));
        assert_eq!(calls, vec![(0, 1 | 1 << 63), (1, 1), (2, 1 << 2)]);
        // Only the first `n` entries count: entry 130 is past n = 130.
        let mut calls = Vec::new();
        used_words(&block, 4, 130, |w, bits| calls.push((w, bits)));
        assert_eq!(calls, vec![(0, 1 | 1 << 63), (1, 1), (2, 0)]);
        // An all-zero block reports nothing.
        let mut calls = Vec::new();
        used_words(&[0u8; 512], 4, 256, |w, bits| calls.push((w, bits)));
        assert!(calls.is_empty());
    }
}
