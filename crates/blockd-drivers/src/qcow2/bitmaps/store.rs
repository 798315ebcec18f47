//! Loading, storing and removing persistent bitmaps (the I/O of QEMU's
//! `block/qcow2-bitmap.c`), under the driver's metadata lock.
//!
//! Crash safety follows QEMU:
//! * At open on a writable node, the loaded bitmaps are flagged `in_use`
//!   in the directory, rewritten in place (`update_ext_header_and_dir_in_place`):
//!   the autoclear bit is cleared (flushed) first, so a torn directory
//!   write leaves an extension every reader ignores; then the directory,
//!   then the bit is set again. A crash afterwards leaves the bitmaps
//!   marked in use: they load as inconsistent.
//! * A store writes the bits and tables into new clusters, then a new
//!   directory, flushes refcounts and data, then switches the header to
//!   the new directory (one header write and a flush,
//!   `update_ext_header_and_dir`), and only then frees the old directory
//!   and the replaced tables. A crash before the switch leaves the old
//!   state and leaked clusters at worst.
//! * Removing a bitmap is a store of the directory without it.

use std::io;

use blockd_core::error::strerror;
use blockd_core::{BlockError, StoredBitmap};

use super::super::corrupt;
use super::super::header::{self, AUTOCLEAR_MASK, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE};
use super::super::header::{RawExtension, OFF_AUTOCLEAR};
use super::super::meta::{Free, Meta};
use super::*;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn with_errno(msg: String, e: &io::Error) -> BlockError {
    let mut err = BlockError::invalid(format!("{msg}: {}", strerror(e)));
    if e.raw_os_error() == Some(libc::ENOSPC) {
        err.kind = blockd_core::ErrorKind::NoSpace;
    }
    err
}

/// Rewrites the header with the current bitmaps extension
/// ([`Meta::bitmaps`]; none drops it) and the autoclear bits: unknown ones
/// cleared, the bitmaps bit as `bitmaps_bit` (QEMU's `update_header_sync`
/// after changing `s->autoclear_features`). Flushed.
pub async fn update_header(m: &mut Meta, bitmaps_bit: bool) -> io::Result<()> {
    let file_len = m.io.len();
    let first =
        m.io.read(0, m.geo.cs.min(file_len).max(512) as usize)
            .await?;
    let mut img = header::parse(&first, file_len)
        .map_err(|e| corrupt(format!("cannot rewrite the header: {}", e.msg)))?;
    let kept = &mut img.ext.kept;
    let at = kept.iter().position(|e| e.ty == EXT_BITMAPS);
    kept.retain(|e| e.ty != EXT_BITMAPS);
    if let Some(ext) = m.bitmaps {
        let raw = RawExtension {
            ty: EXT_BITMAPS,
            data: ext.to_bytes(),
        };
        // Where it was, or after the extensions QEMU writes before it.
        let pos = at.unwrap_or_else(|| {
            kept.iter()
                .rposition(|e| [EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE].contains(&e.ty))
                .map_or(0, |i| i + 1)
        });
        kept.insert(pos, raw);
    }
    let h = &mut img.header;
    if h.version >= 3 {
        h.autoclear_features &= AUTOCLEAR_MASK & !AUTOCLEAR_BITMAPS;
        if bitmaps_bit {
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
    }
    let cluster = header::build_header_cluster(
        &img.header,
        img.backing_file.as_deref(),
        img.ext.backing_format.as_deref(),
        &img.ext.kept,
    )
    .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    m.io.write(0, cluster).await?;
    m.io.sync().await
}

/// Clears unknown autoclear bits in place (no other header change).
pub async fn clear_unknown_autoclear(m: &mut Meta, autoclear: u64) -> io::Result<()> {
    m.io.write(
        OFF_AUTOCLEAR,
        (autoclear & AUTOCLEAR_MASK).to_be_bytes().to_vec(),
    )
    .await?;
    m.io.sync().await
}

/// Records the directory as now on disk, for queries.
fn publish(m: &Meta, list: &[DirEntry]) {
    *m.bitmap_info.lock().unwrap_or_else(|e| e.into_inner()) = list.to_vec();
}

/// Reads and checks the directory (QEMU's `bitmap_list_load`).
pub async fn load_list(m: &Meta) -> Result<Vec<DirEntry>, BlockError> {
    let Some(ext) = m.bitmaps else {
        return Ok(Vec::new());
    };
    if ext.dir_size == 0 {
        return Err(BlockError::invalid(
            "Requested bitmap directory size is zero",
        ));
    }
    if ext.dir_size > MAX_DIR_SIZE {
        return Err(BlockError::invalid(
            "Requested bitmap directory size is too big",
        ));
    }
    if ext.dir_offset.saturating_add(ext.dir_size) > m.io.len() {
        return Err(BlockError::invalid(
            "Failed to read bitmap directory: Input/output error",
        ));
    }
    let dir =
        m.io.read(ext.dir_offset, ext.dir_size as usize)
            .await
            .map_err(|e| with_errno("Failed to read bitmap directory".into(), &e))?;
    parse_dir(&dir, ext.nb_bitmaps, m.geo.cs, m.geo.size)
}

/// Reads a bitmap table (QEMU's `bitmap_table_load`): `EINVAL` for an
/// entry that breaks the rules.
pub async fn read_table(m: &Meta, e: &DirEntry) -> io::Result<Vec<u64>> {
    let bytes = u64::from(e.table_size) * 8;
    if e.table_offset.saturating_add(bytes) > m.io.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    let raw = m.io.read(e.table_offset, bytes as usize).await?;
    let t: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if t.iter().any(|&x| !check_table_entry(x, m.geo.cs)) {
        return Err(einval());
    }
    Ok(t)
}

/// The bits of a consistent bitmap (QEMU's `load_bitmap_data`).
async fn load_bits(m: &Meta, e: &DirEntry, table: &[u64]) -> io::Result<Vec<u8>> {
    let gb = u32::from(e.granularity_bits);
    let len = m.geo.size;
    let cs = m.geo.cs;
    if table_size_for(len, gb, cs) != table.len() as u64 {
        return Err(einval());
    }
    let n = StoredBitmap::byte_len(len, 1 << gb);
    let mut bits = vec![0u8; n];
    for (i, &entry) in table.iter().enumerate() {
        let start = i * cs as usize;
        if start >= n {
            break;
        }
        let end = (start + cs as usize).min(n);
        let off = entry & TABLE_OFFSET_MASK;
        if off != 0 {
            let data = m.io.read(off, cs as usize).await?;
            bits[start..end].copy_from_slice(&data[..end - start]);
        } else if entry & TABLE_ALL_ONES != 0 {
            bits[start..end].fill(0xff);
        }
    }
    // Bits past the last chunk are not part of the bitmap.
    let chunks = len.div_ceil(1 << gb);
    if chunks % 8 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u8 << (chunks % 8)) - 1;
        }
    }
    Ok(bits)
}

