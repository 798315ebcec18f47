//! Consistency check and refcount repair (QEMU's `qcow2_check_refcounts`
//! and, for dirty images, its refcount rebuild).
//!
//! References are counted the way QEMU counts them: the header cluster,
//! the refcount table and blocks, the snapshot table, the bitmaps
//! (directory, tables, data clusters), and for each L1
//! table (the active one and each snapshot's) the L1 table itself, every
//! L2 table it points at and every host cluster those L2 tables point at.
//!
//! Repair never edits refcounts in place (a stale refcount could make it
//! pick a cluster in use): it writes a complete new refcount structure
//! after the end of the file, flushes it, and then switches the header to
//! it. A crash before the switch leaves the old (dirty) structure and the
//! dirty bit, so the repair simply runs again.

use std::io;

use super::corrupt;
use super::header::{MAX_L1_BYTES, MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::meta::{Cluster, Meta, L1E_OFFSET_MASK, OFLAG_COPIED};
use super::refcount::{max_refcount, set_entry};

/// What a check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references, or broken references.
    pub corruptions: u64,
    /// Clusters with a refcount but fewer references.
    pub leaks: u64,
    /// Human-readable findings (the first few).
    pub messages: Vec<String>,
}

impl CheckReport {
    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        if self.messages.len() < 32 {
            self.messages.push(msg);
        }
    }
}

/// References per cluster of the file.
struct Counts {
    v: Vec<u32>,
    cluster_bits: u32,
}

impl Counts {
    fn inc(&mut self, off: u64, len: u64, rep: &mut CheckReport, what: &str) {
        if len == 0 {
            return;
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for cl in first..=last {
            match self.v.get_mut(cl as usize) {
                Some(c) => *c = c.saturating_add(1),
                None => rep.corrupt(format!(
                    "{what} at {off:#x} lies beyond the end of the image file"
                )),
            }
        }
    }
}

/// `with_refcounts`: count the current refcount table and blocks too
/// (a rebuild replaces them, so it does not).
async fn count_references(
    m: &mut Meta,
    rep: &mut CheckReport,
    with_refcounts: bool,
) -> io::Result<Counts> {
    let cs = m.geo.cs;
    let clusters = m.io.len().div_ceil(cs);
    let mut c = Counts {
        v: vec![0; clusters as usize],
        cluster_bits: m.geo.cluster_bits,
    };
    c.inc(0, cs, rep, "header");
    if with_refcounts {
        c.inc(
            m.rc.table_offset,
            m.rc.table_clusters * cs,
            rep,
            "refcount table",
        );
        for i in 0..m.rc.table.len() {
            if let Some(off) = m.rc.block_of(i as u64 * m.rc.epb())? {
                c.inc(off, cs, rep, "refcount block");
            }
        }
    }
    c.inc(
        m.snapshot_table.0,
        m.snapshot_table.1,
        rep,
        "snapshot table",
    );
    let (refs, bad) = super::bitmaps::store::references(m).await?;
    for (off, len, what) in refs {
        c.inc(off, len, rep, what);
    }
    for msg in bad {
        rep.corrupt(msg);
    }
    let mut l1s = vec![(m.l1_offset, m.l1.clone())];
    for s in m.snapshots.clone() {
        let bytes = u64::from(s.l1_size) * 8;
        if bytes > MAX_L1_BYTES || s.l1_table_offset + bytes > m.io.len() {
            rep.corrupt(format!(
                "snapshot L1 table at {:#x} invalid",
                s.l1_table_offset
            ));
            continue;
        }
        let raw = m.io.read(s.l1_table_offset, bytes as usize).await?;
        let l1 = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .collect();
        l1s.push((s.l1_table_offset, l1));
    }
    for (l1_off, l1) in l1s {
        c.inc(l1_off, l1.len() as u64 * 8, rep, "L1 table");
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % cs != 0 {
                rep.corrupt(format!("L2 table offset {l2:#x} unaligned (L1 index {i})"));
                continue;
            }
            if l2 >= m.io.len() {
                rep.corrupt(format!(
                    "L2 table at {l2:#x} lies beyond the end of the file"
                ));
                continue;
            }
            c.inc(l2, cs, rep, "L2 table");
            let entries = m.l2_table(l2).await?;
            for (j, &le) in entries.iter().enumerate() {
                match m.geo.classify(le) {
                    Ok(Cluster::Normal { host, .. }) | Ok(Cluster::ZeroAlloc { host, .. }) => {
                        c.inc(host, cs, rep, "data cluster")
                    }
                    Ok(Cluster::Compressed {
                        coffset,
                        nb_sectors,
                    }) => {
                        let (off, n) = m.geo.compressed_span(coffset, nb_sectors);
                        c.inc(off, n * cs, rep, "compressed cluster");
                    }
                    Ok(_) => {}
                    Err(e) => rep.corrupt(format!("L2 entry {i}/{j}: {e}")),
                }
            }
        }
    }
    Ok(c)
}

