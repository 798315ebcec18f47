//! `qcow2`: QEMU's copy-on-write image format, versions 2 and 3
//! (compat 0.10 and 1.1), interchangeable with `qemu-img`/`qemu-io`.
//!
//! * [`header`] — the header and its extensions (pure parsing, and
//!   writing them back as QEMU lays them out).
//! * `backing` — changing the backing file the header records
//!   (`change_backing_file`: the header rewritten in one write, then a
//!   flush; see its docs).
//! * `cache` — the bounded write-back cache of L2 tables and refcount blocks.
//! * `refcount` — refcounts and the cluster allocator.
//! * `meta` — L1/L2 lookups and updates, and the order in which metadata
//!   reaches the disk (crash safety; see its docs).
//! * `rw` — the request paths: reads through the backing chain,
//!   allocating writes with copy-on-write, zeroes, discard, block status.
//! * `snapshot` — internal snapshots: the table's entries, taking and
//!   deleting them (the metadata side in `meta/snapshot.rs`).
//! * [`check`] — the consistency check and the refcount repair of dirty
//!   images.
//! * [`create`] — writing a new image (`blockdev-create`).
//! * [`bitmaps`] — persistent dirty bitmaps (the bitmaps extension):
//!   loaded at open, stored at close through the bitmap source the core
//!   registers (`set_bitmap_source`), removed on demand.
//!
//! Supported: clusters of 512 B to 2 MiB, any refcount width (1–64 bits),
//! zero clusters, reading zlib-compressed clusters, lazy refcounts, internal
//! snapshots (taken and deleted; shared clusters are copied on write), backing
//! files, persistent dirty bitmaps (the image side; the in-memory bitmaps
//! are the core's). Refused with a clear error: encryption, external data files,
//! extended L2 entries (subclusters), zstd compression, unknown
//! incompatible features.
//!
//! Concurrency: metadata is behind one async mutex, held only for table
//! lookups and updates, never during guest data I/O. Clusters being
//! allocated are recorded, so two writes into the same new cluster never
//! both allocate (the second waits, then writes in place). Freed clusters
//! become reusable only at a flush, while no guest I/O is in flight
//! (the `reuse` lock), so an in-flight read never sees a cluster reused.

pub mod bitmaps;
pub mod check;
pub mod create;
pub mod header;

mod backing;
mod cache;
mod meta;
mod refcount;
mod reopen;
mod rw;
mod snapshot;

#[cfg(test)]
mod backing_tests;
#[cfg(test)]
mod bitmaps_tests;
#[cfg(test)]
mod interop_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reopen::Settings;

use blockd_core::driver::{FinishFuture, PrepareFuture};
use blockd_core::perm::default_perms;
use blockd_core::stored_bitmap::BitmapFuture;
use blockd_core::{
    BitmapSource, BlockDriver, BlockError, BlockStatus, Child, ChildRef, ChildRole, Children,
    DriverInfo, IoFuture, IoLimits, PermPair, ReopenRequest, ReqFlags, Staged, StoredBitmap,
};
use bytes::Bytes;

use crate::open::OpenCtx;
use crate::options::Qcow2Options;
use header::{ImageHeader, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE};
use header::{AUTOCLEAR_MASK, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use meta::Meta;
use refcount::{Refcounts, REFT_OFFSET_MASK};

/// A metadata inconsistency found on the data path (logged, and returned
/// as an I/O error).
pub(crate) fn corrupt(msg: impl Into<String>) -> io::Error {
    let msg = msg.into();
    tracing::error!("qcow2: {msg}");
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("qcow2 image is corrupt: {msg}"),
    )
}

/// Access to the image file child (metadata I/O).
#[derive(Clone)]
pub struct FileIo {
    file: ChildRef,
}

impl FileIo {
    async fn read(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        Ok(self.file.node().read(off, len).await?.to_vec())
    }

