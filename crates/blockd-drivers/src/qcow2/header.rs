//! The qcow2 header and its extensions (QEMU's `docs/interop/qcow2.txt`).
//!
//! Parsing is pure: it works on the bytes of the first cluster and the
//! length of the image file, so it can be tested (and fuzzed) without any
//! I/O. Every table the header points at is checked against the file
//! length before anyone allocates memory for it, so a hostile header can
//! never make blockd allocate more than the file could hold.
//!
//! blockd never rewrites the header as a whole once an image exists: it
//! patches the few fields it changes (feature bits, refcount table
//! location) in place, so unknown header extensions survive untouched.

use blockd_core::BlockError;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest active L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// Size of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;

/// Length of a version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Version 3 header with the compression type field, as QEMU writes it.
pub const V3_HEADER_LEN: usize = 112;

/// Offset of the L1/refcount-table fields patched in place.
pub const OFF_REFTABLE: u64 = 48;
/// Offset of the incompatible feature bits (v3).
pub const OFF_INCOMPAT: u64 = 72;
/// Offset of the autoclear feature bits (v3).
pub const OFF_AUTOCLEAR: u64 = 88;

/// Incompatible feature: refcounts may be inconsistent (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: an external data file holds the guest data.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features QEMU knows.
pub const INCOMPAT_MASK: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear features QEMU knows (bitmaps, raw external data).
pub const AUTOCLEAR_MASK: u64 = 0x3;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The fixed header fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Length of the header (72 for v2).
    pub header_length: u32,
    /// 0: zlib, 1: zstd.
    pub compression_type: u8,
}

/// What the header extensions say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format (`backing-filename-format`).
    pub backing_format: Option<String>,
    /// Feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// An external data file name extension is present.
    pub data_file: Option<String>,
    /// A crypto header extension is present.
    pub crypto: bool,
}

/// A parsed and checked image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// The fixed fields.
    pub header: Header,
    /// The backing file name, as recorded.
    pub backing_file: Option<String>,
    /// The extensions.
    pub ext: Extensions,
}

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::invalid(msg)
}

fn unsupported(msg: impl Into<String>) -> BlockError {
    BlockError::unsupported(msg)
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Serialises the fixed fields (72 bytes for v2, `header_length` for v3).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(V3_HEADER_LEN);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length as usize > V3_MIN_HEADER_LEN {
                b.push(self.compression_type);
            }
            b.resize(self.header_length as usize, 0);
        }
        b
    }
}

/// Parses the fixed header fields from the start of the image. Checks
/// only what is needed to know how much of the file to read next.
pub fn parse_fixed(buf: &[u8], file_len: u64) -> Result<Header, BlockError> {
    if buf.len() < 8 || be32(buf, 0) != MAGIC {
        return Err(invalid("Image is not in qcow2 format"));
    }
    let version = be32(buf, 4);
    if !(2..=3).contains(&version) {
        return Err(unsupported(format!("Unsupported qcow2 version {version}")));
    }
    if buf.len() < V2_HEADER_LEN || file_len < V2_HEADER_LEN as u64 {
        return Err(invalid(format!(
            "qcow2 header is truncated: the image file is only {file_len} bytes long"
        )));
    }
    let mut h = Header {
        version,
        backing_file_offset: be64(buf, 8),
        backing_file_size: be32(buf, 16),
        cluster_bits: be32(buf, 20),
        size: be64(buf, 24),
        crypt_method: be32(buf, 32),
        l1_size: be32(buf, 36),
        l1_table_offset: be64(buf, 40),
        refcount_table_offset: be64(buf, 48),
        refcount_table_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        snapshots_offset: be64(buf, 64),
        refcount_order: 4,
        header_length: V2_HEADER_LEN as u32,
        ..Header::default()
    };
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
        return Err(invalid(format!(
            "Unsupported cluster size: 2^{}",
            h.cluster_bits
        )));
    }
    if version == 3 {
        if buf.len() < V3_MIN_HEADER_LEN || file_len < V3_MIN_HEADER_LEN as u64 {
            return Err(invalid(format!(
                "qcow2 header is truncated: the image file is only {file_len} bytes long"
            )));
        }
        h.incompatible_features = be64(buf, 72);
        h.compatible_features = be64(buf, 80);
        h.autoclear_features = be64(buf, 88);
        h.refcount_order = be32(buf, 96);
        h.header_length = be32(buf, 100);
        if (h.header_length as usize) < V3_MIN_HEADER_LEN {
            return Err(invalid("qcow2 header too short"));
        }
        if h.header_length as usize > V3_MIN_HEADER_LEN {
            if buf.len() <= V3_MIN_HEADER_LEN {
                return Err(invalid("qcow2 header is truncated"));
            }
            h.compression_type = buf[V3_MIN_HEADER_LEN];
        }
    }
    if u64::from(h.header_length) > h.cluster_size() {
        return Err(invalid("qcow2 header exceeds cluster size"));
    }
    if h.backing_file_offset > h.cluster_size() {
        return Err(invalid("Invalid backing file offset"));
    }
    Ok(h)
}

