//! The metadata side of internal snapshots (QEMU's
//! `qcow2_snapshot_create`, `qcow2_snapshot_delete`,
//! `qcow2_update_snapshot_refcount` and `qcow2_write_snapshots`); see
//! the driver's `snapshot.rs` for the order of the steps.
//!
//! The caller has flushed and applied the pending frees (refcounts are
//! exact) and holds the node drained: no guest request is in flight, so
//! none can be writing in place into a cluster that becomes shared.

use std::io;

use blockd_core::snapshot::SnapshotInfo;

use super::{Cluster, Meta, L1E_OFFSET_MASK, OFLAG_COPIED};
use crate::qcow2::snapshot::SnapEntry;

/// Offset of `nb_snapshots` (followed by `snapshots_offset`) in the header.
const OFF_NB_SNAPSHOTS: u64 = 60;

impl Meta {
    /// Adds `addend` (-1, 0 or 1) to the refcount of every cluster the L1
    /// table `l1` reaches, and sets or clears `QCOW_OFLAG_COPIED` on the
    /// entries to match the new counts (in the L2 tables through the
    /// cache, in `l1` in place). Returns the indexes of `l1` that changed.
    async fn update_snapshot_refcount(
        &mut self,
        l1: &mut [u64],
        addend: i64,
    ) -> io::Result<Vec<usize>> {
        let mut changed = Vec::new();
        for (i, l1e) in l1.iter_mut().enumerate() {
            let l2_off = *l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let table = self.l2_table(l2_off).await?;
            for (j, &old) in table.iter().enumerate() {
                let entry = old & !OFLAG_COPIED;
                let refcount = match self.geo.classify(entry)? {
                    Cluster::Compressed {
                        coffset,
                        nb_sectors,
                    } => {
                        if addend != 0 {
                            let (off, n) = self.geo.compressed_span(coffset, nb_sectors);
                            self.rc.change(&self.io, off, n, addend).await?;
                        }
                        // Compressed clusters are never written in place.
                        2
                    }
                    Cluster::Normal { host, .. } | Cluster::ZeroAlloc { host, .. } => {
                        if addend != 0 {
                            self.rc.change(&self.io, host, 1, addend).await?;
                        }
                        self.rc.get(&self.io, host >> self.geo.cluster_bits).await?
                    }
                    Cluster::ZeroPlain | Cluster::Unallocated => 0,
                };
                let new = if refcount == 1 {
                    entry | OFLAG_COPIED
                } else {
                    entry
                };
                if new != old {
                    // The table may have left the cache meanwhile.
                    self.load_l2(l2_off).await?;
                    let t = self.l2.get_mut(l2_off).expect("loaded");
                    t[j * 8..j * 8 + 8].copy_from_slice(&new.to_be_bytes());
                }
            }
            if addend != 0 {
                let freed = self.rc.change(&self.io, l2_off, 1, addend).await?;
                if !freed.is_empty() {
                    // A freed table must never be written back over
                    // whatever reuses its cluster.
                    self.l2.remove(l2_off);
                }
            }
            let rc = self
                .rc
                .get(&self.io, l2_off >> self.geo.cluster_bits)
                .await?;
            let new = if rc == 1 {
                l2_off | OFLAG_COPIED
            } else {
                l2_off
            };
            if new != *l1e {
                *l1e = new;
                changed.push(i);
            }
        }
        Ok(changed)
    }

    /// Writes the snapshot table `entries` to new clusters, points the
    /// header at it and frees the old one (QEMU's `qcow2_write_snapshots`).
    async fn write_snapshot_table(&mut self, entries: Vec<SnapEntry>) -> io::Result<()> {
        let cs = self.geo.cs;
        let mut buf = Vec::new();
        for e in &entries {
            buf.extend_from_slice(&e.encode());
        }
        let len = buf.len() as u64;
        let new_off = if len > 0 {
            let clusters = len.div_ceil(cs);
            let off = self.alloc_clusters(clusters).await?;
            buf.resize((clusters * cs) as usize, 0);
            self.rc.write_dirty(&self.io).await?;
            self.io.write(off, buf).await?;
            off
        } else {
            0
        };
        self.io.sync().await?;
        let mut hdr = (entries.len() as u32).to_be_bytes().to_vec();
        hdr.extend_from_slice(&new_off.to_be_bytes());
        self.io.write(OFF_NB_SNAPSHOTS, hdr).await?;
        self.io.sync().await?;
        let (old_off, old_len) = self.snapshot_table;
        if old_len > 0 {
            self.ensure_dirty().await?;
            self.rc
                .change(&self.io, old_off, old_len.div_ceil(cs), -1)
                .await?;
        }
        self.snapshot_table = (new_off, len);
        self.snapshots = entries;
        self.write_back(true).await
    }

    /// Takes a snapshot of the active L1 table named and dated as `sn`,
    /// with id `id`.
    pub async fn snapshot_create(&mut self, sn: &SnapshotInfo, id: String) -> io::Result<()> {
        self.write_back(true).await?;
        let cs = self.geo.cs;
        let l1_size = self.l1.len();
        let bytes = l1_size as u64 * 8;
        let l1_off = if bytes > 0 {
            let clusters = bytes.div_ceil(cs);
            let off = self.alloc_clusters(clusters).await?;
            let mut buf = Vec::with_capacity((clusters * cs) as usize);
            for e in &self.l1 {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            buf.resize((clusters * cs) as usize, 0);
            self.io.write(off, buf).await?;
            off
        } else {
            0
        };
        // Raise the refcounts and make them (and the cleared flags)
        // stable before the snapshot table points at the copy.
        self.ensure_dirty().await?;
        let mut l1 = std::mem::take(&mut self.l1);
        let r = self.update_snapshot_refcount(&mut l1, 1).await;
        self.l1 = l1;
        for i in r? {
            self.l1_dirty.insert(i);
        }
        self.write_back(true).await?;
        let mut entries = self.snapshots.clone();
        entries.push(SnapEntry::new(sn, id, l1_off, l1_size as u32));
        self.write_snapshot_table(entries).await
    }

    /// Deletes snapshot `i`; returns its entry.
    pub async fn snapshot_delete(&mut self, i: usize) -> io::Result<SnapEntry> {
        self.write_back(true).await?;
        let mut entries = self.snapshots.clone();
        let e = entries.remove(i);
        self.write_snapshot_table(entries).await?;
        // From here on the snapshot is gone; what follows only releases
        // what it held (a failure leaks clusters, as in QEMU).
        self.ensure_dirty().await?;
        let bytes = u64::from(e.l1_size) * 8;
        let mut l1: Vec<u64> = if bytes > 0 {
            self.io
                .read(e.l1_table_offset, bytes as usize)
                .await?
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect()
        } else {
            Vec::new()
        };
        self.update_snapshot_refcount(&mut l1, -1).await?;
        if bytes > 0 {
            self.rc
                .change(&self.io, e.l1_table_offset, bytes.div_ceil(self.geo.cs), -1)
                .await?;
        }
        // The active tables may be the only users now.
        let mut l1 = std::mem::take(&mut self.l1);
        let r = self.update_snapshot_refcount(&mut l1, 0).await;
        self.l1 = l1;
        for i in r? {
            self.l1_dirty.insert(i);
        }
        self.write_back(true).await?;
        Ok(e)
    }
}