    async fn write(&self, off: u64, data: Vec<u8>) -> io::Result<()> {
        self.file
            .node()
            .write(off, Bytes::from(data), ReqFlags::default())
            .await
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.node().flush().await
    }

    async fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.file.node().discard(off, len).await
    }

    fn len(&self) -> u64 {
        self.file.node().length()
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.node().truncate(len).await
    }
}

/// Cluster geometry of an image.
#[derive(Debug, Clone, Copy)]
pub struct Geo {
    cluster_bits: u32,
    cs: u64,
    l2_bits: u32,
    version: u32,
    size: u64,
    csize_shift: u32,
    csize_mask: u64,
    cluster_offset_mask: u64,
}

impl Geo {
    fn new(cluster_bits: u32, version: u32, size: u64) -> Geo {
        let csize_shift = 62 - (cluster_bits - 8);
        Geo {
            cluster_bits,
            cs: 1 << cluster_bits,
            l2_bits: cluster_bits - 3,
            version,
            size,
            csize_shift,
            csize_mask: (1 << (cluster_bits - 8)) - 1,
            cluster_offset_mask: (1 << csize_shift) - 1,
        }
    }
}

/// The backing file name and format the header records.
#[derive(Debug, Clone, Default)]
struct Recorded {
    file: Option<String>,
    format: Option<String>,
}

/// What queries show: fixed at open, but for the backing file names,
/// which [`BlockDriver::change_backing_file`] changes.
#[derive(Debug)]
struct Shown {
    backing: Mutex<Recorded>,
    version: u32,
    lazy_bit: bool,
    corrupt: bool,
    refcount_bits: u64,
    /// The internal snapshots, as the block layer shows them.
    snapshots: Mutex<Vec<blockd_core::snapshot::SnapshotInfo>>,
}

/// The `qcow2` format driver.
pub struct Qcow2Driver {
    file: ChildRef,
    /// The node's children (the core's list): `backing` is looked up here,
    /// as a reopen may add, change or remove it.
    children: Arc<Children>,
    geo: Geo,
    /// The virtual size (`geo.size` is the size at open; resize changes
    /// this one, and the metadata's copy, under the metadata lock).
    size: AtomicU64,
    /// Shared (`Arc`) so a reopen can hold it from prepare to commit.
    meta: Arc<tokio::sync::Mutex<Meta>>,
    /// Held shared by guest I/O, exclusively while freed clusters become
    /// reusable.
    reuse: tokio::sync::RwLock<()>,
    /// Changed by reopen.
    read_only: AtomicBool,
    dirty: Arc<AtomicBool>,
    shown: Shown,
    /// The last decompressed cluster: (host offset, data).
    decompressed: Mutex<Option<(u64, Bytes)>>,
    /// The bitmaps read at open, until the core takes them.
    loaded_bitmaps: Mutex<Vec<StoredBitmap>>,
    /// What [`BlockDriver::close`] stores.
    bitmap_source: Mutex<Option<BitmapSource>>,
    /// The bitmap directory as on disk, for queries (shared with `meta`).
    bitmap_info: Arc<Mutex<Vec<bitmaps::DirEntry>>>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("cluster_size", &self.geo.cs)
            .field("size", &self.size)
            .finish()
    }
}

/// Checks the options that need no I/O.
pub fn check(o: &Qcow2Options) -> Result<(), BlockError> {
    if o.encrypt.is_some() {
        return Err(BlockError::unsupported(
            "blockd does not support encrypted qcow2 images ('encrypt')",
        ));
    }
    if o.data_file.is_some() {
        return Err(BlockError::unsupported(
            "blockd does not support qcow2 external data files ('data-file')",
        ));
    }
    // QEMU's runtime options read the numbers QMP gave as strings: the
    // cache sizes as QemuOpts sizes (negative ones out of range), the
    // interval as a QemuOpts number (where -1 wraps, and is too big).
    use blockd_optval::qemu_opts;
    for (name, v) in [
        ("cache-size", o.cache_size),
        ("l2-cache-size", o.l2_cache_size),
        ("l2-cache-entry-size", o.l2_cache_entry_size),
        ("refcount-cache-size", o.refcount_cache_size),
    ] {
        if let Some(v) = v {
            qemu_opts::parse_size(name, &v.to_string()).map_err(BlockError::invalid)?;
        }
    }
    if let Some(v) = o.cache_clean_interval {
        let secs = qemu_opts::parse_number("cache-clean-interval", &v.to_string())
            .map_err(BlockError::invalid)?;
        if secs > u64::from(u32::MAX) {
            return Err(BlockError::invalid("Cache clean interval too big"));
        }
    }
    Ok(())
}

