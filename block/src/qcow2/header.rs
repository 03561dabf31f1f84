//! The qcow2 header: parsing with validation, serialisation, header extensions and feature
//! bits (QEMU's `docs/interop/qcow2.rst`).

use crate::cast::usize_from;
use crate::error::{Error, Result};
use crate::format::ImageFormat;

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

/// qcow2 format versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Qcow2Version {
    /// Version 2, `compat=0.10`.
    V2,
    /// Version 3, `compat=1.1` (QEMU's default).
    #[default]
    V3,
}

impl Qcow2Version {
    /// QEMU's `compat=` name of the version.
    pub fn compat_name(self) -> &'static str {
        match self {
            Qcow2Version::V2 => "0.10",
            Qcow2Version::V3 => "1.1",
        }
    }

    /// Parses QEMU's `compat=` values (`0.10`, `v2`, `1.1`, `v3`).
    pub fn from_compat(s: &str) -> Result<Self> {
        match s {
            "0.10" | "v2" => Ok(Qcow2Version::V2),
            "1.1" | "v3" => Ok(Qcow2Version::V3),
            other => Err(Error::InvalidArgument(format!(
                "invalid compat level '{other}' (expected 0.10 or 1.1)"
            ))),
        }
    }
}

/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the version 3 header this crate writes (with the compression type field, padded).
pub const V3_HEADER_LEN: u32 = 112;

/// Smallest and largest cluster_bits accepted (QEMU's range: 512 B to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU's cap on the active L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the backing file name length.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest host offset a qcow2 entry can hold.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// QEMU's cap on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's cap on the snapshot table's size (1 KiB per snapshot on average).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// QEMU's cap on a snapshot table entry's extra data.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Size of a snapshot table entry without its extra data, id and name.
pub const SNAPSHOT_ENTRY_FIXED: u64 = 40;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// The bits this crate can open (others are refused).
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | COMPRESSION_TYPE;
}

/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits. This crate maintains none of them (it does not update bitmaps and
/// has no external data file), so all are cleared before the first write.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA: u32 = 0x4441_5441;
}

/// Compression types (header byte 104 when the compression-type bit is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Deflate,
    Zstd,
}

/// A header extension this crate does not interpret, kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownExtension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format from the extension, if present.
    pub backing_format: Option<ImageFormat>,
    /// Feature name table entries (type, bit, name), used to name unknown features.
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions kept verbatim when the header is rewritten.
    pub unknown_extensions: Vec<UnknownExtension>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidImage(msg.into())
}