/// Loads the bitmaps at open (QEMU's `qcow2_load_dirty_bitmaps`); on a
/// writable node the consistent ones are then flagged in use on disk.
/// Returns them and whether the header was rewritten.
pub async fn load(m: &mut Meta, writable: bool) -> Result<(Vec<StoredBitmap>, bool), BlockError> {
    if m.bitmaps.is_none() {
        return Ok((Vec::new(), false));
    }
    let mut list = load_list(m).await?;
    publish(m, &list);
    let mut out: Vec<StoredBitmap> = Vec::new();
    let mut needs_update = false;
    for e in &mut list {
        if out.iter().any(|b| b.name == e.name) {
            return Err(BlockError::invalid(format!(
                "Bitmap already exists: {}",
                e.name
            )));
        }
        let granularity = 1u64 << e.granularity_bits;
        let mut b = StoredBitmap::empty(&e.name, granularity, m.geo.size, e.flags & FLAG_AUTO != 0);
        if e.in_use() {
            b.inconsistent = true;
        } else {
            let table = read_table(m, e).await.map_err(|err| {
                with_errno(
                    format!(
                        "Could not read bitmap_table table from image for bitmap '{}'",
                        e.name
                    ),
                    &err,
                )
            })?;
            b.bits = load_bits(m, e, &table).await.map_err(|err| {
                with_errno(
                    format!("Could not read bitmap '{}' from image", e.name),
                    &err,
                )
            })?;
            e.flags |= FLAG_IN_USE;
            needs_update = true;
        }
        out.push(b);
    }
    if needs_update && writable {
        mark_in_use_in_place(m, &list)
            .await
            .map_err(|e| with_errno("Can't update bitmap directory".into(), &e))?;
        return Ok((out, true));
    }
    Ok((out, false))
}

