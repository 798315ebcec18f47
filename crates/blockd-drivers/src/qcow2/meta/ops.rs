//! Whole-cluster operations and range mapping on the metadata: zeroing,
//! discarding, mapping reads, block status.

use std::io;
use std::sync::Arc;

use tokio::sync::Notify;

use super::{Cluster, Free, FreeKind, Meta, RunStatus, Source, OFLAG_ZERO};

impl Meta {
    /// Makes whole guest clusters `gc..gc+count` read as zeroes (v3), as
    /// QEMU's `zero_in_l2_slice`. Returns a notifier to wait on if one of
    /// them is being allocated.
    pub async fn zero_clusters(
        &mut self,
        gc: u64,
        count: u64,
        unmap: bool,
    ) -> io::Result<Option<Arc<Notify>>> {
        if let Some(n) = self.inflight_overlap(gc, gc + count) {
            return Ok(Some(n));
        }
        let mut done = 0;
        while done < count {
            let entries = self.l2_entries(gc + done, count - done).await?;
            for (i, &old) in entries.iter().enumerate() {
                let c = gc + done + i as u64;
                let kind = self.geo.classify(old)?;
                let compressed = matches!(kind, Cluster::Compressed { .. });
                let unmap_this = compressed || (unmap && kind.allocated());
                let keep_ref = self.discard_no_unref && !compressed;
                let mut new = if unmap_this { 0 } else { old };
                new |= OFLAG_ZERO;
                if keep_ref {
                    new |= old;
                }
                if new == old {
                    continue;
                }
                self.set_l2_entry(c, new).await?;
                if unmap_this {
                    if !keep_ref {
                        self.free_entry(old, FreeKind::Request)?;
                    } else {
                        self.discard_kept(kind);
                    }
                }
            }
            done += entries.len() as u64;
        }
        Ok(None)
    }

    fn discard_kept(&mut self, kind: Cluster) {
        if let Cluster::Normal { host, .. } | Cluster::ZeroAlloc { host, .. } = kind {
            if self.pass_discard_request {
                self.frees.push(Free {
                    off: host,
                    n: 1,
                    decref: false,
                    discard: true,
                });
            }
        }
    }

    /// A guest discard of whole clusters, as QEMU's `discard_in_l2_slice`
    /// (not a full discard: v3 images read zeroes afterwards).
    pub async fn discard_clusters(
        &mut self,
        gc: u64,
        count: u64,
    ) -> io::Result<Option<Arc<Notify>>> {
        if let Some(n) = self.inflight_overlap(gc, gc + count) {
            return Ok(Some(n));
        }
        let mut done = 0;
        while done < count {
            let entries = self.l2_entries(gc + done, count - done).await?;
            for (i, &old) in entries.iter().enumerate() {
                let c = gc + done + i as u64;
                let kind = self.geo.classify(old)?;
                let mut new = old;
                if self.has_backing || kind.allocated() {
                    new = if self.geo.version >= 3 { OFLAG_ZERO } else { 0 };
                }
                let keep_ref = self.discard_no_unref && !matches!(kind, Cluster::Compressed { .. });
                if keep_ref {
                    new |= old;
                }
                if new == old {
                    continue;
                }
                self.set_l2_entry(c, new).await?;
                if !keep_ref {
                    self.free_entry(old, FreeKind::Request)?;
                } else {
                    self.discard_kept(kind);
                }
            }
            done += entries.len() as u64;
        }
        Ok(None)
    }

    /// Maps a guest range for reading: extents of (length, source).
    pub async fn map_read(&mut self, off: u64, len: u64) -> io::Result<Vec<(u64, Source)>> {
        let cs = self.geo.cs;
        let end = off + len;
        let mut out: Vec<(u64, Source)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let want = (end - (gc << self.geo.cluster_bits)).div_ceil(cs);
            let entries = self.l2_entries(gc, want).await?;
            for (i, &e) in entries.iter().enumerate() {
                if pos >= end {
                    break;
                }
                let cstart = (gc + i as u64) << self.geo.cluster_bits;
                let intra = pos - cstart;
                let n = (cs - intra).min(end - pos);
                let src = match self.geo.classify(e)? {
                    Cluster::Unallocated => Source::Backing,
                    Cluster::ZeroPlain | Cluster::ZeroAlloc { .. } => Source::Zero,
                    Cluster::Normal { host, .. } => Source::Host(host + intra),
                    Cluster::Compressed {
                        coffset,
                        nb_sectors,
                    } => Source::Compressed {
                        coffset,
                        nb_sectors,
                        intra,
                    },
                };
                match (out.last_mut(), src) {
                    (Some((l, Source::Host(h))), Source::Host(h2)) if *h + *l == h2 => *l += n,
                    (Some((l, Source::Zero)), Source::Zero) => *l += n,
                    (Some((l, Source::Backing)), Source::Backing) => *l += n,
                    _ => out.push((n, src)),
                }
                pos += n;
            }
        }
        Ok(out)
    }

    /// Status of the run of clusters from `off` (at most `len` bytes).
    pub async fn run_status(&mut self, off: u64, len: u64) -> io::Result<(u64, RunStatus)> {
        let cs = self.geo.cs;
        let end = off + len;
        let mut pos = off;
        let mut status = None;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let want = (end - (gc << self.geo.cluster_bits)).div_ceil(cs);
            let entries = self.l2_entries(gc, want).await?;
            for &e in &entries {
                let s = match self.geo.classify(e)? {
                    Cluster::Unallocated => RunStatus::Unallocated,
                    Cluster::ZeroPlain | Cluster::ZeroAlloc { .. } => RunStatus::Zero,
                    Cluster::Normal { .. } | Cluster::Compressed { .. } => RunStatus::Data,
                };
                match status {
                    None => status = Some(s),
                    Some(p) if p != s => return Ok((pos - off, p)),
                    _ => {}
                }
                let cend = ((pos >> self.geo.cluster_bits) + 1) << self.geo.cluster_bits;
                pos = cend.min(end);
                if pos >= end {
                    break;
                }
            }
        }
        Ok((len, status.unwrap_or(RunStatus::Unallocated)))
    }
}