/// QEMU's `read_cache_sizes`: (L2 cache bytes, refcount cache bytes).
fn cache_sizes(o: &Qcow2Options, cs: u64, size: u64) -> Result<(u64, u64), BlockError> {
    const DEFAULT_L2_MAX: u64 = 32 << 20;
    let max_l2 = (size.div_ceil(cs) * 8).div_ceil(cs) * cs;
    let min_rc = 4 * cs;
    let l2 = o.l2_cache_size.map(|v| v as u64);
    let rc = o.refcount_cache_size.map(|v| v as u64);
    let (l2, rc) =
        match (o.cache_size.map(|v| v as u64), l2, rc) {
            (Some(_), Some(_), Some(_)) => return Err(BlockError::invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            )),
            (Some(c), Some(l), None) if l > c => {
                return Err(BlockError::invalid(
                    "l2-cache-size may not exceed cache-size",
                ))
            }
            (Some(c), Some(l), None) => (l, c - l),
            (Some(c), None, Some(r)) if r > c => {
                return Err(BlockError::invalid(
                    "refcount-cache-size may not exceed cache-size",
                ))
            }
            (Some(c), None, Some(r)) => (c - r, r),
            (Some(c), None, None) if c >= max_l2 + min_rc => (max_l2, c - max_l2),
            (Some(c), None, None) => {
                let r = c.min(min_rc);
                (c - r, r)
            }
            (None, l, r) => (
                l.unwrap_or_else(|| max_l2.min(DEFAULT_L2_MAX)),
                r.unwrap_or(min_rc),
            ),
        };
    if let Some(e) = o.l2_cache_entry_size {
        let e = e as u64;
        if !e.is_power_of_two() || e < 512 || e > cs {
            return Err(BlockError::invalid(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
    }
    if l2 > i32::MAX as u64 {
        return Err(BlockError::invalid("L2 cache size too big"));
    }
    if rc > i32::MAX as u64 {
        return Err(BlockError::invalid("Refcount cache size too big"));
    }
    Ok((l2, rc))
}

fn decode_be64(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Reads the snapshot table entry by entry (bounded by the file length).
async fn read_snapshots(
    io: &FileIo,
    off: u64,
    nb: u32,
) -> Result<(Vec<snapshot::SnapEntry>, u64), BlockError> {
    let mut pos = off;
    let mut out = Vec::new();
    let file_len = io.len();
    let rd = |e| BlockError::io("Could not read snapshot table", e);
    for _ in 0..nb {
        if pos + header::SNAPSHOT_HEADER_SIZE > file_len {
            return Err(BlockError::invalid("Snapshot table is truncated"));
        }
        let h = io.read(pos, 40).await.map_err(rd)?;
        let len = snapshot::SnapEntry::stored_len(&h);
        if pos + len > file_len {
            return Err(BlockError::invalid("Snapshot table is truncated"));
        }
        let whole = io.read(pos, len as usize).await.map_err(rd)?;
        out.push(snapshot::SnapEntry::parse(&whole));
        pos += len;
    }
    Ok((out, pos - off))
}

/// Opens a `qcow2` node. Returns the driver and whether it is read-only.
pub async fn open(
    o: Qcow2Options,
    ctx: &mut OpenCtx<'_>,
) -> Result<(Qcow2Driver, bool), BlockError> {
    check(&o)?;
    let file = ctx
        .open_child(
            "file",
            o.file.clone(),
            ChildRole::DATA | ChildRole::METADATA | ChildRole::PRIMARY,
        )
        .await?;
    let read_only = ctx.node.read_only || file.node().read_only();
    let io = FileIo { file: file.clone() };
    let file_len = io.len();
    let rd = |e| BlockError::io("Could not read qcow2 header", e);
    let start = io.read(0, 512).await.map_err(rd)?;
    let fixed = header::parse_fixed(&start, file_len)?;
    let cs = fixed.cluster_size();
    let first = io
        .read(0, cs.min(file_len).max(512) as usize)
        .await
        .map_err(rd)?;
    let ImageHeader {
        header: h,
        backing_file,
        ext,
    } = header::parse(&first, file_len)?;
    if h.crypt_method != 0 || ext.crypto {
        return Err(BlockError::unsupported(
            "blockd does not support encrypted qcow2 images",
        ));
    }
    if h.incompatible_features & INCOMPAT_DATA_FILE != 0 || ext.data_file.is_some() {
        return Err(BlockError::unsupported(
            "blockd does not support qcow2 images with an external data file",
        ));
    }
    if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
        return Err(BlockError::unsupported(
            "blockd does not support qcow2 images with extended L2 entries (subclusters)",
        ));
    }
    if h.compression_type != 0 {
        return Err(BlockError::unsupported(
            "blockd supports only zlib compression in qcow2 images (this one uses zstd)",
        ));
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only {
        return Err(BlockError::new(
            blockd_core::ErrorKind::Corrupt,
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    let geo = Geo::new(h.cluster_bits, h.version, h.size);
    let lazy_bit = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
    let settings = Settings::from_options(&o, &geo, lazy_bit, ctx.node.discard_unmap)?;
    let l1 = decode_be64(
        &io.read(h.l1_table_offset, h.l1_size as usize * 8)
            .await
            .map_err(|e| BlockError::io("Could not read L1 table", e))?,
    );
    let rt_clusters = u64::from(h.refcount_table_clusters);
    let table: Vec<u64> = decode_be64(
        &io.read(h.refcount_table_offset, (rt_clusters * cs) as usize)
            .await
            .map_err(|e| BlockError::io("Could not initialize refcount handling", e))?,
    )
    .into_iter()
    .map(|e| e & REFT_OFFSET_MASK)
    .collect();
    let (snapshots, snap_len) = if h.nb_snapshots > 0 {
        read_snapshots(&io, h.snapshots_offset, h.nb_snapshots).await?
    } else {
        (Vec::new(), 0)
    };
    let backing = ctx
        .open_backing(
            o.backing.clone(),
            backing_file.as_deref(),
            ext.backing_format.as_deref(),
            &file.node().filename(),
        )
        .await?;
    let dirty = Arc::new(AtomicBool::new(
        h.incompatible_features & INCOMPAT_DIRTY != 0,
    ));
    let rc = Refcounts {
        order: h.refcount_order,
        cluster_bits: h.cluster_bits,
        table,
        table_offset: h.refcount_table_offset,
        table_clusters: rt_clusters,
        cache: cache::TableCache::new(settings.rc_entries),
        free_hint: 0,
    };
    let mut m = Meta::new(
        io.clone(),
        geo,
        l1,
        h.l1_table_offset,
        settings.l2_entries,
        rc,
        h.incompatible_features,
        dirty.clone(),
    );
    settings.apply(&mut m);
    m.has_backing = backing.is_some();
    m.snapshots = snapshots;
    m.snapshot_table = (h.snapshots_offset, snap_len);
    // The bitmaps extension (QEMU's qcow2_read_extensions): a stale one
    // is ignored, and dropped from the header below when writable.
    let mut stale = false;
    if let Some(raw) = ext.kept.iter().find(|e| e.ty == bitmaps::EXT_BITMAPS) {
        match bitmaps::parse_ext(&raw.data, h.autoclear_features, h.version, cs)? {
            bitmaps::ExtState::Valid(b) => m.bitmaps = Some(b),
            bitmaps::ExtState::Stale => stale = true,
        }
    }
    let (loaded, header_updated) = bitmaps::store::load(&mut m, !read_only).await?;
    if !read_only {
        let fail = |what: &str, e: io::Error| BlockError::io(what.to_string(), e);
        if !header_updated {
            // As QEMU: a stale bitmaps extension is dropped, and unknown
            // autoclear bits are cleared (other programs' features are
            // stale once blockd wrote the image).
            let r = if stale {
                bitmaps::store::update_header(&mut m, false).await
            } else if h.autoclear_features & !AUTOCLEAR_MASK != 0 {
                bitmaps::store::clear_unknown_autoclear(&mut m, h.autoclear_features).await
            } else {
                Ok(())
            };
            r.map_err(|e| fail("Could not update qcow2 header", e))?;
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 {
            check::rebuild_refcounts(&mut m)
                .await
                .map_err(|e| fail("Could not repair dirty image", e))?;
            m.mark_clean()
                .await
                .map_err(|e| fail("Could not repair dirty image", e))?;
        }
    }
    let bitmap_info = m.bitmap_info.clone();
    let shown = Shown {
        backing: Mutex::new(Recorded {
            file: backing_file,
            format: ext.backing_format,
        }),
        version: h.version,
        lazy_bit: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
        refcount_bits: 1 << h.refcount_order,
        snapshots: Mutex::new(m.snapshots.iter().map(snapshot::SnapEntry::info).collect()),
    };
    Ok((
        Qcow2Driver {
            file,
            children: ctx.children.clone(),
            geo,
            size: AtomicU64::new(geo.size),
            meta: Arc::new(tokio::sync::Mutex::new(m)),
            reuse: tokio::sync::RwLock::new(()),
            read_only: AtomicBool::new(read_only),
            dirty,
            shown,
            decompressed: Mutex::new(None),
            loaded_bitmaps: Mutex::new(loaded),
            bitmap_info,
            bitmap_source: Mutex::new(None),
        },
        read_only,
    ))
}

impl Qcow2Driver {
    /// Runs the consistency check (like `qemu-img check`, read-only).
    pub async fn check(&self) -> io::Result<check::CheckReport> {
        let mut m = self.meta.lock().await;
        m.write_back(false).await.ok();
        check::check(&mut m).await
    }

    fn file_io(&self) -> FileIo {
        FileIo {
            file: self.file.clone(),
        }
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn limits(&self) -> IoLimits {
        IoLimits {
            request_alignment: 1,
            max_transfer: 0,
            pwrite_zeroes_alignment: self.geo.cs as u32,
            pdiscard_alignment: self.geo.cs as u32,
        }
    }

    fn length(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn info(&self) -> DriverInfo {
        let s = &self.shown;
        let backing = s.backing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let data = if s.version >= 3 {
            let mut d = serde_json::json!({
                "compat": "1.1",
                "compression-type": "zlib",
                "lazy-refcounts": s.lazy_bit,
            });
            // As stored on disk (QEMU's qcow2_get_bitmap_info_list).
            let list = self.bitmap_info.lock().unwrap_or_else(|e| e.into_inner());
            if !list.is_empty() {
                d["bitmaps"] = bitmaps::info_list(&list);
            }
            d["refcount-bits"] = s.refcount_bits.into();
            d["corrupt"] = s.corrupt.into();
            d["extended-l2"] = false.into();
            d
        } else {
            serde_json::json!({
                "compat": "0.10",
                "compression-type": "zlib",
                "refcount-bits": s.refcount_bits,
            })
        };
        DriverInfo {
            cluster_size: Some(self.geo.cs),
            dirty: Some(self.dirty.load(Ordering::Acquire)),
            format_specific: Some(serde_json::json!({"type": "qcow2", "data": data})),
            backing_filename: backing.file,
            backing_format: backing.format,
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.do_read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(self.do_write(offset, data, flags.fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(self.do_write_zeroes(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.do_discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.do_flush())
    }

    fn start_writeback(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.node().start_writeback().await })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.do_block_status(offset, len))
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.do_truncate(len))
    }

    fn snapshots(&self) -> Option<Vec<blockd_core::snapshot::SnapshotInfo>> {
        Some(
            self.shown
                .snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn snapshot_create(
        &self,
        sn: blockd_core::snapshot::SnapshotInfo,
    ) -> IoFuture<'_, blockd_core::snapshot::SnapshotInfo> {
        Box::pin(self.do_snapshot_create(sn))
    }

    fn snapshot_delete<'a>(
        &'a self,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> IoFuture<'a, blockd_core::snapshot::SnapshotInfo> {
        Box::pin(self.do_snapshot_delete(id, name))
    }

    fn child_perm(&self, child: &Child, parent: PermPair, writable: bool) -> PermPair {
        default_perms(child.role(), parent, writable)
    }

    fn change_backing_file<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.do_change_backing_file(name, format))
    }

    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        Box::pin(self.prepare_reopen(req))
    }

    fn reopen_commit(&self, staged: Staged) {
        self.commit_reopen(staged);
    }

    fn reopen_abort(&self, staged: Staged) {
        self.abort_reopen(staged);
    }

    fn reopen_finish(&self) -> FinishFuture<'_> {
        Box::pin(self.finish_reopen())
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only.load(Ordering::Acquire) {
                return Ok(());
            }
            let source = self
                .bitmap_source
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let mut m = self.meta.lock().await;
            if let Some(source) = source {
                // QEMU's qcow2_inactivate: a failure loses the bitmaps
                // (they stay marked in use), not the close.
                if let Err(e) = bitmaps::store::store(&mut m, &source()).await {
                    tracing::error!("Lost persistent bitmaps during inactivation of node: {e}");
                }
            }
            m.close().await
        })
    }

    fn take_loaded_bitmaps(&self) -> Vec<StoredBitmap> {
        std::mem::take(
            &mut *self
                .loaded_bitmaps
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    fn can_store_new_bitmap(
        &self,
        node_name: &str,
        name: &str,
        granularity: u64,
        existing: &[&str],
    ) -> Result<(), BlockError> {
        bitmaps::can_store_new(
            self.geo.version,
            node_name,
            name,
            granularity,
            existing,
            self.geo.size,
            self.geo.cs,
        )
    }

    fn store_bitmaps<'a>(&'a self, list: &'a [StoredBitmap]) -> BitmapFuture<'a, ()> {
        Box::pin(async move {
            let mut m = self.meta.lock().await;
            if self.read_only.load(Ordering::Acquire) && list.iter().any(|b| !b.inconsistent) {
                return Err(BlockError::new(
                    blockd_core::ErrorKind::PermissionConflict,
                    "No write access",
                ));
            }
            bitmaps::store::store(&mut m, list).await
        })
    }

    fn remove_persistent_bitmap<'a>(&'a self, name: &'a str) -> BitmapFuture<'a, ()> {
        Box::pin(async move {
            let mut m = self.meta.lock().await;
            if self.read_only.load(Ordering::Acquire) && m.bitmaps.is_some() {
                return Err(BlockError::new(
                    blockd_core::ErrorKind::PermissionConflict,
                    "Failed to update bitmap extension: Operation not permitted",
                ));
            }
            bitmaps::store::remove(&mut m, name).await
        })
    }

    fn set_bitmap_source(&self, source: Option<BitmapSource>) {
        *self.bitmap_source.lock().unwrap_or_else(|e| e.into_inner()) = source;
    }
}
