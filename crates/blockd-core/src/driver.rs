//! The driver trait: what every block driver implements.
//!
//! Drivers are dumb on purpose. The core's request layer
//! ([`crate::node::BlockNode`]) checks bounds, pads unaligned requests with
//! read-modify-write, serialises overlapping requests that need it and
//! counts statistics; a driver only ever sees requests aligned to its
//! [`IoLimits::request_alignment`] and within its length. Data moves as
//! [`Bytes`]: reads return a buffer, writes take one, and a layer that does
//! not change data passes the same buffer on without copying it.
//!
//! Drivers with children (formats, filters) reach them only through the
//! edges the core holds ([`crate::edge`]): the node's [`Children`] list,
//! shared with the driver at open, and [`ChildRef`] handles from it. The
//! core can retarget an edge (commit, mirror, reopen) or add and remove
//! one (a reopen that changes `backing`) while the driver keeps working.
//!
//! Reopen ([`crate::reopen`]) is a three-step protocol per driver:
//! [`BlockDriver::reopen_prepare`] checks the new options and stages what
//! it needs (it may read, and may flush when the node stops being
//! writable, but must not otherwise write: write permissions are settled
//! only after every node prepared); then exactly one of
//! [`BlockDriver::reopen_commit`] (infallible) or
//! [`BlockDriver::reopen_abort`]; after a commit that made the node
//! writable, [`BlockDriver::reopen_finish`] does the writes that needed the
//! permissions (qcow2's repair of a dirty image).

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use serde_json::Value;

pub use crate::edge::{Child, ChildRef, Children};
use crate::error::BlockError;
use crate::perm::{filter_default, PermPair};
use crate::reopen::ReopenRequest;
use crate::stored_bitmap::{BitmapFuture, BitmapSource, StoredBitmap};

/// A boxed, sendable I/O future borrowing the driver.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// What a driver staged in [`BlockDriver::reopen_prepare`], handed back to
/// its commit or abort.
pub type Staged = Box<dyn Any + Send + Sync>;

/// The future of [`BlockDriver::reopen_prepare`].
pub type PrepareFuture<'a> = Pin<Box<dyn Future<Output = Result<Staged, BlockError>> + Send + 'a>>;

/// The future of [`BlockDriver::reopen_finish`].
pub type FinishFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BlockError>> + Send + 'a>>;

/// Flags of a write-like request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReqFlags {
    /// Force unit access: the data is on stable storage when the request completes.
    pub fua: bool,
    /// For write-zeroes: the range may be deallocated (punched) instead of written.
    pub may_unmap: bool,
    /// For write-zeroes: fail with ENOTSUP rather than write zeroes slowly.
    pub no_fallback: bool,
}

/// Alignment and size limits a driver declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoLimits {
    /// Requests are multiples of this and start at multiples of it (a power of two).
    pub request_alignment: u32,
    /// Largest read or write in one request (0: no limit).
    pub max_transfer: u32,
    /// Preferred granularity for write-zeroes (0: any).
    pub pwrite_zeroes_alignment: u32,
    /// Granularity of discard (0: any).
    pub pdiscard_alignment: u32,
}

impl Default for IoLimits {
    fn default() -> Self {
        IoLimits {
            request_alignment: 1,
            max_transfer: 0,
            pwrite_zeroes_alignment: 0,
            pdiscard_alignment: 0,
        }
    }
}

/// What a range of a node holds, QEMU's `BDRV_BLOCK_*` reduced to what
/// clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that this status applies to (> 0).
    pub len: u64,
    /// Reads return data from this layer or below (not a hole).
    pub data: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// The range is allocated in this layer (not passed to the backing file).
    pub allocated: bool,
}

/// Image information a driver reports for queries.
#[derive(Debug, Clone, Default)]
pub struct DriverInfo {
    /// Cluster size, for formats that have clusters.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty (qcow2 lazy refcounts).
    pub dirty: Option<bool>,
    /// `format-specific` member of ImageInfo.
    pub format_specific: Option<Value>,
    /// Backing file name as recorded in the image header.
    pub backing_filename: Option<String>,
    /// Backing format as recorded in the image header.
    pub backing_format: Option<String>,
}

