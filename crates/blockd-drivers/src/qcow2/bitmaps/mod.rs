//! qcow2's persistent dirty bitmaps: the bitmaps header extension, the
//! bitmap directory, bitmap tables (QEMU's `block/qcow2-bitmap.c` and the
//! "Bitmaps extension" of `docs/interop/qcow2.txt`).
//!
//! This file is the on-disk format, pure (parsing, checking, laying out);
//! [`store`] does the I/O: loading at open (`qcow2_load_dirty_bitmaps`),
//! storing (`qcow2_store_persistent_dirty_bitmaps`), removing
//! (`qcow2_co_remove_persistent_dirty_bitmap`).
//!
//! Layout: the extension (24 bytes) holds the number of bitmaps and the
//! directory's size and offset. The directory is a list of entries (24
//! bytes, then extra data, then the name, padded to 8 bytes), each
//! pointing at a bitmap table: one 64-bit entry per cluster of
//! serialized bits, 0 meaning an all-zero cluster, 1 an all-ones one,
//! otherwise the offset of a cluster holding the bits. Every cluster used
//! (directory, tables, data) has a refcount like any other metadata.
//!
//! The autoclear feature bit 0 says the extension is valid: a program
//! without bitmap support clears it when it writes the image, and readers
//! then ignore (and, when writing, drop) the extension. A bitmap being
//! written to is flagged `in_use` on disk; found so at open, its contents
//! are lost (inconsistent). QEMU treats the `extra_data_compatible` flag
//! (bit 2) as reserved and refuses extra data, and so does blockd.

pub mod store;

#[cfg(test)]
mod tests;

use blockd_core::BlockError;

/// Header extension type of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear feature bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Most bitmaps in an image (QEMU's `QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_DIR_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries in a bitmap table.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of serialized bits.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Granularity bounds (log2).
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// Largest granularity (log2): 2 GiB.
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// Longest bitmap name (bytes).
pub const MAX_NAME_SIZE: usize = 1023;

/// Entry flag: the bitmap is being written to; its data is unusable.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Entry flag: the bitmap records writes (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU does not know (including `extra_data_compatible`).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Reserved bits of a bitmap table entry.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset bits of a bitmap table entry.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// A table entry without offset: the cluster's bits are all ones.
pub const TABLE_ALL_ONES: u64 = 1;

/// Length of the fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub dir_size: u64,
    /// Where it is.
    pub dir_offset: u64,
}

impl BitmapsExt {
    /// The extension's data as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.dir_size.to_be_bytes());
        b.extend_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}

/// What the bitmaps extension of an image at open says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtState {
    /// Valid.
    Valid(BitmapsExt),
    /// Present, but the autoclear bit is clear: the bitmaps are stale and
    /// the extension is dropped when the image is opened read-write.
    Stale,
}

/// Checks the extension as QEMU's `qcow2_read_extensions` does, with its
/// errors. `autoclear` is the header's autoclear bits (0 for v2).
pub fn parse_ext(
    data: &[u8],
    autoclear: u64,
    version: u32,
    cluster_size: u64,
) -> Result<ExtState, BlockError> {
    if data.len() != 24 {
        return Err(BlockError::invalid("bitmaps_ext: Invalid extension length"));
    }
    if autoclear & AUTOCLEAR_BITMAPS == 0 {
        if version < 3 {
            tracing::warn!(
                "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
            );
        } else {
            tracing::warn!(
                "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
            );
        }
        tracing::warn!(
            "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
        );
        return Ok(ExtState::Stale);
    }
    if be32(data, 4) != 0 {
        return Err(BlockError::invalid(
            "bitmaps_ext: Reserved field is not zero",
        ));
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        dir_size: be64(data, 8),
        dir_offset: be64(data, 16),
    };
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(BlockError::invalid(format!(
            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
            ext.nb_bitmaps
        )));
    }
    if ext.nb_bitmaps == 0 {
        return Err(BlockError::invalid(
            "found bitmaps extension with zero bitmaps",
        ));
    }
    if ext.dir_offset % cluster_size != 0 {
        return Err(BlockError::invalid(
            "bitmaps_ext: invalid bitmap directory offset",
        ));
    }
    if ext.dir_size > MAX_DIR_SIZE {
        return Err(BlockError::invalid(format!(
            "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_DIR_SIZE})",
            ext.dir_size
        )));
    }
    Ok(ExtState::Valid(ext))
}

/// One bitmap directory entry (without extra data, which QEMU refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Its entries.
    pub table_size: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// The name.
    pub name: String,
}

impl DirEntry {
    /// Whether the bitmap is marked in use.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
}

/// Bytes a directory entry with a name of `name_len` bytes takes.
pub fn entry_size(name_len: usize) -> u64 {
    (ENTRY_HEADER + name_len).div_ceil(8) as u64 * 8
}

/// Bytes of serialized bits of a bitmap over `len` bytes: whole 64-bit
/// words, as QEMU's `hbitmap_serialization_size`.
pub fn serialized_bytes(len: u64, granularity_bits: u32) -> u64 {
    let chunks = len.div_ceil(1 << granularity_bits);
    chunks.div_ceil(64) * 8
}

/// Entries of the bitmap table of a bitmap over `len` bytes.
pub fn table_size_for(len: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    serialized_bytes(len, granularity_bits).div_ceil(cluster_size)
}

