//! Refcount block entries of every width (refcount_order 0..=6: 1 to 64 bits per entry):
//! reading, writing, and finding the nonzero ones a word at a time.

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], index: u64, order: u32) -> u64 {
    let i = index as usize;
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
    let i = index as usize;
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
            block[i] = value as u8;
            (i, 1)
        }
        4 => {
            block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (2 * i, 2)
        }
        5 => {
            block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes());
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
}
