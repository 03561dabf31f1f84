//! Zero detection: the fast all-zero check for buffers, and the detect-zeroes mode
//! ([`DetectZeroes`]) that decides what a caught all-zero write becomes.

use crate::error::{Error, Result};

/// Returns true when every byte of `buf` is zero.
///
/// Word-at-a-time: the aligned middle of the buffer is checked as `u64`s, eight at a time
/// OR-ed together, so the compiler can vectorise it; the unaligned ends byte by byte.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64, and align_to only returns properly aligned
    // words that lie inside `buf`.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    if head.iter().any(|&b| b != 0) || tail.iter().any(|&b| b != 0) {
        return false;
    }
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        let acc = chunk.iter().fold(0u64, |a, &w| a | w);
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn detects_zero_and_nonzero_at_every_position() {
        let mut buf = vec![0u8; 1000];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[3..997]));
        for i in 0..buf.len() {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            // every unaligned window that contains the byte
            assert!(!is_zero(&buf[i.saturating_sub(5)..(i + 3).min(1000)]));
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}

/// Zero detection on ordinary writes, with QEMU's names and meanings.
///
/// * `Off`: writes are written as given.
/// * `On`: an all-zero write (per cluster for qcow2) becomes a write-zeroes request that keeps
///   the allocation.
/// * `Unmap`: an all-zero write becomes a write-zeroes request that may release host space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

impl std::str::FromStr for DetectZeroes {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(Error::InvalidArgument(format!(
                "unknown detect-zeroes mode '{other}' (expected off, on or unmap)"
            ))),
        }
    }
}