/// QEMU's `check_dir_entry`: whether an entry (of type `ty`, with a
/// name field of `name_size` bytes) fits the constraints for an image of
/// `len` bytes.
pub fn check_entry(e: &DirEntry, ty: u8, name_size: usize, cluster_size: u64, len: u64) -> bool {
    let gb = u32::from(e.granularity_bits);
    let bad = e.table_size == 0
        || e.table_offset == 0
        || e.table_offset % cluster_size != 0
        || u64::from(e.table_size) > MAX_TABLE_SIZE
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gb)
        || e.flags & RESERVED_FLAGS != 0
        || name_size > MAX_NAME_SIZE
        || ty != TYPE_DIRTY_TRACKING;
    if bad {
        return false;
    }
    let phys = u64::from(e.table_size) * cluster_size;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // A consistent bitmap must cover the image (an inconsistent one may
    // be left from before a resize).
    e.in_use() || u128::from(len) <= (u128::from(phys) * 8) << gb
}

/// Parses and checks the directory as QEMU's `bitmap_list_load`, with
/// its errors. `len` is the image's virtual size.
pub fn parse_dir(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    len: u64,
) -> Result<Vec<DirEntry>, BlockError> {
    let broken = || BlockError::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + ENTRY_HEADER > dir.len() {
            return Err(broken());
        }
        if out.len() as u32 >= nb_bitmaps {
            return Err(BlockError::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let e = &dir[pos..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = be32(e, 20) as usize;
        let size = (ENTRY_HEADER + extra + name_size).div_ceil(8) * 8;
        if pos + size > dir.len() {
            return Err(broken());
        }
        if extra != 0 {
            return Err(BlockError::invalid("Bitmap extra data is not supported"));
        }
        let raw = &e[ENTRY_HEADER..ENTRY_HEADER + name_size];
        let name =
            String::from_utf8_lossy(&raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())])
                .into_owned();
        let entry = DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        };
        if !check_entry(&entry, ty, name_size, cluster_size, len) {
            return Err(BlockError::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                String::from_utf8_lossy(raw)
            )));
        }
        out.push(entry);
        pos += size;
    }
    if out.len() as u32 != nb_bitmaps {
        return Err(BlockError::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// Lays out a directory (QEMU's `bitmap_list_store`, which checks every
/// entry again: `None` when one does not fit the constraints).
pub fn build_dir(entries: &[DirEntry], cluster_size: u64, len: u64) -> Option<Vec<u8>> {
    let mut b = Vec::new();
    for e in entries {
        if !check_entry(e, TYPE_DIRTY_TRACKING, e.name.len(), cluster_size, len) {
            return None;
        }
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(e.name.as_bytes());
        b.resize(start + entry_size(e.name.len()) as usize, 0);
    }
    Some(b)
}

/// QEMU's `check_table_entry`.
pub fn check_table_entry(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & TABLE_OFFSET_MASK;
    off == 0 || (entry & TABLE_ALL_ONES == 0 && off % cluster_size == 0)
}

/// QEMU's `check_constraints_on_bitmap`: the message without the
/// caller's prefix.
pub fn check_constraints(
    name: &str,
    granularity: u64,
    len: u64,
    cluster_size: u64,
) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    if !granularity.is_power_of_two() || bits > MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = len.div_ceil(granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * cluster_size {
        return Err(
            "Too much space will be occupied by the bitmap. Use larger granularity".to_string(),
        );
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

/// The `bitmaps` member of qcow2's `format-specific` image information
/// (QEMU's `Qcow2BitmapInfo` list).
pub fn info_list(list: &[DirEntry]) -> serde_json::Value {
    list.iter()
        .map(|e| {
            let mut flags = Vec::new();
            if e.flags & FLAG_IN_USE != 0 {
                flags.push("in-use");
            }
            if e.flags & FLAG_AUTO != 0 {
                flags.push("auto");
            }
            serde_json::json!({
                "flags": flags,
                "name": e.name,
                "granularity": 1u64 << e.granularity_bits,
            })
        })
        .collect()
}

/// QEMU's `qcow2_co_can_store_new_dirty_bitmap` (the in-memory name
/// clash is the caller's): `existing` are the names of the node's
/// persistent bitmaps.
pub fn can_store_new(
    version: u32,
    node_name: &str,
    name: &str,
    granularity: u64,
    existing: &[&str],
    len: u64,
    cluster_size: u64,
) -> Result<(), BlockError> {
    let check = || -> Result<(), String> {
        if version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".to_string());
        }
        check_constraints(name, granularity, len, cluster_size)?;
        let nb = existing.len() as u64 + 1;
        let dir: u64 = existing
            .iter()
            .chain(std::iter::once(&name))
            .map(|n| entry_size(n.len()))
            .sum();
        if nb > u64::from(MAX_BITMAPS) {
            return Err("Maximum number of persistent bitmaps is already reached".to_string());
        }
        if dir > MAX_DIR_SIZE {
            return Err("Not enough space in the bitmap directory".to_string());
        }
        Ok(())
    };
    check().map_err(|m| {
        BlockError::invalid(format!(
            "Can't make bitmap '{name}' persistent in '{node_name}': {m}"
        ))
    })
}