/// QEMU's `qcow2_validate_table`, plus a check that the table lies within
/// the file (so reading it cannot allocate more than the file holds).
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    file_len: u64,
    name: &str,
) -> Result<(), BlockError> {
    if entries > max_bytes / entry_len {
        return Err(invalid(format!("{name} too large")));
    }
    let bytes = entries * entry_len;
    if (i64::MAX as u64) - bytes < offset || offset % cluster_size != 0 {
        return Err(invalid(format!("{name} offset invalid")));
    }
    if entries > 0 && offset + bytes > file_len {
        return Err(invalid(format!(
            "{name} lies beyond the end of the image file ({} bytes at offset {offset}, file is {file_len} bytes)",
            bytes
        )));
    }
    Ok(())
}

/// Number of L1 entries needed for `size` bytes.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let l2_bits = cluster_bits - 3;
    let shift = cluster_bits + l2_bits;
    size.div_ceil(1 << shift)
}

/// Checks the fixed fields against each other and the file length, and
/// QEMU's open-time rules for features. `first_cluster` is the start of
/// the file (at most one cluster); the extensions are parsed from it.
pub fn parse(first_cluster: &[u8], file_len: u64) -> Result<ImageHeader, BlockError> {
    let h = parse_fixed(first_cluster, file_len)?;
    let cs = h.cluster_size();
    let ext_end = if h.backing_file_offset != 0 {
        h.backing_file_offset
    } else {
        cs
    }
    .min(first_cluster.len() as u64);

    if h.version == 2 || h.header_length as usize <= V3_MIN_HEADER_LEN {
        // (no compression type field: zlib)
    }
    if h.compression_type > 1 {
        return Err(unsupported(format!(
            "qcow2: unknown compression type: {}",
            h.compression_type
        )));
    }
    if h.compression_type == 0 && h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
        return Err(invalid(
            "qcow2: Compression type incompatible feature bit must not be set",
        ));
    }
    if h.compression_type != 0 && h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
        return Err(invalid(
            "qcow2: Compression type incompatible feature bit must be set",
        ));
    }
    let unknown = h.incompatible_features & !INCOMPAT_MASK;
    if unknown != 0 {
        // The feature table may name them; parse leniently for the message.
        let ext = parse_extensions(first_cluster, h.header_length as u64, ext_end).ok();
        return Err(unsupported(unsupported_features_msg(
            ext.as_ref()
                .map(|e| e.feature_names.as_slice())
                .unwrap_or(&[]),
            unknown,
        )));
    }
    if h.refcount_order > 6 {
        return Err(invalid(
            "Reference count entry width too large; may not exceed 64 bits",
        ));
    }
    if h.refcount_table_clusters == 0 {
        return Err(invalid("Image does not contain a reference count table"));
    }
    validate_table(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters),
        cs,
        MAX_REFTABLE_BYTES,
        cs,
        file_len,
        "Reference count table",
    )?;
    validate_table(
        h.snapshots_offset,
        u64::from(h.nb_snapshots),
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        cs,
        file_len,
        "Snapshot table",
    )
    .or_else(|e| {
        // A zero-length snapshot table may have any offset in practice.
        if h.nb_snapshots == 0 {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    validate_table(
        h.l1_table_offset,
        u64::from(h.l1_size),
        8,
        MAX_L1_BYTES,
        cs,
        file_len,
        "Active L1 table",
    )?;
    let needed = l1_entries_for(h.size, h.cluster_bits);
    if needed > i32::MAX as u64 {
        return Err(invalid("Image is too big"));
    }
    if u64::from(h.l1_size) < needed {
        return Err(invalid("L1 table is too small"));
    }
    let ext = parse_extensions(first_cluster, h.header_length as u64, ext_end)?;
    let backing_file = if h.backing_file_offset != 0 {
        let len = u64::from(h.backing_file_size);
        if len > 1023.min(cs - h.backing_file_offset) {
            return Err(invalid("Backing file name too long"));
        }
        let start = h.backing_file_offset as usize;
        let end = start + len as usize;
        if end > first_cluster.len() {
            return Err(invalid(
                "Could not read backing file name: beyond end of file",
            ));
        }
        Some(String::from_utf8_lossy(&first_cluster[start..end]).into_owned())
    } else {
        None
    };
    Ok(ImageHeader {
        header: h,
        backing_file,
        ext,
    })
}

/// QEMU's `report_unsupported_feature` message.
pub fn unsupported_features_msg(table: &[(u8, u8, String)], mut mask: u64) -> String {
    let mut parts = Vec::new();
    for (ty, bit, name) in table {
        if *ty == 0 && *bit < 64 && mask & (1u64 << bit) != 0 {
            parts.push(name.chars().take(46).collect::<String>());
            mask &= !(1u64 << bit);
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
}

/// Parses the header extensions in `buf[start..end]`.
pub fn parse_extensions(buf: &[u8], start: u64, end: u64) -> Result<Extensions, BlockError> {
    let mut ext = Extensions::default();
    let end = end.min(buf.len() as u64);
    let mut off = start;
    while off < end {
        if end - off < 8 {
            return Err(invalid(format!(
                "qcow2_read_extension: ERROR: pread fail from offset {off}"
            )));
        }
        let o = off as usize;
        let ty = be32(buf, o);
        let len = u64::from(be32(buf, o + 4));
        off += 8;
        if len > end - off {
            return Err(invalid("Header extension too large"));
        }
        let data = &buf[off as usize..(off + len) as usize];
        match ty {
            EXT_END => return Ok(ext),
            EXT_BACKING_FORMAT => {
                if len >= 16 {
                    return Err(invalid(format!(
                        "ERROR: ext_backing_format: len={len} too large (>=16)"
                    )));
                }
                let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                ext.backing_format = Some(String::from_utf8_lossy(&data[..end]).into_owned());
            }
            EXT_FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name = &e[2..48];
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    ext.feature_names.push((
                        e[0],
                        e[1],
                        String::from_utf8_lossy(&name[..n]).into_owned(),
                    ));
                }
            }
            EXT_CRYPTO => ext.crypto = true,
            EXT_DATA_FILE => {
                ext.data_file = Some(String::from_utf8_lossy(data).into_owned());
            }
            _ => {}
        }
        off += len.div_ceil(8) * 8;
    }
    Ok(ext)
}

/// QEMU's feature name table, as `qemu-img create` writes it.
pub fn feature_table() -> Vec<(u8, u8, &'static str)> {
    vec![
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
}

/// Builds the first cluster of a new image: the header, the extensions
/// (backing format, feature table) and the backing file name. Like QEMU,
/// the feature table is left out when it does not fit (small clusters).
pub fn build_first_cluster(
    h: &Header,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
) -> Result<Vec<u8>, BlockError> {
    match build(h, backing_file, backing_format, h.version >= 3) {
        Err(_) if h.version >= 3 => build(h, backing_file, backing_format, false),
        r => r,
    }
}

fn build(
    h: &Header,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
    with_table: bool,
) -> Result<Vec<u8>, BlockError> {
    let cs = h.cluster_size() as usize;
    let mut b = h.to_bytes();
    let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(8) * 8, 0);
    };
    if let Some(f) = backing_format {
        if f.len() >= 16 {
            return Err(invalid(format!("Backing format '{f}' is too long")));
        }
        push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
    }
    if with_table {
        let mut t = Vec::new();
        for (ty, bit, name) in feature_table() {
            let mut e = [0u8; 48];
            e[0] = ty;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        push_ext(&mut b, EXT_FEATURE_TABLE, &t);
    }
    push_ext(&mut b, EXT_END, &[]);
    let mut hdr = h.clone();
    if let Some(name) = backing_file {
        if name.len() > 1023 || b.len() + name.len() > cs {
            return Err(invalid("Backing file name too long"));
        }
        hdr.backing_file_offset = b.len() as u64;
        hdr.backing_file_size = name.len() as u32;
        b.extend_from_slice(name.as_bytes());
    }
    let fixed = hdr.to_bytes();
    b[..fixed.len()].copy_from_slice(&fixed);
    if b.len() > cs {
        return Err(invalid("qcow2 header exceeds cluster size"));
    }
    b.resize(cs, 0);
    Ok(b)
}

/// One internal snapshot's active tables (all blockd needs of snapshots:
/// their clusters count in refcounts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotL1 {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Its entries.
    pub l1_size: u32,
}

/// Parses the snapshot table (`buf` holds it from its start, at most
/// `nb` entries). Returns the snapshots' L1 tables and the table's length.
pub fn parse_snapshots(buf: &[u8], nb: u32) -> Result<(Vec<SnapshotL1>, u64), BlockError> {
    let mut off = 0usize;
    let mut out = Vec::with_capacity((nb as usize).min(buf.len() / 40));
    for _ in 0..nb {
        if buf.len() < off + SNAPSHOT_HEADER_SIZE as usize {
            return Err(invalid("Snapshot table is truncated"));
        }
        let l1_table_offset = be64(buf, off);
        let l1_size = be32(buf, off + 8);
        let id_len = u16::from_be_bytes([buf[off + 12], buf[off + 13]]) as usize;
        let name_len = u16::from_be_bytes([buf[off + 14], buf[off + 15]]) as usize;
        let extra = be32(buf, off + 36) as usize;
        off += SNAPSHOT_HEADER_SIZE as usize + extra + id_len + name_len;
        off = off.div_ceil(8) * 8;
        if off > buf.len() {
            return Err(invalid("Snapshot table is truncated"));
        }
        out.push(SnapshotL1 {
            l1_table_offset,
            l1_size,
        });
    }
    Ok((out, off as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 20,
            l1_size: 1,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            ..Header::default()
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let c = build_first_cluster(&h, Some("base.qcow2"), Some("qcow2")).unwrap();
        let p = parse(&c, 4 << 16).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.ext.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.header.size, 1 << 20);
        assert_eq!(p.ext.feature_names.len(), 8);
        let mut v2 = sample();
        v2.version = 2;
        v2.header_length = 72;
        let c = build_first_cluster(&v2, None, None).unwrap();
        let p = parse(&c, 4 << 16).unwrap();
        assert_eq!(p.header.refcount_order, 4);
        assert_eq!(p.backing_file, None);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let h = sample();
        let good = build_first_cluster(&h, None, None).unwrap();
        let err = |c: &[u8], len: u64| parse(c, len).unwrap_err().msg;
        assert_eq!(
            err(&good[..50], 50),
            "qcow2 header is truncated: the image file is only 50 bytes long"
        );
        assert!(err(&good, 2 << 16).contains("Active L1 table lies beyond"));
        let mut c = good.clone();
        c[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            err(&c, 4 << 16),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"
        );
        let mut c = good.clone();
        c[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(err(&c, 4 << 16), "Active L1 table too large");
        let mut c = good.clone();
        c[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes());
        assert_eq!(err(&c, 4 << 16), "Active L1 table offset invalid");
        let mut c = good.clone();
        c[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(err(&c, 4 << 16), "Image is too big");
        let mut c = good.clone();
        c[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert_eq!(err(&c, 4 << 16), "Unsupported cluster size: 2^30");
        let mut c = good;
        c[56..60].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            err(&c, 4 << 16),
            "Image does not contain a reference count table"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024), len in 0u64..1 << 40) {
            let _ = parse(&bytes, len);
            let _ = parse_snapshots(&bytes, 100);
        }

        #[test]
        fn mutated_headers_never_panic_and_tables_fit_the_file(
            muts in proptest::collection::vec((0usize..512, any::<u8>()), 1..16),
            file_len in 0u64..1 << 22,
        ) {
            let mut c = build_first_cluster(&sample(), Some("b"), Some("raw")).unwrap();
            c.truncate(4096);
            for (at, v) in muts { c[at] = v; }
            if let Ok(p) = parse(&c, file_len) {
                let h = p.header;
                prop_assert!(u64::from(h.l1_size) * 8 <= file_len || h.l1_size == 0);
                prop_assert!(u64::from(h.refcount_table_clusters) * h.cluster_size() <= file_len);
            }
        }
    }
}