/// Marks every consistent stored bitmap in use, when a read-only node
/// becomes writable (QEMU's `qcow2_reopen_bitmaps_rw`).
pub async fn mark_all_in_use(m: &mut Meta) -> Result<(), BlockError> {
    if m.bitmaps.is_none() {
        return Ok(());
    }
    let mut list = load_list(m).await?;
    if list.iter().all(|e| e.in_use()) {
        return Ok(());
    }
    for e in &mut list {
        e.flags |= FLAG_IN_USE;
    }
    mark_in_use_in_place(m, &list)
        .await
        .map_err(|e| with_errno("Cannot update bitmap directory".into(), &e))
}

/// QEMU's `update_ext_header_and_dir_in_place`: rewrites the directory
/// where it is (same size), with the autoclear bit off meanwhile.
async fn mark_in_use_in_place(m: &mut Meta, list: &[DirEntry]) -> io::Result<()> {
    let ext = m.bitmaps.ok_or_else(einval)?;
    if list.len() as u32 != ext.nb_bitmaps {
        return Err(einval());
    }
    let dir = build_dir(list, m.geo.cs, m.geo.size).ok_or_else(einval)?;
    if dir.len() as u64 != ext.dir_size {
        return Err(einval());
    }
    update_header(m, false).await?;
    m.io.write(ext.dir_offset, dir).await?;
    m.io.sync().await?;
    update_header(m, true).await?;
    publish(m, list);
    Ok(())
}

/// Frees the clusters of a bitmap table and the data it points at
/// (QEMU's `free_bitmap_clusters`). Only after nothing on disk refers to
/// them any more.
async fn free_table(m: &mut Meta, offset: u64, size: u32, table: Option<Vec<u64>>) {
    let cs = m.geo.cs;
    let mut frees = Vec::new();
    let table = match table {
        Some(t) => t,
        None => {
            let e = DirEntry {
                table_offset: offset,
                table_size: size,
                flags: 0,
                granularity_bits: 0,
                name: String::new(),
            };
            match read_table(m, &e).await {
                Ok(t) => t,
                // (Leaked, as in QEMU: its check repairs leaks.)
                Err(_) => return,
            }
        }
    };
    for x in table {
        let off = x & TABLE_OFFSET_MASK;
        if off != 0 {
            frees.push(free(off, 1));
        }
    }
    frees.push(free(offset, (u64::from(size) * 8).div_ceil(cs)));
    if let Err(e) = m.apply_frees(frees).await {
        tracing::warn!("qcow2: could not free the clusters of a bitmap table: {e}");
    }
}

fn free(off: u64, n: u64) -> Free {
    Free {
        off,
        n,
        decref: true,
        discard: false,
    }
}

/// Writes one bitmap's bits and table into new clusters (QEMU's
/// `store_bitmap_data` and `store_bitmap`): returns the table's offset
/// and entries. On failure what it allocated is freed.
async fn write_bitmap(m: &mut Meta, b: &StoredBitmap) -> Result<(u64, Vec<u64>), BlockError> {
    let cs = m.geo.cs;
    let gb = b.granularity.trailing_zeros();
    let tb_size = table_size_for(m.geo.size, gb, cs);
    if tb_size > MAX_TABLE_SIZE || tb_size * cs > MAX_PHYS_SIZE {
        return Err(BlockError::invalid(format!(
            "Bitmap '{}' is too big",
            b.name
        )));
    }
    let mut table = vec![0u64; tb_size as usize];
    let alloc_err = |e: &io::Error| {
        with_errno(
            format!("Failed to allocate clusters for bitmap '{}'", b.name),
            e,
        )
    };
    let write_err =
        |e: &io::Error| with_errno(format!("Failed to write bitmap '{}' to file", b.name), e);
    let mut result = Ok(());
    for (i, chunk) in b.bits.chunks(cs as usize).enumerate() {
        if chunk.iter().all(|&x| x == 0) {
            continue;
        }
        let off = match m.alloc_clusters(1).await {
            Ok(off) => off,
            Err(e) => {
                result = Err(alloc_err(&e));
                break;
            }
        };
        table[i] = off;
        let mut buf = chunk.to_vec();
        buf.resize(cs as usize, 0);
        if let Err(e) = m.io.write(off, buf).await {
            result = Err(write_err(&e));
            break;
        }
    }
    let tb_clusters = (tb_size * 8).div_ceil(cs);
    let mut tb_off = 0;
    if result.is_ok() {
        match m.alloc_clusters(tb_clusters).await {
            Ok(off) => {
                tb_off = off;
                let mut raw = Vec::with_capacity((tb_clusters * cs) as usize);
                for x in &table {
                    raw.extend_from_slice(&x.to_be_bytes());
                }
                raw.resize((tb_clusters * cs) as usize, 0);
                if let Err(e) = m.io.write(off, raw).await {
                    result = Err(write_err(&e));
                }
            }
            Err(e) => result = Err(alloc_err(&e)),
        }
    }
    match result {
        Ok(()) => Ok((tb_off, table)),
        Err(e) => {
            let mut frees: Vec<Free> = table
                .iter()
                .filter(|&&x| x != 0)
                .map(|&x| free(x, 1))
                .collect();
            if tb_off != 0 {
                frees.push(free(tb_off, tb_clusters));
            }
            let _ = m.apply_frees(frees).await;
            Err(e)
        }
    }
}

