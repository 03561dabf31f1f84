//! Compressed clusters: descriptor decoding and decompression (deflate, zstd).

use std::io::Read;

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Location of a compressed cluster's data in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedExtent {
    /// Host byte offset of the first compressed byte (not aligned).
    pub offset: u64,
    /// Upper bound of the compressed data's length in bytes (whole 512-byte sectors).
    pub len: u64,
}

impl CompressedExtent {
    /// Decodes the descriptor bits (0..=61) of a compressed L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sector_mask = (1u64 << (cluster_bits - 8)) - 1;
        let additional = (entry >> x) & sector_mask;
        let len = (additional + 1) * 512 - (offset & 511);
        CompressedExtent { offset, len }
    }

    /// Encodes a descriptor (without the COMPRESSED flag).
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let end = offset + len;
        let sectors = (end - 1) / 512 - offset / 512;
        offset | (sectors << x)
    }

    /// Host clusters (by index) the compressed data touches.
    pub fn clusters(&self, cluster_bits: u32) -> std::ops::RangeInclusive<u64> {
        let first = self.offset >> cluster_bits;
        let last = (self.offset + self.len.max(1) - 1) >> cluster_bits;
        first..=last
    }
}

/// Decompresses `input` into exactly `out.len()` bytes (one cluster).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = |what: String| Error::Corrupt(format!("compressed cluster: {what}"));
    match kind {
        CompressionType::Deflate => {
            let mut dec = flate2::Decompress::new(false);
            match dec.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) => {}
                Err(e) => return Err(bad(format!("deflate error: {e}"))),
            }
            if dec.total_out() != out.len() as u64 {
                return Err(bad(format!(
                    "inflated to {} bytes, expected {}",
                    dec.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| bad(format!("zstd frame header: {e}")))?;
            let mut filled = 0;
            while filled < out.len() {
                match dec.read(&mut out[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Err(bad(format!("zstd error: {e}"))),
                }
            }
            if filled != out.len() {
                return Err(bad(format!(
                    "zstd output {filled} bytes, expected {}",
                    out.len()
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trip() {
        for bits in [9u32, 12, 16, 21] {
            let off = 0x12_3456_7a01u64 & ((1 << (62 - (bits - 8))) - 1);
            let len = 700;
            let e = CompressedExtent::encode(off, len, bits);
            let d = CompressedExtent::decode(e, bits);
            assert_eq!(d.offset, off);
            assert!(d.len >= len && d.len < len + 512, "{bits}: {}", d.len);
        }
    }

    #[test]
    fn descriptor_sizes_are_bounded_whatever_the_bits() {
        // A descriptor names at most 2^(cluster_bits - 8) sectors: two clusters of input,
        // touching at most three host clusters, below 2^62.
        for bits in 9u32..=21 {
            for e in [(1u64 << 62) - 1, 0x3fff_ffff_ffff_fe00, 511] {
                let d = CompressedExtent::decode(e, bits);
                assert!(d.len >= 1 && d.len <= 2 << bits, "{bits}: {d:?}");
                assert!(d.offset < 1 << 62, "{bits}: {d:?}");
                let r = d.clusters(bits);
                assert!(r.end() - r.start() <= 2, "{bits}: {r:?}");
            }
        }
    }

    #[test]
    fn deflate_round_trip_and_garbage() {
        use std::io::Write;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let comp = enc.finish().unwrap();
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Deflate, &comp, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
