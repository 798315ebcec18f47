//! The metadata of an open image: the L1 table, cached L2 tables, the
//! refcounts, clusters being allocated, and the order in which changes
//! reach the disk.
//!
//! Everything here runs under the driver's metadata lock; guest data I/O
//! happens outside it.
//!
//! # Write ordering
//!
//! Metadata is cached write-back and written in QEMU's dependency order,
//! so that after a crash at any point the image has no corruption (only,
//! at worst, leaked clusters):
//!
//! 1. guest data is written to newly allocated clusters *before* the L2
//!    entry that points at them is changed (in memory);
//! 2. refcount increments (new clusters, new L2 tables) are written
//!    first; then the file is flushed, so data and refcounts are stable;
//! 3. then dirty L2 tables are written; if an L1 entry must point at a new
//!    L2 table, the file is flushed again before the L1 entry is written;
//! 4. a final flush makes it all stable (this is what a client's flush
//!    waits for);
//! 5. refcount *decrements* for clusters an L2 entry stopped referencing
//!    are only applied after that (see [`Meta::take_frees`]), so an
//!    on-disk refcount is never lower than the references on disk, and a
//!    freed cluster is never reused while an old reference may survive.
//!
//! With lazy refcounts the image is marked dirty (flushed) before the
//! first refcount change, refcount blocks are written only on eviction or
//! close, and QEMU (or blockd) repairs the refcounts when it opens a dirty
//! image.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::cache::TableCache;
use super::header::{INCOMPAT_DIRTY, OFF_INCOMPAT};
use super::refcount::Refcounts;
use super::snapshot::SnapEntry;
use super::{corrupt, FileIo, Geo};

mod ops;
mod resize;
mod snapshot;

/// Offset bits of an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The refcount of the cluster is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (v3).
pub const OFLAG_ZERO: u64 = 1;

/// Longest run of clusters one allocation handles (bytes).
const MAX_RUN_BYTES: u64 = 16 << 20;
/// Pending frees past which a request triggers a flush of its own.
pub const MAX_PENDING_FREES: usize = 4096;

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated here: reads go to the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Reads as zeroes; a host cluster is still reserved.
    ZeroAlloc {
        /// The reserved host cluster.
        host: u64,
        /// Its refcount is 1.
        copied: bool,
    },
    /// Data at `host`.
    Normal {
        /// Host offset.
        host: u64,
        /// Its refcount is 1 (may be written in place).
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Host byte offset of the compressed data.
        coffset: u64,
        /// 512-byte sectors it spans (from `coffset & !511`).
        nb_sectors: u64,
    },
}

impl Cluster {
    /// Whether a host cluster is referenced.
    pub fn allocated(&self) -> bool {
        !matches!(self, Cluster::Unallocated | Cluster::ZeroPlain)
    }
}

impl Geo {
    /// Decodes an L2 entry.
    pub fn classify(&self, e: u64) -> io::Result<Cluster> {
        if e & OFLAG_COMPRESSED != 0 {
            let coffset = e & self.cluster_offset_mask;
            let nb_sectors = ((e >> self.csize_shift) & self.csize_mask) + 1;
            return Ok(Cluster::Compressed {
                coffset,
                nb_sectors,
            });
        }
        let host = e & L2E_OFFSET_MASK;
        let copied = e & OFLAG_COPIED != 0;
        if host % self.cs != 0 {
            return Err(corrupt(format!(
                "Cluster allocation offset {host:#x} unaligned"
            )));
        }
        if e & OFLAG_ZERO != 0 {
            if self.version < 3 {
                return Err(corrupt("Zero cluster entry found in pre-v3 image"));
            }
            return Ok(if host == 0 {
                Cluster::ZeroPlain
            } else {
                Cluster::ZeroAlloc { host, copied }
            });
        }
        Ok(if host == 0 {
            Cluster::Unallocated
        } else {
            Cluster::Normal { host, copied }
        })
    }

    /// Host clusters a compressed cluster's data spans: (offset, count).
    pub fn compressed_span(&self, coffset: u64, nb_sectors: u64) -> (u64, u64) {
        let start = coffset & !511;
        let end = start + nb_sectors * 512;
        let first = start >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        (first << self.cluster_bits, last - first + 1)
    }
}

/// A refcount decrement (and/or discard) waiting until it is safe.
#[derive(Debug, Clone, Copy)]
pub struct Free {
    /// Host byte offset.
    pub off: u64,
    /// Clusters.
    pub n: u64,
    /// Decrement the refcounts.
    pub decref: bool,
    /// Pass a discard to the file for clusters that become free (or, if
    /// not `decref`, for the range).
    pub discard: bool,
}

