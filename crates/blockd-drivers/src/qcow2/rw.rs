//! The request paths of the qcow2 driver.
//!
//! * Reads map the range under the metadata lock, then read each extent
//!   from the image file, the backing node (zeroes without one, and beyond
//!   its end) or a decompressed cluster.
//! * Writes go in runs: clusters allocated with refcount 1 are written in
//!   place; the others get new host clusters, filled with the request's
//!   data plus the copy-on-write of the partial head and tail clusters
//!   (from the backing file, the old cluster, or zeroes), and are linked
//!   into the L2 table only after that data is written.
//! * Write-zeroes and discard change whole clusters' L2 entries; partial
//!   clusters are written with zeroes (write-zeroes) or left alone
//!   (discard, which is advisory).

use std::io;

use blockd_core::{BlockStatus, ReqFlags};
use bytes::{Bytes, BytesMut};
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::meta::{Cluster, RunStatus, Source, WritePlan, MAX_PENDING_FREES};
use super::{corrupt, Qcow2Driver};

/// Inflates a raw deflate stream (QEMU's zlib compression type, window
/// bits -12) into exactly `cs` bytes.
pub(crate) fn inflate(input: &[u8], cs: usize) -> io::Result<Vec<u8>> {
    let mut d = DecompressorOxide::new();
    let mut out = vec![0u8; cs];
    let (status, _, n) = decompress(
        &mut d,
        input,
        &mut out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput if n == cs => {
            Ok(out)
        }
        _ => Err(corrupt(format!(
            "compressed cluster does not inflate to a cluster ({status:?}, {n} bytes)"
        ))),
    }
}

async fn wait(n: std::sync::Arc<tokio::sync::Notify>, guard: impl Sized) {
    let notified = n.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    drop(guard);
    notified.await;
}

impl Qcow2Driver {
    async fn read_backing(&self, off: u64, len: usize) -> io::Result<Bytes> {
        match self.children.node("backing") {
            Some(b) => b.read(off, len).await,
            None => Ok(Bytes::from(vec![0u8; len])),
        }
    }

    async fn read_compressed(&self, coffset: u64, nb_sectors: u64) -> io::Result<Bytes> {
        if let Some((o, d)) = &*self.decompressed.lock().unwrap_or_else(|e| e.into_inner()) {
            if *o == coffset {
                return Ok(d.clone());
            }
        }
        let csize = nb_sectors * 512 - (coffset & 511);
        let raw = self.file.node().read(coffset, csize as usize).await?;
        let data = Bytes::from(inflate(&raw, self.geo.cs as usize)?);
        *self.decompressed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((coffset, data.clone()));
        Ok(data)
    }

