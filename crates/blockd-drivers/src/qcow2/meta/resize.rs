//! Changing the virtual size (QEMU's `qcow2_co_truncate` without
//! preallocation): growing the L1 table (`qcow2_grow_l1_table`), and for
//! shrinking the full discard of the clusters past the new end
//! (`qcow2_cluster_discard` with `full_discard`) and the release of the L2
//! tables past it (`qcow2_shrink_l1_table`).
//!
//! Crash safety: a new L1 table is written and flushed before the header
//! points at it, and the old one is freed only after that header update is
//! stable; the L2 entries and L1 entries dropped by a shrink are written
//! (through [`Meta::write_back`]) before the refcounts they held drop (the
//! queued frees, applied by the driver's flush).

use std::io;

use super::{Free, FreeKind, Meta, L1E_OFFSET_MASK};
use crate::qcow2::header::{l1_entries_for, MAX_L1_BYTES};

/// Offset of the virtual size in the header.
const OFF_SIZE: u64 = 24;
/// Offset of `l1_size` (followed by `l1_table_offset`) in the header.
const OFF_L1_SIZE: u64 = 36;

impl Meta {
    /// Makes the L1 table have room for `size` bytes and records `size`
    /// in the header. The caller serialises against requests past the
    /// smaller of the two sizes, and flushes afterwards (which applies
    /// the frees a shrink queued).
    pub async fn resize(&mut self, size: u64) -> io::Result<()> {
        let old = self.geo.size;
        let new_l1 = l1_entries_for(size, self.geo.cluster_bits);
        if size < old {
            let cs = self.geo.cs;
            let first = size.div_ceil(cs);
            let end = old.div_ceil(cs);
            self.drop_clusters(first, end).await?;
            self.shrink_l1(new_l1 as usize).await?;
        } else if new_l1 as usize > self.l1.len() {
            self.grow_l1(new_l1 as usize).await.map_err(|e| {
                let e = blockd_core::error::strerror(&e);
                io::Error::other(format!("Failed to grow the L1 table: {e}"))
            })?;
        }
        self.write_back(false).await?;
        self.io.write(OFF_SIZE, size.to_be_bytes().to_vec()).await?;
        self.io.sync().await?;
        self.geo.size = size;
        Ok(())
    }

    /// After a shrink, cuts the image file after its last cluster in use
    /// (QEMU's `qcow2_get_last_cluster` and the tail truncate of
    /// `qcow2_co_truncate`). Under the metadata lock, so no cluster past
    /// that end can be allocated meanwhile. A failure only leaves the
    /// file longer (QEMU warns).
    pub async fn cut_file_tail(&mut self) -> io::Result<()> {
        let cs = self.geo.cs;
        let file_len = self.io.len();
        let mut cl = file_len.div_ceil(cs);
        while cl > 0 && self.rc.get(&self.io, cl - 1).await? == 0 {
            cl -= 1;
        }
        if cl * cs < file_len {
            if let Err(e) = self.io.truncate(cl * cs).await {
                tracing::warn!("qcow2: Failed to truncate the tail of the image: {e}");
            }
        }
        Ok(())
    }

    /// Unmaps guest clusters `first..end` entirely (entries become 0, the
    /// clusters they held are queued for release).
    async fn drop_clusters(&mut self, first: u64, end: u64) -> io::Result<()> {
        let per = 1u64 << self.geo.l2_bits;
        let mut gc = first;
        while gc < end {
            let l1i = gc >> self.geo.l2_bits;
            let table_end = ((l1i + 1) * per).min(end);
            if self.l1.get(l1i as usize).copied().unwrap_or(0) & L1E_OFFSET_MASK == 0 {
                gc = table_end;
                continue;
            }
            let entries = self.l2_entries(gc, table_end - gc).await?;
            for (i, &old) in entries.iter().enumerate() {
                if old != 0 {
                    self.set_l2_entry(gc + i as u64, 0).await?;
                    self.free_entry(old, FreeKind::Request)?;
                }
            }
            gc += entries.len() as u64;
        }
        Ok(())
    }

    /// Drops the L2 tables from L1 index `keep` on (the table keeps its
    /// size, as QEMU's does).
    async fn shrink_l1(&mut self, keep: usize) -> io::Result<()> {
        for i in keep..self.l1.len() {
            let off = self.l1[i] & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            // Nothing may write the table once it is released.
            self.l2.remove(off);
            self.l1[i] = 0;
            self.l1_dirty.insert(i);
            self.frees.push(Free {
                off,
                n: 1,
                decref: true,
                discard: true,
            });
        }
        Ok(())
    }

    /// Replaces the L1 table by one of exactly `entries` entries.
    async fn grow_l1(&mut self, entries: usize) -> io::Result<()> {
        if entries as u64 * 8 > MAX_L1_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        // Everything the old table says must be on disk before it is copied.
        self.write_back(false).await?;
        let cs = self.geo.cs;
        let bytes = (entries as u64 * 8).div_ceil(512) * 512;
        let clusters = bytes.div_ceil(cs);
        let new_off = self.alloc_clusters(clusters).await?;
        let mut table = self.l1.clone();
        table.resize(entries, 0);
        let mut buf = Vec::with_capacity((clusters * cs) as usize);
        for e in &table {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        buf.resize((clusters * cs) as usize, 0);
        // The refcounts of the new table, then the table, then the header.
        self.rc.write_dirty(&self.io).await?;
        self.io.write(new_off, buf).await?;
        self.io.sync().await?;
        let mut hdr = (entries as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&new_off.to_be_bytes());
        self.io.write(OFF_L1_SIZE, hdr).await?;
        self.io.sync().await?;
        let old_off = self.l1_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1 = table;
        self.l1_offset = new_off;
        if old_clusters > 0 {
            self.frees.push(Free {
                off: old_off,
                n: old_clusters,
                decref: true,
                discard: self.pass_discard_other,
            });
        }
        Ok(())
    }
}