/// Why a cluster is freed (QEMU's discard types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeKind {
    /// A guest discard or write-zeroes with unmap.
    Request,
    /// Anything else (copy-on-write replaced it).
    Other,
}

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The image file at this offset.
    Host(u64),
    /// Zeroes.
    Zero,
    /// The backing file (zeroes without one).
    Backing,
    /// A compressed cluster; `intra` is the offset inside it.
    Compressed {
        /// Host byte offset of the compressed data.
        coffset: u64,
        /// Sectors.
        nb_sectors: u64,
        /// Offset inside the (decompressed) cluster.
        intra: u64,
    },
}

/// What a write of a range must do first.
#[derive(Debug)]
pub enum WritePlan {
    /// The clusters are allocated with refcount 1: write `len` bytes at `host`.
    InPlace {
        /// Host offset of the first byte.
        host: u64,
        /// Bytes covered.
        len: u64,
    },
    /// Clusters `gc..gc+count` need new host clusters (or reuse of
    /// preallocated zero clusters at `reuse`); the caller holds them.
    Alloc {
        /// First guest cluster.
        gc: u64,
        /// Clusters.
        count: u64,
        /// Their L2 entries now (copy-on-write sources).
        old: Vec<u64>,
        /// Preallocated host clusters to fill in place.
        reuse: Option<u64>,
        /// Bytes of the request covered.
        len: u64,
    },
    /// Another request is allocating one of the clusters: wait, retry.
    Wait(Arc<Notify>),
}

/// Simplified status of a run of clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Data in this image.
    Data,
    /// Zeroes in this image.
    Zero,
    /// Not allocated here.
    Unallocated,
}

/// The metadata state.
pub struct Meta {
    /// The image file.
    pub io: FileIo,
    /// Geometry.
    pub geo: Geo,
    /// The active L1 table (decoded).
    pub l1: Vec<u64>,
    /// Where it is.
    pub l1_offset: u64,
    /// L1 entries changed in memory, not yet written.
    l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables.
    pub l2: TableCache,
    /// Refcounts.
    pub rc: Refcounts,
    /// Decrements waiting for their L2 changes to be stable.
    frees: Vec<Free>,
    /// Guest clusters being allocated: (first, end, done).
    inflight: Vec<(u64, u64, Arc<Notify>)>,
    /// Lazy refcounts in use.
    pub lazy: bool,
    /// The incompatible feature bits as on disk.
    pub incompat: u64,
    /// Shared with the driver: the dirty bit, for queries.
    pub dirty_flag: Arc<AtomicBool>,
    /// `pass-discard-request`.
    pub pass_discard_request: bool,
    /// `pass-discard-other`.
    pub pass_discard_other: bool,
    /// `discard-no-unref`.
    pub discard_no_unref: bool,
    /// Whether the node has a backing child.
    pub has_backing: bool,
    /// The snapshot table's entries.
    pub snapshots: Vec<SnapEntry>,
    /// The snapshot table: (offset, bytes).
    pub snapshot_table: (u64, u64),
    /// The valid bitmaps extension, if any (its clusters count in
    /// refcounts; see `bitmaps`).
    pub bitmaps: Option<super::bitmaps::BitmapsExt>,
    /// The bitmap directory as on disk (for queries; set where it changes).
    pub bitmap_info: Arc<std::sync::Mutex<Vec<super::bitmaps::DirEntry>>>,
    /// `cache-clean-interval`.
    pub clean_interval: Option<Duration>,
    last_clean: Instant,
    clean_stamps: (u64, u64),
}