    pub(super) async fn do_read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let _reuse = self.reuse.read().await;
        let extents = self.meta.lock().await.map_read(offset, len as u64).await?;
        if let [(_, Source::Host(h))] = extents.as_slice() {
            return self.file.node().read(*h, len).await;
        }
        let mut out = BytesMut::with_capacity(len);
        let mut pos = offset;
        for (n, src) in extents {
            match src {
                Source::Host(h) => {
                    out.extend_from_slice(&self.file.node().read(h, n as usize).await?)
                }
                Source::Zero => out.resize(out.len() + n as usize, 0),
                Source::Backing => {
                    out.extend_from_slice(&self.read_backing(pos, n as usize).await?)
                }
                Source::Compressed {
                    coffset,
                    nb_sectors,
                    intra,
                } => {
                    let c = self.read_compressed(coffset, nb_sectors).await?;
                    out.extend_from_slice(&c[intra as usize..(intra + n) as usize]);
                }
            }
            pos += n;
        }
        Ok(out.freeze())
    }

    /// The current content of `n` bytes at guest offset `off` inside a
    /// cluster whose L2 entry is `entry` (copy-on-write source).
    async fn cow_read(&self, off: u64, n: u64, entry: u64) -> io::Result<Bytes> {
        let intra = off & (self.geo.cs - 1);
        match self.geo.classify(entry)? {
            Cluster::Unallocated => self.read_backing(off, n as usize).await,
            Cluster::ZeroPlain | Cluster::ZeroAlloc { .. } => {
                Ok(Bytes::from(vec![0u8; n as usize]))
            }
            Cluster::Normal { host, .. } => self.file.node().read(host + intra, n as usize).await,
            Cluster::Compressed {
                coffset,
                nb_sectors,
            } => {
                let c = self.read_compressed(coffset, nb_sectors).await?;
                Ok(c.slice(intra as usize..(intra + n) as usize))
            }
        }
    }

    /// Writes the data of an allocating run to its new host clusters,
    /// with the copy-on-write of the partial first and last clusters.
    async fn fill(
        &self,
        off: u64,
        data: Bytes,
        gc: u64,
        count: u64,
        host: u64,
        old: &[u64],
    ) -> io::Result<()> {
        let cb = self.geo.cluster_bits;
        let run_start = gc << cb;
        let run_end = (gc + count) << cb;
        let head = off - run_start;
        let tail = run_end - (off + data.len() as u64);
        let buf = if head == 0 && tail == 0 {
            data
        } else {
            let mut b = BytesMut::with_capacity((run_end - run_start) as usize);
            if head > 0 {
                b.extend_from_slice(&self.cow_read(run_start, head, old[0]).await?);
            }
            b.extend_from_slice(&data);
            if tail > 0 {
                let end = off + data.len() as u64;
                b.extend_from_slice(&self.cow_read(end, tail, old[count as usize - 1]).await?);
            }
            b.freeze()
        };
        self.file.node().write(host, buf, ReqFlags::default()).await
    }

    /// One run of a write; returns the bytes it covered.
    async fn write_run(&self, off: u64, data: &Bytes) -> io::Result<u64> {
        loop {
            let mut m = self.meta.lock().await;
            match m.plan_write(off, data.len() as u64).await? {
                WritePlan::Wait(n) => wait(n, m).await,
                WritePlan::InPlace { host, len } => {
                    drop(m);
                    let part = data.slice(..len as usize);
                    self.file
                        .node()
                        .write(host, part, ReqFlags::default())
                        .await?;
                    return Ok(len);
                }
                WritePlan::Alloc {
                    gc,
                    count,
                    old,
                    reuse,
                    len,
                } => {
                    let host = match reuse {
                        Some(h) => h,
                        None => match m.alloc_clusters(count).await {
                            Ok(h) => h,
                            Err(e) => {
                                m.end_inflight(gc);
                                return Err(e);
                            }
                        },
                    };
                    drop(m);
                    let filled = self
                        .fill(off, data.slice(..len as usize), gc, count, host, &old)
                        .await;
                    let mut m = self.meta.lock().await;
                    let r = match filled {
                        Ok(()) => m.link(gc, count, host, reuse.is_some()).await,
                        Err(e) => {
                            if reuse.is_none() {
                                // Referenced by nothing: release at once.
                                let io = m.io.clone();
                                let _ = m.rc.change(&io, host, count, -1).await;
                            }
                            Err(e)
                        }
                    };
                    m.end_inflight(gc);
                    return r.map(|()| len);
                }
            }
        }
    }

    fn check_bounds(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    pub(super) async fn do_write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check_bounds(offset, data.len() as u64)?;
        let busy = {
            let _reuse = self.reuse.read().await;
            let mut pos = 0u64;
            while pos < data.len() as u64 {
                let rest = data.slice(pos as usize..);
                pos += self.write_run(offset + pos, &rest).await?;
            }
            self.meta.lock().await.pending_frees() > MAX_PENDING_FREES
        };
        if fua || busy {
            self.do_flush().await?;
        }
        Ok(())
    }

    pub(super) async fn do_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        self.check_bounds(offset, len)?;
        let cs = self.geo.cs;
        if self.geo.version < 3 {
            if flags.no_fallback {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            return self.write_zero_buffers(offset, len, flags.fua).await;
        }
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let b = end / cs * cs;
        if a >= b {
            return self.write_zero_buffers(offset, len, flags.fua).await;
        }
        if a > offset {
            self.write_zero_buffers(offset, a - offset, false).await?;
        }
        let gc = a / cs;
        let count = (b - a) / cs;
        loop {
            let mut m = self.meta.lock().await;
            match m.zero_clusters(gc, count, flags.may_unmap).await? {
                Some(n) => wait(n, m).await,
                None => break,
            }
        }
        if end > b {
            self.write_zero_buffers(b, end - b, false).await?;
        }
        if flags.fua {
            self.do_flush().await?;
        }
        Ok(())
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = Bytes::from(vec![0u8; len.min(CHUNK) as usize]);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.do_write(offset + done, zeroes.slice(..n as usize), false)
                .await?;
            done += n;
        }
        if fua {
            self.do_flush().await?;
        }
        Ok(())
    }

    pub(super) async fn do_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_bounds(offset, len)?;
        let cs = self.geo.cs;
        let a = offset.div_ceil(cs) * cs;
        // A partial last cluster at the end of the image may go too.
        let end = if offset + len >= self.size() {
            (offset + len).div_ceil(cs) * cs
        } else {
            offset + len
        };
        let b = end / cs * cs;
        if a >= b {
            return Ok(());
        }
        loop {
            let mut m = self.meta.lock().await;
            match m.discard_clusters(a / cs, (b - a) / cs).await? {
                Some(n) => wait(n, m).await,
                None => break,
            }
        }
        let busy = self.meta.lock().await.pending_frees() > MAX_PENDING_FREES;
        if busy {
            self.do_flush().await?;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes the virtual size (QEMU's `qcow2_co_truncate`, without
    /// preallocation). The core serialises it against every request past
    /// the smaller size. With a backing file, a grown area reads as zeroes
    /// (QEMU's `BDRV_REQ_ZERO_WRITE` for it), not as the backing file.
    pub(super) async fn do_truncate(&self, len: u64) -> io::Result<()> {
        if len % 512 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size must be a multiple of 512",
            ));
        }
        let old = self.size();
        {
            let mut m = self.meta.lock().await;
            if !m.snapshots.is_empty() && self.geo.version < 3 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Can't resize a v2 image which has snapshots",
                ));
            }
            m.resize(len).await?;
            self.size.store(len, std::sync::atomic::Ordering::Release);
        }
        // Applies the frees a shrink queued.
        self.do_flush().await?;
        if len < old {
            self.meta.lock().await.cut_file_tail().await?;
        }
        if len > old && self.children.node("backing").is_some() {
            self.do_write_zeroes(old, len - old, ReqFlags::default())
                .await?;
        }
        Ok(())
    }

    pub(super) async fn do_flush(&self) -> io::Result<()> {
        if self.read_only.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let frees = {
            let mut m = self.meta.lock().await;
            m.write_back(false).await?;
            m.take_frees()
        };
        if !frees.is_empty() {
            // No guest I/O may use a cluster while it becomes reusable.
            let _excl = self.reuse.write().await;
            self.meta.lock().await.apply_frees(frees).await?;
        }
        Ok(())
    }

    pub(super) async fn do_block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let (n, st) = self.meta.lock().await.run_status(offset, len).await?;
        let n = n.clamp(1, len);
        Ok(match st {
            RunStatus::Data => BlockStatus {
                len: n,
                data: true,
                zero: false,
                allocated: true,
            },
            RunStatus::Zero => BlockStatus {
                len: n,
                data: false,
                zero: true,
                allocated: true,
            },
            RunStatus::Unallocated => match self.children.node("backing") {
                Some(b) => {
                    let s = b.block_status(offset, n).await?;
                    BlockStatus {
                        len: s.len.clamp(1, n),
                        data: s.data,
                        zero: s.zero,
                        allocated: false,
                    }
                }
                None => BlockStatus {
                    len: n,
                    data: false,
                    zero: true,
                    allocated: false,
                },
            },
        })
    }
}