/// Compares refcounts with references, like `qemu-img check` (without
/// changing anything).
pub(crate) async fn check(m: &mut Meta) -> io::Result<CheckReport> {
    let mut rep = CheckReport::default();
    let counts = count_references(m, &mut rep, true).await?;
    let coverage = m.rc.table.len() as u64 * m.rc.epb();
    let n = (counts.v.len() as u64).max(coverage.min(counts.v.len() as u64 + m.rc.epb()));
    for cl in 0..n {
        let expected = u64::from(counts.v.get(cl as usize).copied().unwrap_or(0));
        let stored = m.rc.get(&m.io, cl).await?;
        if stored < expected {
            rep.corrupt(format!(
                "ERROR cluster {cl} refcount={stored} reference={expected}"
            ));
        } else if stored > expected {
            rep.leaks += 1;
        }
    }
    // COPIED flags of the active tables must match refcount == 1.
    let l1 = m.l1.clone();
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 || l2 % m.geo.cs != 0 || l2 >= m.io.len() {
            continue;
        }
        let rc = m.rc.get(&m.io, l2 >> m.geo.cluster_bits).await?;
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            rep.corrupt(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} refcount={rc}"
            ));
        }
        for (j, le) in m.l2_table(l2).await?.into_iter().enumerate() {
            if let Ok(Cluster::Normal { host, copied }) | Ok(Cluster::ZeroAlloc { host, copied }) =
                m.geo.classify(le)
            {
                let rc = m.rc.get(&m.io, host >> m.geo.cluster_bits).await?;
                if (rc == 1) != copied {
                    rep.corrupt(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={le:x} (l1 {i} l2 {j}) refcount={rc}"
                    ));
                }
            }
        }
    }
    Ok(rep)
}

/// Rebuilds the refcount structure from the references (repair of a
/// dirty image). See the module docs for why it is crash safe.
pub(crate) async fn rebuild_refcounts(m: &mut Meta) -> io::Result<()> {
    m.write_back(true).await?;
    let mut rep = CheckReport::default();
    let counts = count_references(m, &mut rep, false).await?;
    if rep.corruptions > 0 {
        return Err(corrupt(format!(
            "image metadata is corrupt: {}",
            rep.messages.join("; ")
        )));
    }
    let cs = m.geo.cs;
    let epb = m.rc.epb();
    let order = m.rc.order;
    let p = counts.v.len() as u64;
    let (mut rb, mut tc) = (1u64, 1u64);
    loop {
        let total = p + rb + tc;
        let nrb = total.div_ceil(epb);
        let ntc = (nrb * 8).div_ceil(cs).max(1);
        if nrb == rb && ntc == tc {
            break;
        }
        rb = nrb;
        tc = ntc;
    }
    if tc * cs > MAX_REFTABLE_BYTES {
        return Err(io::Error::other(
            "refcount table would exceed its maximum size",
        ));
    }
    let total = p + rb + tc;
    let max = max_refcount(order);
    // Refcount blocks, written in batches of up to 1 MiB.
    let per_batch = ((1u64 << 20) / cs).max(1);
    let mut j = 0;
    while j < rb {
        let n = per_batch.min(rb - j);
        let mut buf = vec![0u8; (n * cs) as usize];
        for k in 0..n {
            let block = &mut buf[(k * cs) as usize..((k + 1) * cs) as usize];
            let first = (j + k) * epb;
            for cl in first..(first + epb).min(total) {
                let v = if cl < p {
                    u64::from(counts.v[cl as usize])
                } else {
                    1
                };
                if v > max {
                    return Err(io::Error::other(format!(
                        "refcount of cluster {cl} overflows"
                    )));
                }
                if v != 0 {
                    set_entry(block, order, (cl - first) as usize, v);
                }
            }
        }
        m.io.write((p + j) * cs, buf).await?;
        j += n;
    }
    let mut table = vec![0u64; (tc * cs / 8) as usize];
    let mut tbytes = vec![0u8; (tc * cs) as usize];
    for (k, t) in table.iter_mut().enumerate().take(rb as usize) {
        *t = (p + k as u64) * cs;
        tbytes[k * 8..k * 8 + 8].copy_from_slice(&t.to_be_bytes());
    }
    let table_off = (p + rb) * cs;
    m.io.write(table_off, tbytes).await?;
    m.io.sync().await?;
    let mut hdr = table_off.to_be_bytes().to_vec();
    hdr.extend_from_slice(&(tc as u32).to_be_bytes());
    m.io.write(OFF_REFTABLE, hdr).await?;
    m.io.sync().await?;
    m.rc.table = table;
    m.rc.table_offset = table_off;
    m.rc.table_clusters = tc;
    m.rc.cache.clear();
    m.rc.free_hint = 0;
    Ok(())
}