/// `s` with control characters replaced, for text from an image that reaches messages (and
/// terminals).
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The end of a table of `len` bytes at `offset`, if it lies below [`MAX_HOST_OFFSET`]:
/// `None` when the sum wraps or passes the largest offset an image may use.
pub(crate) fn table_end(offset: u64, len: u64) -> Option<u64> {
    offset
        .checked_add(len)
        .filter(|&end| end <= MAX_HOST_OFFSET)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Number of L1 entries needed for `size` with `cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_entries = 1u64 << (cluster_bits - 3);
        let bytes_per_l1 = l2_entries << cluster_bits;
        size.div_ceil(bytes_per_l1)
    }

    /// Parses and validates a header from the first cluster of the file (or as much of it as
    /// the file has; `buf` must hold at least the header and its extensions).
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(invalid(format!(
                "file too short for a qcow2 header ({} bytes)",
                buf.len()
            )));
        }
        if buf[0..4] != MAGIC {
            return Err(invalid("bad magic (not a qcow2 image)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid("file too short for a version 3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 {
                return Err(invalid(format!(
                    "header_length {} invalid (must be >= 104 and a multiple of 8)",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(invalid(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            if h.refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order {} invalid (must be 0..=6)",
                    h.refcount_order
                )));
            }
        }
        // Extensions are parsed first so that unknown features can be named.
        h.parse_extensions(buf, cluster_size)?;
        h.check_features()?;
        if h.incompatible_features & incompat::COMPRESSION_TYPE != 0 {
            if h.header_length < 105 {
                return Err(invalid(
                    "compression type bit set but header has no compression type field",
                ));
            }
            h.compression_type = match buf[104] {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => {
                    return Err(Error::Unsupported(format!("compression type {other}")));
                }
            };
        }
        if h.crypt_method != 0 {
            return Err(Error::Unsupported(format!(
                "encryption (crypt_method {})",
                h.crypt_method
            )));
        }
        h.validate_tables(cluster_size, file_len)?;
        h.parse_backing_name(buf, cluster_size)?;
        Ok(h)
    }

    fn check_features(&self) -> Result<()> {
        let inc = self.incompatible_features;
        if inc & incompat::EXTERNAL_DATA != 0 {
            return Err(Error::Unsupported("external data file".into()));
        }
        if inc & incompat::EXTENDED_L2 != 0 {
            return Err(Error::Unsupported("extended L2 entries".into()));
        }
        let unknown =
            inc & !(incompat::SUPPORTED | incompat::EXTERNAL_DATA | incompat::EXTENDED_L2);
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| {
                    self.feature_names
                        .iter()
                        .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
                        .map(|(_, _, n)| format!("'{n}' (incompatible bit {bit})"))
                        .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
                })
                .collect();
            return Err(Error::Unsupported(names.join(", ")));
        }
        Ok(())
    }

    fn validate_tables(&self, cluster_size: u64, file_len: u64) -> Result<()> {
        let aligned = |off: u64| off % cluster_size == 0;
        // Virtual size: QEMU refuses sizes whose L1 would exceed its cap; check that first so
        // a huge size cannot make us allocate.
        let needed_l1 = Self::l1_entries_for(self.size, self.cluster_bits);
        if needed_l1 * 8 > MAX_L1_BYTES {
            return Err(invalid(format!(
                "virtual size {} too large for cluster size {} (L1 table would exceed {} MiB)",
                self.size,
                cluster_size,
                MAX_L1_BYTES >> 20
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(format!(
                "l1_size {} too large (active L1 table larger than {} MiB)",
                self.l1_size,
                MAX_L1_BYTES >> 20
            )));
        }
        if u64::from(self.l1_size) < needed_l1 {
            return Err(invalid(format!(
                "L1 table too small: l1_size {} but the virtual size needs {}",
                self.l1_size, needed_l1
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        let Some(l1_end) = table_end(self.l1_table_offset, l1_bytes) else {
            return Err(invalid(format!(
                "L1 table at l1_table_offset {:#x} with {} entries ends beyond the maximum image size (2^56)",
                self.l1_table_offset, self.l1_size
            )));
        };
        if self.l1_size > 0 && (self.l1_table_offset == 0 || !aligned(self.l1_table_offset)) {
            return Err(invalid(format!(
                "L1 table offset {:#x} invalid (zero or not cluster aligned)",
                self.l1_table_offset
            )));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount table too large ({} clusters, more than {} MiB)",
                self.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(invalid("refcount table has no clusters"));
        }
        if self.refcount_table_offset == 0 || !aligned(self.refcount_table_offset) {
            return Err(invalid(format!(
                "refcount table offset {:#x} invalid (zero or not cluster aligned)",
                self.refcount_table_offset
            )));
        }
        let Some(rt_end) = table_end(self.refcount_table_offset, reftable_bytes) else {
            return Err(invalid(format!(
                "refcount table at refcount_table_offset {:#x} with {} clusters ends beyond the maximum image size (2^56)",
                self.refcount_table_offset, self.refcount_table_clusters
            )));
        };
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!(
                "nb_snapshots {} too large: more than {MAX_SNAPSHOTS} snapshots",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            if self.snapshots_offset == 0 || !aligned(self.snapshots_offset) {
                return Err(invalid(format!(
                    "snapshot table offset {:#x} invalid (zero or not cluster aligned)",
                    self.snapshots_offset
                )));
            }
            let min_len = u64::from(self.nb_snapshots) * SNAPSHOT_ENTRY_FIXED;
            if table_end(self.snapshots_offset, min_len).is_none() {
                return Err(invalid(format!(
                    "snapshot table at snapshots_offset {:#x} with {} entries ends beyond the maximum image size (2^56)",
                    self.snapshots_offset, self.nb_snapshots
                )));
            }
            if self.snapshots_offset >= file_len {
                return Err(invalid(format!(
                    "snapshot table at {:#x} lies beyond the end of the file ({file_len} bytes)",
                    self.snapshots_offset
                )));
            }
            if self.snapshots_offset < cluster_size {
                return Err(invalid("snapshot table overlaps the header"));
            }
        }
        // Tables must lie inside the file (a truncated image cannot be trusted).
        if self.refcount_table_offset >= file_len {
            return Err(invalid(format!(
                "refcount table at {:#x} lies beyond the end of the file ({file_len} bytes)",
                self.refcount_table_offset
            )));
        }
        if self.l1_size > 0 && self.l1_table_offset >= file_len {
            return Err(invalid(format!(
                "L1 table at {:#x} lies beyond the end of the file ({file_len} bytes)",
                self.l1_table_offset
            )));
        }
        // The header cluster must not be reused by the tables.
        if self.l1_size > 0 && self.l1_table_offset < cluster_size {
            return Err(invalid("L1 table overlaps the header"));
        }
        if self.refcount_table_offset < cluster_size {
            return Err(invalid("refcount table overlaps the header"));
        }
        let l1 = (self.l1_table_offset, l1_end);
        let rt = (self.refcount_table_offset, rt_end);
        if self.l1_size > 0 && l1.0 < rt.1 && rt.0 < l1.1 {
            return Err(invalid("L1 table overlaps the refcount table"));
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8], cluster_size: u64) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(invalid(format!(
                "backing file name too long ({} bytes, limit {MAX_BACKING_NAME})",
                self.backing_file_size
            )));
        }
        let start = self.backing_file_offset;
        let limit = cluster_size.min(buf.len() as u64);
        let raw = start
            .checked_add(u64::from(self.backing_file_size))
            .filter(|&end| end <= limit)
            .and_then(|end| buf.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?));
        let Some(raw) = raw else {
            return Err(invalid(format!(
                "backing file name (backing_file_offset {start:#x}, backing_file_size {}) lies outside the header cluster",
                self.backing_file_size
            )));
        };
        let name = std::str::from_utf8(raw)
            .map_err(|_| invalid("backing file name is not valid UTF-8"))?;
        if name.is_empty() {
            return Ok(());
        }
        if name.contains('\0') {
            return Err(invalid("backing file name contains a NUL byte"));
        }
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<()> {
        let mut off = self.header_length as usize;
        let limit = if self.backing_file_offset > 0 && self.backing_file_offset < cluster_size {
            usize_from(self.backing_file_offset).min(buf.len())
        } else {
            usize_from(cluster_size).min(buf.len())
        };
        loop {
            if off.saturating_add(8) > limit {
                // No room for an end marker: treat as end (QEMU accepts a header without one
                // only if nothing follows); v2 images written by old tools end here.
                return Ok(());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == ext::END {
                return Ok(());
            }
            let data = off
                .checked_add(len)
                .filter(|&end| end <= limit)
                .and_then(|end| buf.get(off..end));
            let Some(data) = data else {
                return Err(invalid(format!(
                    "header extension {kind:#x} (length {len}) overruns the header cluster"
                )));
            };
            match kind {
                ext::BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| invalid("backing format extension is not UTF-8"))?
                        .trim_end_matches('\0');
                    self.backing_format = Some(match name {
                        "raw" => ImageFormat::Raw,
                        "qcow2" => ImageFormat::Qcow2,
                        other => {
                            return Err(Error::Unsupported(format!(
                                "backing file format '{}'",
                                printable(other)
                            )))
                        }
                    });
                }
                ext::FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..48];
                        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        let name = printable(&String::from_utf8_lossy(&name_bytes[..end]));
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                ext::ENCRYPTION => {
                    return Err(Error::Unsupported(
                        "encryption (LUKS header extension)".into(),
                    ));
                }
                ext::EXTERNAL_DATA => {
                    return Err(Error::Unsupported("external data file".into()));
                }
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            // Past the limit (or wrapped): the next round ends the loop.
            off = off.saturating_add(len.div_ceil(8) * 8);
        }
    }

    /// Serialises the header, its extensions and the backing file name into one buffer that
    /// fits in the first cluster. `backing_file_offset` is recomputed.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(512);
        let put32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_be_bytes());
        b.extend_from_slice(&MAGIC);
        put32(&mut b, self.version);
        put64(&mut b, 0); // backing_file_offset, patched below
        put32(&mut b, 0); // backing_file_size, patched below
        put32(&mut b, self.cluster_bits);
        put64(&mut b, self.size);
        put32(&mut b, self.crypt_method);
        put32(&mut b, self.l1_size);
        put64(&mut b, self.l1_table_offset);
        put64(&mut b, self.refcount_table_offset);
        put32(&mut b, self.refcount_table_clusters);
        put32(&mut b, self.nb_snapshots);
        put64(&mut b, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, self.incompatible_features);
            put64(&mut b, self.compatible_features);
            put64(&mut b, self.autoclear_features);
            put32(&mut b, self.refcount_order);
            let header_length = self.header_length.max(104);
            put32(&mut b, header_length);
            // Bytes 104.. up to header_length: compression type then padding.
            let ct = match self.compression_type {
                CompressionType::Deflate => 0u8,
                CompressionType::Zstd => 1u8,
            };
            b.push(ct);
            b.resize(header_length as usize, 0);
            self.header_length = header_length;
        }
        let ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| -> Result<()> {
            let len = u32::try_from(data.len())
                .map_err(|_| Error::InvalidImage(format!("header extension {kind:#x} too long")))?;
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(data);
            let pad = data.len().div_ceil(8) * 8 - data.len();
            b.extend(std::iter::repeat_n(0u8, pad));
            Ok(())
        };
        if let (Some(fmt), Some(_)) = (self.backing_format, &self.backing_file) {
            ext(&mut b, ext::BACKING_FORMAT, fmt.name().as_bytes())?;
        }
        if self.version >= 3 {
            ext(&mut b, ext::FEATURE_TABLE, &feature_table())?;
        }
        for u in &self.unknown_extensions {
            ext(&mut b, u.kind, &u.data)?;
        }
        ext(&mut b, ext::END, &[])?;
        if let Some(name) = &self.backing_file {
            let too_long = || {
                Error::InvalidArgument(format!(
                    "backing file name too long ({} bytes, limit {MAX_BACKING_NAME})",
                    name.len()
                ))
            };
            let size = u32::try_from(name.len()).map_err(|_| too_long())?;
            if size > MAX_BACKING_NAME {
                return Err(too_long());
            }
            self.backing_file_offset = b.len() as u64;
            self.backing_file_size = size;
            b.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::InvalidArgument(
                "header, extensions and backing name do not fit in the first cluster".into(),
            ));
        }
        Ok(b)
    }
}

/// The feature name table QEMU writes, so `qemu-img info` and other tools can name our bits.
fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut v = Vec::with_capacity(entries.len() * 48);
    for (t, bit, name) in entries {
        v.push(t);
        v.push(bit);
        let mut n = [0u8; 46];
        n[..name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&n);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
            feature_names: vec![],
            unknown_extensions: vec![UnknownExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn round_trip_keeps_fields_and_unknown_extensions() {
        let mut h = sample();
        let bytes = h.serialize().unwrap();
        let mut padded = bytes.clone();
        padded.resize(65536, 0);
        let p = Header::parse(&padded, 1 << 20).unwrap();
        assert_eq!(p.size, h.size);
        assert_eq!(p.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(p.backing_format, Some(ImageFormat::Raw));
        assert_eq!(p.unknown_extensions, h.unknown_extensions);
        assert_eq!(p.feature_names.len(), 7);
    }

    #[test]
    fn refuses_unknown_incompatible_bit_by_name() {
        let mut h = sample();
        h.incompatible_features = 1 << 9;
        let mut bytes = h.serialize().unwrap();
        bytes.resize(65536, 0);
        let err = Header::parse(&bytes, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("bit 9"), "{err}");
    }
}