/// QEMU's `update_ext_header_and_dir`: writes `list` as a new directory
/// and switches the header to it (or drops the extension for an empty
/// list), then frees the old directory.
async fn switch_dir(m: &mut Meta, list: &[DirEntry]) -> io::Result<()> {
    let cs = m.geo.cs;
    let old = m.bitmaps;
    let mut new = None;
    if !list.is_empty() {
        if list.len() as u64 > u64::from(MAX_BITMAPS) {
            return Err(einval());
        }
        let dir = build_dir(list, cs, m.geo.size).ok_or_else(einval)?;
        if dir.len() as u64 > MAX_DIR_SIZE {
            return Err(einval());
        }
        let size = dir.len() as u64;
        let n = size.div_ceil(cs);
        let off = m.alloc_clusters(n).await?;
        let mut raw = dir;
        raw.resize((n * cs) as usize, 0);
        let written = async {
            m.io.write(off, raw).await?;
            // Refcounts, tables and bits reach the disk before the header
            // points at them (QEMU's qcow2_flush_caches).
            m.write_back(true).await
        }
        .await;
        if let Err(e) = written {
            let _ = m.apply_frees(vec![free(off, n)]).await;
            return Err(e);
        }
        new = Some(BitmapsExt {
            nb_bitmaps: list.len() as u32,
            dir_size: size,
            dir_offset: off,
        });
    }
    m.bitmaps = new;
    if let Err(e) = update_header(m, new.is_some()).await {
        m.bitmaps = old;
        if let Some(n) = new {
            let _ = m
                .apply_frees(vec![free(n.dir_offset, n.dir_size.div_ceil(cs))])
                .await;
        }
        return Err(e);
    }
    publish(m, list);
    if let Some(o) = old {
        m.apply_frees(vec![free(o.dir_offset, o.dir_size.div_ceil(cs))])
            .await?;
    }
    Ok(())
}

