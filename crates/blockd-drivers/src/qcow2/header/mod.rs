//! The qcow2 header and its extensions (QEMU's `docs/interop/qcow2.txt`).
//!
//! Parsing is pure: it works on the bytes of the first cluster and the
//! length of the image file, so it can be tested (and fuzzed) without any
//! I/O. Every table the header points at is checked against the file
//! length before anyone allocates memory for it, so a hostile header can
//! never make blockd allocate more than the file could hold.
//!
//! Writing is pure too: [`build_header_cluster`] lays out a whole first
//! cluster as QEMU's `qcow2_update_header` does (fixed fields, backing
//! format extension, the other extensions, end marker, backing file
//! name) and round-trips with [`parse`]. `blockdev-create` uses it for
//! new images, and changing the backing file (QEMU's
//! `qcow2_change_backing_file`) rewrites the header with it, carrying
//! over every extension and unknown header field as parsed
//! ([`Extensions::kept`], [`Header::unknown_fields`]). Otherwise blockd
//! patches the few fields it changes (feature bits, refcount table
//! location) in place.

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
/// Version 3 header with the compression type field, as QEMU writes it
/// (`sizeof(QCowHeader)`); longer headers have fields QEMU does not know.
pub const V3_HEADER_LEN: usize = 112;
/// Longest backing file name QEMU reads or writes (bytes).
pub const MAX_BACKING_NAME: usize = 1023;
/// Longest backing format name QEMU reads (bytes; it keeps 16 with the NUL).
pub const MAX_BACKING_FORMAT: usize = 15;

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
    /// The header's bytes past the fields QEMU knows (`header_length` over
    /// 112, v3): kept as they are when the header is rewritten, as QEMU
    /// keeps them.
    pub unknown_fields: Vec<u8>,
}

/// One header extension as stored: its type and its data (without the
/// padding to 8 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// The extension type (magic).
    pub ty: u32,
    /// Its data.
    pub data: Vec<u8>,
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
    /// Every extension but the backing format and the end marker, in file
    /// order and as stored (feature table, bitmaps, unknown ones...): what
    /// a header rewrite carries over. The fields above are read from it.
    pub kept: Vec<RawExtension>,
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

    /// Serialises the fixed fields (72 bytes for v2, `header_length` for v3,
    /// ending with the unknown fields).
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
            let len = self.header_length as usize;
            if len > V3_MIN_HEADER_LEN {
                b.push(self.compression_type);
            }
            b.resize(len.min(V3_HEADER_LEN), 0);
            if len > V3_HEADER_LEN {
                b.extend_from_slice(&self.unknown_fields);
            }
            b.resize(len, 0);
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
        // (Bounded by what was read: the length is checked below.)
        let end = (h.header_length as usize).min(buf.len());
        if end > V3_HEADER_LEN {
            h.unknown_fields = buf[V3_HEADER_LEN..end].to_vec();
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
        if len > (MAX_BACKING_NAME as u64).min(cs - h.backing_file_offset) {
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
        if ty != EXT_END && ty != EXT_BACKING_FORMAT {
            ext.kept.push(RawExtension {
                ty,
                data: data.to_vec(),
            });
        }
        match ty {
            EXT_END => return Ok(ext),
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT as u64 {
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

/// The feature name table extension, as QEMU writes it.
pub fn feature_table_extension() -> RawExtension {
    let mut data = Vec::new();
    for (ty, bit, name) in feature_table() {
        let mut e = [0u8; 48];
        e[0] = ty;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    RawExtension {
        ty: EXT_FEATURE_TABLE,
        data,
    }
}

/// Why a header cannot be written; QEMU's errors for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// The backing file name is longer than [`MAX_BACKING_NAME`] (QEMU's
    /// `qcow2_change_backing_file`: `EINVAL`).
    NameTooLong,
    /// The backing format is longer than [`MAX_BACKING_FORMAT`]: QEMU would
    /// truncate it, and no reader accepts it whole (`EINVAL`).
    FormatTooLong,
    /// The header does not fit in the first cluster (QEMU's
    /// `qcow2_update_header`: `ENOSPC`).
    NoSpace,
}

impl Unfit {
    /// The errno QEMU returns.
    pub fn errno(self) -> i32 {
        match self {
            Unfit::NameTooLong | Unfit::FormatTooLong => libc::EINVAL,
            Unfit::NoSpace => libc::ENOSPC,
        }
    }
}

/// Lays out the first cluster as QEMU's `qcow2_update_header` does: the
/// fixed fields of `h` (its backing file offset and size are set here),
/// the backing format extension, the `kept` extensions in order, the end
/// marker, then the backing file name, padded with zeroes to a cluster.
/// [`parse`] reads back `h`, the names and `kept`.
pub fn build_header_cluster(
    h: &Header,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
    kept: &[RawExtension],
) -> Result<Vec<u8>, Unfit> {
    if backing_file.is_some_and(|n| n.len() > MAX_BACKING_NAME) {
        return Err(Unfit::NameTooLong);
    }
    if backing_format.is_some_and(|f| f.len() > MAX_BACKING_FORMAT) {
        return Err(Unfit::FormatTooLong);
    }
    let cs = h.cluster_size() as usize;
    let mut hdr = Header {
        backing_file_offset: 0,
        backing_file_size: 0,
        ..h.clone()
    };
    let mut b = hdr.to_bytes();
    let mut push_ext = |ty: u32, data: &[u8]| {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(8) * 8, 0);
    };
    if let Some(f) = backing_format {
        push_ext(EXT_BACKING_FORMAT, f.as_bytes());
    }
    for e in kept {
        if e.ty != EXT_END && e.ty != EXT_BACKING_FORMAT {
            push_ext(e.ty, &e.data);
        }
    }
    push_ext(EXT_END, &[]);
    if let Some(name) = backing_file {
        hdr.backing_file_offset = b.len() as u64;
        hdr.backing_file_size = name.len() as u32;
        b.extend_from_slice(name.as_bytes());
    }
    if b.len() > cs {
        return Err(Unfit::NoSpace);
    }
    let fixed = hdr.to_bytes();
    b[..fixed.len()].copy_from_slice(&fixed);
    b.resize(cs, 0);
    Ok(b)
}

/// Builds the first cluster of a new image: the header, the backing
/// format, the feature table and the backing file name. QEMU writes the
/// feature table only in v3 images with clusters over 4 KiB (in smaller
/// ones it would leave little room for a backing file name).
pub fn build_first_cluster(
    h: &Header,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
) -> Result<Vec<u8>, BlockError> {
    let mut kept = Vec::new();
    if h.version >= 3 && h.cluster_size() > 4096 {
        kept.push(feature_table_extension());
    }
    build_header_cluster(h, backing_file, backing_format, &kept).map_err(|e| match e {
        Unfit::FormatTooLong => invalid(format!(
            "Backing format '{}' is too long",
            backing_format.unwrap_or_default()
        )),
        Unfit::NameTooLong | Unfit::NoSpace => invalid("Backing file name too long"),
    })
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
mod tests;