/// A block driver instance (one per node).
///
/// All offsets and lengths are in bytes. Every request a driver receives is
/// aligned to its `request_alignment` and lies within `length()`, except
/// `truncate`.
pub trait BlockDriver: Send + Sync + 'static {
    /// The driver name (`file`, `raw`, `null-co`, ...), as `drv` in queries.
    fn format_name(&self) -> &'static str;

    /// Alignment and size limits.
    fn limits(&self) -> IoLimits {
        IoLimits::default()
    }

    /// Current length in bytes.
    fn length(&self) -> u64;

    /// The file name the node shows (`file` in queries). Formats and filters
    /// return `None` and show their primary child's.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Bytes the image occupies on disk (`actual-size`), for protocol drivers.
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// Format information for queries.
    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }

    /// Whether the node is a filter (its data is its primary child's).
    fn is_filter(&self) -> bool {
        false
    }

    /// Whether the format can have a backing node (QEMU's
    /// `supports_backing`): what `blockdev-snapshot` asks of an overlay.
    fn supports_backing(&self) -> bool {
        false
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes>;

    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()>;

    /// Makes `len` bytes at `offset` read as zeroes. The default writes a
    /// buffer of zeroes (or refuses when `no_fallback` is set).
    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if flags.no_fallback {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            const CHUNK: u64 = 1 << 20;
            let zeroes = Bytes::from(vec![0u8; len.min(CHUNK) as usize]);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK);
                self.write(offset + done, zeroes.slice(..n as usize), flags)
                    .await?;
                done += n;
            }
            Ok(())
        })
    }

    /// Discards (unmaps) a range: advisory, the default does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Makes completed writes stable.
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Starts writing back what completed writes left in caches, without
    /// waiting for it (Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)`):
    /// a hint that leaves a later flush less to do. Format drivers pass it
    /// to their data child; the default does nothing. Not a flush: nothing
    /// is stable when it returns.
    fn start_writeback(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// What the range starting at `offset` holds (at most `len` bytes).
    /// The default: data, allocated, everywhere.
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: true,
                zero: false,
                allocated: true,
            })
        })
    }

    /// The internal snapshots in the image, oldest first; `None` for a
    /// driver that cannot keep any (QEMU's `bdrv_can_snapshot` is false).
    fn snapshots(&self) -> Option<Vec<crate::snapshot::SnapshotInfo>> {
        None
    }

    /// Takes an internal snapshot of the current state named `sn.name`
    /// with `sn`'s times (QEMU's `bdrv_snapshot_create`); returns it with
    /// the id the image gave it. The caller drains the node.
    fn snapshot_create(
        &self,
        sn: crate::snapshot::SnapshotInfo,
    ) -> IoFuture<'_, crate::snapshot::SnapshotInfo> {
        let _ = sn;
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Deletes the internal snapshot with this id and/or name (QEMU's
    /// `bdrv_snapshot_delete`); returns what it was. The caller drains
    /// the node.
    fn snapshot_delete<'a>(
        &'a self,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> IoFuture<'a, crate::snapshot::SnapshotInfo> {
        let _ = (id, name);
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Changes the length.
    fn truncate(&self, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Permissions this node takes on `child`, given its own cumulative
    /// permissions. The default is a filter's: pass everything through.
    fn child_perm(&self, _child: &Child, parent: PermPair, _writable: bool) -> PermPair {
        filter_default(parent)
    }

    /// Applies the node's new cumulative permissions (the `file` driver
    /// takes or drops image locks here). On error nothing changed.
    fn set_perm(&self, _perm: PermPair) -> Result<(), BlockError> {
        Ok(())
    }

    /// Called once when the node leaves the graph: flush and release.
    fn close(&self) -> IoFuture<'_, ()> {
        self.flush()
    }

    /// Rewrites the backing file name (and format) recorded in the image
    /// header (QEMU's `bdrv_change_backing_file`): `None` records none.
    /// Only the header changes; the graph's backing child is the caller's
    /// business. Formats without backing files refuse with `ENOTSUP`.
    fn change_backing_file<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> IoFuture<'a, ()> {
        let _ = (name, format);
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Checks a reopen of the node and stages it (QEMU's
    /// `bdrv_reopen_prepare`). The default accepts any change of the
    /// common options and stages nothing; a driver with options of its
    /// own checks them here ([`ReopenRequest::driver_opts`]).
    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        let _ = req;
        Box::pin(async { Ok(Box::new(()) as Staged) })
    }

    /// Makes a prepared reopen take effect. Cannot fail.
    fn reopen_commit(&self, staged: Staged) {
        let _ = staged;
    }

    /// Drops a prepared reopen.
    fn reopen_abort(&self, staged: Staged) {
        let _ = staged;
    }

    /// After a committed reopen, with the new permissions held: the writes
    /// a node that became writable needs. On error the reopen of this node
    /// is undone.
    fn reopen_finish(&self) -> FinishFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    /// A drained section begins over the node (QEMU's
    /// `.bdrv_drain_begin`): a driver that holds requests back (the
    /// `throttle` filter) lets them go, so the section does not wait for
    /// it. Sections nest.
    fn drained_begin(&self) {}

    /// A drained section over the node ended (QEMU's `.bdrv_drain_end`).
    fn drained_end(&self) {}

    // Persistent dirty bitmaps (see [`crate::stored_bitmap`]). The
    // defaults are a format without them.

    /// The persistent bitmaps the driver read at open (QEMU's
    /// `qcow2_load_dirty_bitmaps`): taken once, later calls return none.
    /// On a read-only node the core should keep them read-only.
    fn take_loaded_bitmaps(&self) -> Vec<StoredBitmap> {
        Vec::new()
    }

    /// Whether a new bitmap `name` of `granularity` can be made
    /// persistent (QEMU's `.bdrv_co_can_store_new_dirty_bitmap`), given
    /// the names of the node's persistent bitmaps now (`existing`). The
    /// error is QEMU's whole message, node name included (the default is
    /// `bdrv_can_store_new_dirty_bitmap`'s for a format without them); a
    /// bitmap of that name already in memory is the caller's check.
    fn can_store_new_bitmap(
        &self,
        node_name: &str,
        name: &str,
        granularity: u64,
        existing: &[&str],
    ) -> Result<(), BlockError> {
        let _ = (name, granularity, existing);
        Err(BlockError::unsupported(format!(
            "Can't store persistent bitmaps to {node_name}: Operation not supported"
        )))
    }

    /// Writes `bitmaps` into the image (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`): each replaces the stored
    /// bitmap of its name (which must be one this node marked in use) or
    /// is added; inconsistent ones are skipped; stored bitmaps not in the
    /// list stay as they are. Stored bitmaps are no longer marked in use,
    /// so call it when they stop changing (close, inactivation).
    fn store_bitmaps<'a>(&'a self, bitmaps: &'a [StoredBitmap]) -> BitmapFuture<'a, ()> {
        let _ = bitmaps;
        Box::pin(async {
            Err(BlockError::unsupported(
                "persistent dirty bitmaps are not supported",
            ))
        })
    }

    /// Deletes the stored bitmap `name` from the image (QEMU's
    /// `.bdrv_co_remove_persistent_dirty_bitmap`); an absent one is not
    /// an error.
    fn remove_persistent_bitmap<'a>(&'a self, name: &'a str) -> BitmapFuture<'a, ()> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }

    /// Registers what [`BlockDriver::close`] stores (`None`: nothing).
    /// A driver without persistent bitmaps ignores it.
    fn set_bitmap_source(&self, source: Option<BitmapSource>) {
        let _ = source;
    }
}