impl Meta {
    /// Metadata state over loaded tables.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        io: FileIo,
        geo: Geo,
        l1: Vec<u64>,
        l1_offset: u64,
        l2_cache_entries: usize,
        rc: Refcounts,
        incompat: u64,
        dirty_flag: Arc<AtomicBool>,
    ) -> Meta {
        Meta {
            io,
            geo,
            l1,
            l1_offset,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(l2_cache_entries),
            rc,
            frees: Vec::new(),
            inflight: Vec::new(),
            lazy: false,
            incompat,
            dirty_flag,
            pass_discard_request: false,
            pass_discard_other: false,
            discard_no_unref: false,
            has_backing: false,
            snapshots: Vec::new(),
            snapshot_table: (0, 0),
            bitmaps: None,
            bitmap_info: Arc::default(),
            clean_interval: None,
            last_clean: Instant::now(),
            clean_stamps: (0, 0),
        }
    }

    fn l2_entries_per_table(&self) -> u64 {
        1 << self.geo.l2_bits
    }

    /// Drops clean cached tables unused for a whole `cache-clean-interval`.
    fn maybe_clean(&mut self) {
        let Some(iv) = self.clean_interval else {
            return;
        };
        if self.last_clean.elapsed() >= iv {
            self.l2.drop_clean_older_than(self.clean_stamps.0);
            self.rc.cache.drop_clean_older_than(self.clean_stamps.1);
            self.clean_stamps = (self.l2.stamp() + 1, self.rc.cache.stamp() + 1);
            self.last_clean = Instant::now();
        }
    }

    /// Writes the refcount blocks an L2 table write depends on, and
    /// flushes so they (and guest data written so far) are stable.
    async fn before_l2_write(&mut self) -> io::Result<()> {
        if !self.lazy {
            self.rc.write_dirty(&self.io).await?;
        }
        self.io.sync().await
    }

    /// Makes sure the L2 table at `off` is cached.
    async fn load_l2(&mut self, off: u64) -> io::Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        while self.l2.is_full() {
            let (victim, dirty) = self.l2.victim().expect("full cache has a victim");
            if dirty {
                self.before_l2_write().await?;
                let b = self.l2.bytes(victim).unwrap_or_default();
                self.io.write(victim, b).await?;
            }
            self.l2.remove(victim);
        }
        let data = self.io.read(off, self.geo.cs as usize).await?;
        self.l2.insert(off, data, false);
        Ok(())
    }

    fn l2_offset(&self, l1i: u64) -> io::Result<u64> {
        let e = self.l1.get(l1i as usize).copied().unwrap_or(0);
        let off = e & L1E_OFFSET_MASK;
        if off % self.geo.cs != 0 {
            return Err(corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {l1i:#x})"
            )));
        }
        Ok(off)
    }

    /// Up to `want` L2 entries from guest cluster `gc`, within one table.
    pub async fn l2_entries(&mut self, gc: u64, want: u64) -> io::Result<Vec<u64>> {
        self.maybe_clean();
        let per = self.l2_entries_per_table();
        let want = want.min(per - (gc & (per - 1))).max(1);
        let off = self.l2_offset(gc >> self.geo.l2_bits)?;
        if off == 0 {
            return Ok(vec![0; want as usize]);
        }
        self.load_l2(off).await?;
        let t = self.l2.get(off).expect("loaded");
        let first = (gc & (per - 1)) as usize;
        Ok((first..first + want as usize)
            .map(|i| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&t[i * 8..i * 8 + 8]);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// The decoded entries of the L2 table at host offset `off`.
    pub async fn l2_table(&mut self, off: u64) -> io::Result<Vec<u64>> {
        self.load_l2(off).await?;
        let t = self.l2.get(off).expect("loaded");
        Ok(t.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// Marks the image dirty (lazy refcounts) before refcounts change.
    pub async fn ensure_dirty(&mut self) -> io::Result<()> {
        if !self.lazy || self.incompat & INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        let v = self.incompat | INCOMPAT_DIRTY;
        self.io
            .write(OFF_INCOMPAT, v.to_be_bytes().to_vec())
            .await?;
        self.io.sync().await?;
        self.incompat = v;
        self.dirty_flag.store(true, Ordering::Release);
        Ok(())
    }

    /// Allocates `n` contiguous host clusters.
    pub async fn alloc_clusters(&mut self, n: u64) -> io::Result<u64> {
        self.ensure_dirty().await?;
        self.rc.alloc(&self.io, n).await
    }

    /// The cached L2 table for L1 index `l1i`, ready to be modified: a
    /// missing table is allocated, a shared one (snapshots) copied.
    async fn l2_for_write(&mut self, l1i: u64) -> io::Result<u64> {
        let e = self.l1.get(l1i as usize).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest offset beyond the L1 table",
            )
        })?;
        let old = self.l2_offset(l1i)?;
        if old != 0 && e & OFLAG_COPIED != 0 {
            self.load_l2(old).await?;
            return Ok(old);
        }
        let content = if old != 0 {
            self.load_l2(old).await?;
            self.l2.bytes(old).expect("loaded")
        } else {
            vec![0u8; self.geo.cs as usize]
        };
        let new = self.alloc_clusters(1).await?;
        while self.l2.is_full() {
            let (victim, dirty) = self.l2.victim().expect("full cache has a victim");
            if dirty {
                self.before_l2_write().await?;
                let b = self.l2.bytes(victim).unwrap_or_default();
                self.io.write(victim, b).await?;
            }
            self.l2.remove(victim);
        }
        self.l2.insert(new, content, true);
        self.l1[l1i as usize] = new | OFLAG_COPIED;
        self.l1_dirty.insert(l1i as usize);
        if old != 0 {
            self.frees.push(Free {
                off: old,
                n: 1,
                decref: true,
                discard: self.pass_discard_other,
            });
        }
        Ok(new)
    }

    /// Sets the L2 entry of guest cluster `gc`.
    pub async fn set_l2_entry(&mut self, gc: u64, v: u64) -> io::Result<()> {
        let per = self.l2_entries_per_table();
        let off = self.l2_for_write(gc >> self.geo.l2_bits).await?;
        let i = ((gc & (per - 1)) * 8) as usize;
        self.l2.get_mut(off).expect("loaded")[i..i + 8].copy_from_slice(&v.to_be_bytes());
        Ok(())
    }

    /// Queues the release of whatever host clusters `old` referenced.
    pub fn free_entry(&mut self, old: u64, kind: FreeKind) -> io::Result<()> {
        let discard = match kind {
            FreeKind::Request => self.pass_discard_request,
            FreeKind::Other => self.pass_discard_other,
        };
        match self.geo.classify(old)? {
            Cluster::Normal { host, .. } | Cluster::ZeroAlloc { host, .. } => {
                self.frees.push(Free {
                    off: host,
                    n: 1,
                    decref: true,
                    discard,
                })
            }
            Cluster::Compressed {
                coffset,
                nb_sectors,
            } => {
                let (off, n) = self.geo.compressed_span(coffset, nb_sectors);
                self.frees.push(Free {
                    off,
                    n,
                    decref: true,
                    discard,
                });
            }
            Cluster::Unallocated | Cluster::ZeroPlain => {}
        }
        Ok(())
    }

    /// Number of queued frees.
    pub fn pending_frees(&self) -> usize {
        self.frees.len()
    }

    fn inflight_overlap(&self, first: u64, end: u64) -> Option<Arc<Notify>> {
        self.inflight
            .iter()
            .find(|(s, e, _)| *s < end && first < *e)
            .map(|(_, _, n)| n.clone())
    }

    /// Ends the allocation of clusters starting at `gc` and wakes waiters.
    pub fn end_inflight(&mut self, gc: u64) {
        if let Some(i) = self.inflight.iter().position(|(s, _, _)| *s == gc) {
            let (_, _, n) = self.inflight.swap_remove(i);
            n.notify_waiters();
        }
    }

    /// Decides how to write `len` bytes at guest offset `off` (one run).
    pub async fn plan_write(&mut self, off: u64, len: u64) -> io::Result<WritePlan> {
        let cs = self.geo.cs;
        let gc0 = off >> self.geo.cluster_bits;
        let intra = off & (cs - 1);
        let want = (intra + len).div_ceil(cs).min((MAX_RUN_BYTES / cs).max(1));
        let entries = self.l2_entries(gc0, want).await?;
        let kinds = entries
            .iter()
            .map(|&e| self.geo.classify(e))
            .collect::<io::Result<Vec<_>>>()?;
        let contiguous = |i: usize, base: u64| -> bool {
            match kinds[i] {
                Cluster::Normal { host, copied: true } => host == base + i as u64 * cs,
                _ => false,
            }
        };
        let reusable = |i: usize, base: u64| -> bool {
            match kinds[i] {
                Cluster::ZeroAlloc { host, copied: true } => host == base + i as u64 * cs,
                _ => false,
            }
        };
        let (count, reuse, in_place) = match kinds[0] {
            Cluster::Normal { host, copied: true } => {
                let n = (1..kinds.len())
                    .take_while(|&i| contiguous(i, host))
                    .count()
                    + 1;
                (n, Some(host), true)
            }
            Cluster::ZeroAlloc { host, copied: true } => {
                let n = (1..kinds.len()).take_while(|&i| reusable(i, host)).count() + 1;
                (n, Some(host), false)
            }
            _ => {
                let n = (1..kinds.len())
                    .take_while(|&i| {
                        !matches!(
                            kinds[i],
                            Cluster::Normal { copied: true, .. }
                                | Cluster::ZeroAlloc { copied: true, .. }
                        )
                    })
                    .count()
                    + 1;
                (n, None, false)
            }
        };
        let count = count as u64;
        let covered = (count * cs - intra).min(len);
        if in_place {
            return Ok(WritePlan::InPlace {
                host: reuse.expect("in place has a host") + intra,
                len: covered,
            });
        }
        if let Some(n) = self.inflight_overlap(gc0, gc0 + count) {
            return Ok(WritePlan::Wait(n));
        }
        self.inflight
            .push((gc0, gc0 + count, Arc::new(Notify::new())));
        Ok(WritePlan::Alloc {
            gc: gc0,
            count,
            old: entries[..count as usize].to_vec(),
            reuse,
            len: covered,
        })
    }

    /// Points guest clusters `gc..gc+count` at the new host clusters from
    /// `host` (after their data was written) and queues the release of
    /// what they pointed at before.
    pub async fn link(&mut self, gc: u64, count: u64, host: u64, reused: bool) -> io::Result<()> {
        for i in 0..count {
            let old = self.l2_entries(gc + i, 1).await?[0];
            let new = (host + i * self.geo.cs) | OFLAG_COPIED;
            self.set_l2_entry(gc + i, new).await?;
            if !reused {
                self.free_entry(old, FreeKind::Other)?;
            }
        }
        Ok(())
    }

    async fn write_l1_dirty(&mut self) -> io::Result<()> {
        // Write whole 512-byte sectors of the table around dirty entries.
        let dirty = std::mem::take(&mut self.l1_dirty);
        let mut sectors: BTreeSet<usize> = BTreeSet::new();
        for i in dirty {
            sectors.insert(i / 64);
        }
        for s in sectors {
            let first = s * 64;
            let last = (first + 64).min(self.l1.len());
            let mut b = Vec::with_capacity((last - first) * 8);
            for e in &self.l1[first..last] {
                b.extend_from_slice(&e.to_be_bytes());
            }
            self.io.write(self.l1_offset + first as u64 * 8, b).await?;
        }
        Ok(())
    }

    /// Writes every dirty table in dependency order and flushes (see the
    /// module docs). `all`: refcount blocks too, even with lazy refcounts.
    pub async fn write_back(&mut self, all: bool) -> io::Result<()> {
        if !self.lazy || all {
            self.rc.write_dirty(&self.io).await?;
        }
        if self.l2.has_dirty() || !self.l1_dirty.is_empty() {
            self.io.sync().await?;
            for off in self.l2.dirty_offsets() {
                if let Some(b) = self.l2.bytes(off) {
                    self.io.write(off, b).await?;
                }
                self.l2.mark_clean(off);
            }
        }
        if !self.l1_dirty.is_empty() {
            self.io.sync().await?;
            self.write_l1_dirty().await?;
        }
        self.io.sync().await
    }

    /// Takes the queued frees. Only call right after [`Meta::write_back`]:
    /// the references they drop are stable then.
    pub fn take_frees(&mut self) -> Vec<Free> {
        std::mem::take(&mut self.frees)
    }

    /// Applies frees taken with [`Meta::take_frees`] (while no guest I/O
    /// that may still use the clusters is in flight).
    pub async fn apply_frees(&mut self, frees: Vec<Free>) -> io::Result<()> {
        let cs = self.geo.cs;
        for f in frees {
            if f.decref {
                self.ensure_dirty().await?;
                let zeroed = self.rc.change(&self.io, f.off, f.n, -1).await?;
                if f.discard {
                    for cl in zeroed {
                        // Discard is advisory: its failure changes nothing.
                        let _ = self.io.discard(cl << self.geo.cluster_bits, cs).await;
                    }
                }
            } else if f.discard {
                let _ = self.io.discard(f.off, f.n * cs).await;
            }
        }
        if !self.lazy {
            self.rc.write_dirty(&self.io).await?;
        }
        Ok(())
    }

    /// Clears the dirty bit (everything must be written and flushed).
    pub async fn mark_clean(&mut self) -> io::Result<()> {
        if self.incompat & INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        let v = self.incompat & !INCOMPAT_DIRTY;
        self.io
            .write(OFF_INCOMPAT, v.to_be_bytes().to_vec())
            .await?;
        self.io.sync().await?;
        self.incompat = v;
        self.dirty_flag.store(false, Ordering::Release);
        Ok(())
    }

    /// Writes everything and leaves a clean image (close).
    /// Changes how many L2 tables and refcount blocks the caches hold.
    pub fn set_cache_capacities(&mut self, l2: usize, rc: usize) {
        self.l2.set_capacity(l2);
        self.rc.cache.set_capacity(rc);
    }

    pub async fn close(&mut self) -> io::Result<()> {
        self.write_back(true).await?;
        let frees = self.take_frees();
        self.apply_frees(frees).await?;
        self.rc.write_dirty(&self.io).await?;
        self.io.sync().await?;
        self.mark_clean().await
    }
}