/// Stores `bitmaps` (QEMU's `qcow2_store_persistent_dirty_bitmaps`; see
/// [`blockd_core::BlockDriver::store_bitmaps`]).
pub async fn store(m: &mut Meta, bitmaps: &[StoredBitmap]) -> Result<(), BlockError> {
    let mut list = load_list(m).await?;
    let mut nb = list.len() as u64;
    let mut dir_size: u64 = m.bitmaps.map_or(0, |e| e.dir_size);
    // Tables replaced (to free after the switch) and bitmaps to write.
    let mut drop_tables = Vec::new();
    let mut to_write: Vec<(usize, &StoredBitmap)> = Vec::new();
    for b in bitmaps.iter().filter(|b| !b.inconsistent) {
        if let Err(msg) = check_constraints(&b.name, b.granularity, m.geo.size, m.geo.cs) {
            return Err(BlockError::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints: {msg}",
                b.name
            )));
        }
        if b.bits.len() != StoredBitmap::byte_len(m.geo.size, b.granularity) {
            return Err(BlockError::invalid(format!(
                "Bitmap '{}' does not cover the image: {} bytes of bits for {} bytes at granularity {}",
                b.name,
                b.bits.len(),
                m.geo.size,
                b.granularity
            )));
        }
        if to_write.iter().any(|(_, o)| o.name == b.name) {
            return Err(BlockError::invalid(format!(
                "Bitmap already exists: {}",
                b.name
            )));
        }
        let i = match list.iter().position(|e| e.name == b.name) {
            None => {
                nb += 1;
                if nb > u64::from(MAX_BITMAPS) {
                    return Err(BlockError::invalid("Too many persistent bitmaps"));
                }
                dir_size += entry_size(b.name.len());
                if dir_size > MAX_DIR_SIZE {
                    return Err(BlockError::invalid("Bitmap directory is too large"));
                }
                list.push(DirEntry {
                    table_offset: 0,
                    table_size: 0,
                    flags: 0,
                    granularity_bits: 0,
                    name: b.name.clone(),
                });
                list.len() - 1
            }
            Some(i) => {
                if !list[i].in_use() {
                    return Err(BlockError::invalid(format!(
                        "Bitmap '{}' already exists in the image",
                        b.name
                    )));
                }
                drop_tables.push((list[i].table_offset, list[i].table_size));
                i
            }
        };
        list[i].flags = if b.enabled { FLAG_AUTO } else { 0 };
        list[i].granularity_bits = b.granularity.trailing_zeros() as u8;
        to_write.push((i, b));
    }
    if to_write.is_empty() {
        return Ok(());
    }
    if m.geo.version < 3 {
        return Err(BlockError::unsupported(
            "Cannot store dirty bitmaps in qcow2 v2 files",
        ));
    }
    let mut written: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut failure = None;
    for (i, b) in &to_write {
        match write_bitmap(m, b).await {
            Ok((off, table)) => {
                list[*i].table_offset = off;
                list[*i].table_size = table.len() as u32;
                written.push((off, table));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        if let Err(e) = switch_dir(m, &list).await {
            failure = Some(with_errno("Failed to update bitmap extension".into(), &e));
        }
    }
    if let Some(e) = failure {
        for (off, table) in written {
            let size = table.len() as u32;
            free_table(m, off, size, Some(table)).await;
        }
        return Err(e);
    }
    for (off, size) in drop_tables {
        free_table(m, off, size, None).await;
    }
    Ok(())
}

/// Removes the stored bitmap `name` (QEMU's
/// `qcow2_co_remove_persistent_dirty_bitmap`); absent is fine.
pub async fn remove(m: &mut Meta, name: &str) -> Result<(), BlockError> {
    if m.bitmaps.is_none() {
        return Ok(());
    }
    let mut list = load_list(m).await?;
    let Some(i) = list.iter().position(|e| e.name == name) else {
        return Ok(());
    };
    let e = list.remove(i);
    switch_dir(m, &list)
        .await
        .map_err(|err| with_errno("Failed to update bitmap extension".into(), &err))?;
    free_table(m, e.table_offset, e.table_size, None).await;
    Ok(())
}

/// Counts the references of the bitmaps' clusters for the consistency
/// check (QEMU's `qcow2_check_bitmaps_refcounts`): `inc(offset, len,
/// what)` for each, `Err` text for each corruption.
pub async fn references(m: &Meta) -> io::Result<(Vec<(u64, u64, &'static str)>, Vec<String>)> {
    let mut refs = Vec::new();
    let mut bad = Vec::new();
    let Some(ext) = m.bitmaps else {
        return Ok((refs, bad));
    };
    if ext.dir_offset.saturating_add(ext.dir_size) <= m.io.len() {
        refs.push((ext.dir_offset, ext.dir_size, "bitmap directory"));
    }
    let list = match load_list(m).await {
        Ok(l) => l,
        Err(e) => {
            bad.push(format!("bitmap directory: {}", e.msg));
            return Ok((refs, bad));
        }
    };
    for e in &list {
        let bytes = u64::from(e.table_size) * 8;
        if e.table_offset.saturating_add(bytes) > m.io.len() {
            bad.push(format!(
                "bitmap table of '{}' beyond the end of the file",
                e.name
            ));
            continue;
        }
        refs.push((e.table_offset, bytes, "bitmap table"));
        let raw = m.io.read(e.table_offset, bytes as usize).await?;
        for c in raw.chunks_exact(8) {
            let x = u64::from_be_bytes(c.try_into().expect("8 bytes"));
            if !check_table_entry(x, m.geo.cs) {
                bad.push(format!("bitmap '{}': invalid table entry {x:#x}", e.name));
                continue;
            }
            let off = x & TABLE_OFFSET_MASK;
            if off != 0 {
                refs.push((off, m.geo.cs, "bitmap data"));
            }
        }
    }
    Ok((refs, bad))
}
