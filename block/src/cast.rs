//! Integer conversions the crate relies on being lossless, in one place with the proof.
//!
//! Offsets, lengths and table indices are `u64` (file and guest offsets); buffers and slices
//! are indexed by `usize`. thinvm runs only on 64-bit Linux (KVM on x86_64), where `usize`
//! is 64 bits wide, so `u64 -> usize` cannot truncate; the assertion below stops a build
//! for anything else. Values that may not fit a narrower type (an image's `u32` fields, say)
//! use `try_from` with an error where they are converted, not this module.

const _: () = assert!(
    usize::BITS == u64::BITS,
    "the block crate assumes a 64-bit usize (u64 -> usize is lossless)"
);

/// `v` as a `usize`: lossless, `usize` being 64 bits wide (asserted at compile time above).
#[inline]
#[allow(clippy::cast_possible_truncation)] // usize::BITS == 64, asserted above.
pub(crate) const fn usize_from(v: u64) -> usize {
    v as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usize_from_keeps_every_bit() {
        assert_eq!(usize_from(u64::MAX), usize::MAX);
        assert_eq!(usize_from(1 << 40), 1usize << 40);
    }
}
