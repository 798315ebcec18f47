//! Reference counts: the refcount table, refcount blocks (through a
//! bounded cache) and the cluster allocator.
//!
//! Every cluster of the image file has a reference count, stored in
//! refcount blocks of `refcount_bits`-wide entries (1 to 64 bits; QEMU's
//! default is 16). A cluster is free when its count is 0. blockd reads and
//! writes every width.
//!
//! Crash safety rules kept here:
//! * a new refcount block is written and flushed before the refcount
//!   table points at it;
//! * a new refcount table (growth) is written with the refcount blocks
//!   that count it, flushed, and only then made current by a header
//!   update, which is flushed before the old table is freed;
//! * increments may reach the disk at any time (an early increment is a
//!   leak at worst); decrements are only ever applied by the owner after
//!   the references they drop are stable (see `meta.rs`).

use std::io;

use super::cache::TableCache;
use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::{corrupt, FileIo};

/// Mask of the offset in a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Reads entry `i` of a refcount block of width `1 << order` bits.
pub fn get_entry(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            u64::from(byte >> ((i % per_byte) * bits)) & ((1 << bits) - 1)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `i` of a refcount block (the value must fit the width).
pub fn set_entry(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Largest count of a width.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// The refcount structures of an open image.
pub struct Refcounts {
    /// log2 of the entry width in bits.
    pub order: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The refcount table (offsets of refcount blocks, 0: none).
    pub table: Vec<u64>,
    /// Where the table is.
    pub table_offset: u64,
    /// Its size in clusters.
    pub table_clusters: u64,
    /// Cached refcount blocks.
    pub cache: TableCache,
    /// No cluster below this index is free.
    pub free_hint: u64,
}

impl Refcounts {
    /// Refcount entries per block.
    pub fn epb(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.order)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The offset of the block covering cluster `cl`, if it exists.
    pub fn block_of(&self, cl: u64) -> io::Result<Option<u64>> {
        let b = cl / self.epb();
        match self.table.get(b as usize) {
            None => Ok(None),
            Some(&e) => {
                let off = e & REFT_OFFSET_MASK;
                if off == 0 {
                    Ok(None)
                } else if off % self.cs() != 0 {
                    Err(corrupt(format!(
                        "Refblock offset {off:#x} unaligned (reftable index: {b:#x})"
                    )))
                } else {
                    Ok(Some(off))
                }
            }
        }
    }

    async fn load(&mut self, io: &FileIo, off: u64) -> io::Result<()> {
        if self.cache.contains(off) {
            return Ok(());
        }
        while self.cache.is_full() {
            let (victim, dirty) = self.cache.victim().expect("full cache has a victim");
            if dirty {
                io.write(victim, self.cache.bytes(victim).unwrap_or_default())
                    .await?;
            }
            self.cache.remove(victim);
        }
        let data = io.read(off, self.cs() as usize).await?;
        self.cache.insert(off, data, false);
        Ok(())
    }

    /// The refcount of cluster `cl`.
    pub async fn get(&mut self, io: &FileIo, cl: u64) -> io::Result<u64> {
        let Some(off) = self.block_of(cl)? else {
            return Ok(0);
        };
        self.load(io, off).await?;
        let i = (cl % self.epb()) as usize;
        let order = self.order;
        Ok(get_entry(self.cache.get(off).expect("loaded"), order, i))
    }

    /// Sets the refcount of cluster `cl`, whose block must exist.
    async fn set(&mut self, io: &FileIo, cl: u64, v: u64) -> io::Result<()> {
        let off = self
            .block_of(cl)?
            .ok_or_else(|| corrupt(format!("no refcount block for cluster {cl}")))?;
        self.load(io, off).await?;
        let i = (cl % self.epb()) as usize;
        let order = self.order;
        set_entry(self.cache.get_mut(off).expect("loaded"), order, i, v);
        Ok(())
    }

    /// Adds `delta` to the refcounts of `n` clusters from byte offset `off`.
    /// Returns the clusters whose count dropped to zero.
    pub async fn change(
        &mut self,
        io: &FileIo,
        off: u64,
        n: u64,
        delta: i64,
    ) -> io::Result<Vec<u64>> {
        let first = off >> self.cluster_bits;
        let mut freed = Vec::new();
        for cl in first..first + n {
            let v = self.get(io, cl).await?;
            let new = i128::from(v) + i128::from(delta);
            if new < 0 {
                return Err(corrupt(format!(
                    "refcount of cluster {cl} would drop below zero"
                )));
            }
            if new > i128::from(max_refcount(self.order)) {
                return Err(io::Error::other(format!(
                    "refcount of cluster {cl} would overflow"
                )));
            }
            // (A missing block means a count of 0, which only an
            // increment could change; increments go through `alloc`.)
            self.set(io, cl, new as u64).await?;
            if new == 0 {
                self.free_hint = self.free_hint.min(cl);
                freed.push(cl);
            }
        }
        Ok(freed)
    }

    /// Finds `n` contiguous free clusters from the hint.
    async fn find_free(&mut self, io: &FileIo, n: u64) -> io::Result<u64> {
        let epb = self.epb();
        let mut start = self.free_hint;
        let mut idx = start;
        while idx - start < n {
            let Some(off) = self.block_of(idx)? else {
                // No block: the whole range it would cover is free.
                idx = ((idx / epb + 1) * epb).min(start + n);
                continue;
            };
            self.load(io, off).await?;
            let order = self.order;
            let block = self.cache.get(off).expect("loaded");
            let end = ((idx / epb + 1) * epb).min(start + n);
            while idx < end {
                if get_entry(block, order, (idx % epb) as usize) == 0 {
                    idx += 1;
                } else {
                    idx += 1;
                    start = idx;
                }
            }
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each); returns the
    /// byte offset of the first.
    pub async fn alloc(&mut self, io: &FileIo, n: u64) -> io::Result<u64> {
        loop {
            let start = self.find_free(io, n).await?;
            let epb = self.epb();
            let mut created = false;
            for b in start / epb..=(start + n - 1) / epb {
                if self.block_of(b * epb)?.is_none() {
                    self.create_block(io, b).await?;
                    created = true;
                }
            }
            if created {
                // The new blocks took clusters of their own: search again.
                continue;
            }
            for cl in start..start + n {
                self.set(io, cl, 1).await?;
            }
            // find_free returns the first run of n free clusters at or
            // after the hint: for a single cluster, everything before it
            // is in use, so the hint moves past it even when the search had
            // to skip clusters (e.g. one just taken by a new refcount
            // block). Without this the hint could stick, and every later
            // allocation would rescan all clusters since (quadratic).
            if n == 1 || start == self.free_hint {
                self.free_hint = start + n;
            }
            if (start + n) << self.cluster_bits > 1 << 56 {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            }
            return Ok(start << self.cluster_bits);
        }
    }

    /// Writes the dirty refcount blocks (no flush).
    pub async fn write_dirty(&mut self, io: &FileIo) -> io::Result<()> {
        for off in self.cache.dirty_offsets() {
            if let Some(b) = self.cache.bytes(off) {
                io.write(off, b).await?;
            }
            self.cache.mark_clean(off);
        }
        Ok(())
    }

    /// Creates refcount block `b`. It lives in the first cluster of the
    /// range it covers (free, since nothing counts it yet) and counts
    /// itself.
    async fn create_block(&mut self, io: &FileIo, b: u64) -> io::Result<()> {
        if b as usize >= self.table.len() {
            self.grow_table(io, b).await?;
            if self.block_of(b * self.epb())?.is_some() {
                return Ok(());
            }
        }
        if b == 0 {
            return Err(corrupt("refcount block 0 is missing"));
        }
        let off = (b * self.epb()) << self.cluster_bits;
        let mut block = vec![0u8; self.cs() as usize];
        set_entry(&mut block, self.order, 0, 1);
        io.write(off, block.clone()).await?;
        io.sync().await?;
        self.table[b as usize] = off;
        io.write(self.table_offset + b * 8, off.to_be_bytes().to_vec())
            .await?;
        while self.cache.is_full() {
            let (victim, dirty) = self.cache.victim().expect("full cache has a victim");
            if dirty {
                io.write(victim, self.cache.bytes(victim).unwrap_or_default())
                    .await?;
            }
            self.cache.remove(victim);
        }
        self.cache.insert(off, block, false);
        Ok(())
    }

    /// Replaces the refcount table by a larger one that has an entry for
    /// block `b`. The new table and the blocks that count it go to the
    /// start of block `b`'s range (free: nothing counts it).
    async fn grow_table(&mut self, io: &FileIo, b: u64) -> io::Result<()> {
        let epb = self.epb();
        let cs = self.cs();
        let old_len = self.table.len() as u64;
        let area = b * epb;
        let mut rb = 1u64;
        let (tc, entries) = loop {
            let want = (b + rb).max(old_len + old_len / 2).max(old_len + 1);
            let tc = (want * 8).div_ceil(cs);
            let need = (rb + tc).div_ceil(epb);
            if need <= rb {
                break (tc, tc * cs / 8);
            }
            rb = need;
        };
        if tc * cs > MAX_REFTABLE_BYTES {
            return Err(io::Error::other(
                "refcount table would exceed its maximum size",
            ));
        }
        let total = rb + tc;
        let mut buf = vec![0u8; (total * cs) as usize];
        for j in 0..rb {
            let block = &mut buf[(j * cs) as usize..((j + 1) * cs) as usize];
            let first = (b + j) * epb;
            for cl in first.max(area)..(first + epb).min(area + total) {
                set_entry(block, self.order, (cl - first) as usize, 1);
            }
        }
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for j in 0..rb {
            table[(b + j) as usize] = (area + j) << self.cluster_bits;
        }
        let tstart = (rb * cs) as usize;
        for (i, e) in table.iter().enumerate() {
            buf[tstart + i * 8..tstart + i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let area_off = area << self.cluster_bits;
        io.write(area_off, buf).await?;
        io.sync().await?;
        let new_table_off = area_off + rb * cs;
        let mut hdr = new_table_off.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(tc as u32).to_be_bytes());
        io.write(OFF_REFTABLE, hdr).await?;
        io.sync().await?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = new_table_off;
        self.table_clusters = tc;
        // The old table is referenced by nothing on disk any more.
        self.change(io, old_off, old_clusters, -1).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..n {
                set_entry(&mut block, order, i, (i as u64 * 7919) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64 * 7919) & max,
                    "order {order} i {i}"
                );
            }
        }
        // QEMU's layout for sub-byte widths: the lowest bits first.
        let mut b = vec![0u8; 1];
        set_entry(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_entry(&mut b, 2, 1, 0xf);
        assert_eq!(b[0], 0xf1);
    }
}
