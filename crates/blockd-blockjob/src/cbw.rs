//! The `copy-before-write` filter (QEMU's `block/copy-before-write.c`) and
//! the copy state it shares with a backup job (QEMU's `block/block-copy.c`).
//!
//! ```text
//!   users ──► copy-before-write ──file──► source
//!                   │ before a write, write-zeroes or discard lands on
//!                   │ a cluster not yet copied: old data ─────┐
//!                   └──target──► target ◄─────────────────────┘
//!   backup job: copies the clusters still marked, source ──► target
//! ```
//!
//! The copy bitmap marks the clusters whose point-in-time data has not
//! reached the target yet. A copy (the job's, or one a guest write
//! triggers) takes the clusters it covers in a tracker of its own, so a
//! guest write to a cluster the job is copying waits until the old data
//! is on the target, and a cluster is copied once: whoever takes it
//! second finds it clean. Once a cluster is clean nobody copies it again,
//! so the target holds the source as it was when the filter went in.
//! Reads pass through.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use blockd_core::bitmap::DirtyBitmap;
use blockd_core::perm::default_perms;
use blockd_core::tracked::Tracker;
use blockd_core::{
    BlockDriver, BlockNode, BlockStatus, Child, ChildRef, ChildRole, Children, DriverInfo,
    ExplicitOptions, IoFuture, NodeOptions, Perm, PermPair, ReqFlags,
};
use blockd_jobs::JobCtx;
use bytes::Bytes;

use crate::filters::filtered_info;

/// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// The most one copy request moves at a time.
const MAX_COPY_BYTES: u64 = 1 << 20;

/// What the filter and the backup job share (QEMU's `BlockCopyState`).
pub struct BlockCopy {
    /// The source (the filter's `file` child).
    pub source: ChildRef,
    /// The target (the filter's `target` child).
    pub target: ChildRef,
    /// Clusters not yet copied.
    pub bitmap: DirtyBitmap,
    /// Copies in flight, per cluster range.
    inflight: Tracker,
    /// Discard what was copied from the source (`discard-source`).
    discard_source: bool,
    /// The filter has its users: it unshares writes on the source.
    pub attached: AtomicBool,
    /// The job is done: the filter takes nothing on the source any more.
    pub stopped: AtomicBool,
    /// The job, whose progress every copy adds to.
    pub job: Mutex<Option<JobCtx>>,
}

/// Where a copy failed.
pub struct CopyError {
    /// The error.
    pub error: io::Error,
    /// Reading the source (else writing the target).
    pub is_read: bool,
}

impl BlockCopy {
    fn job(&self) -> Option<JobCtx> {
        self.job.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The cluster size (the bitmap's granularity).
    pub fn cluster_size(&self) -> u64 {
        self.bitmap.granularity()
    }

    /// QEMU's `block_copy`: copies what is still marked in `[offset,
    /// offset + len)`, widened to whole clusters. Returns the bytes copied.
    pub async fn copy(&self, offset: u64, len: u64) -> Result<u64, CopyError> {
        let c = self.cluster_size();
        let size = self.bitmap.len();
        let start = offset / c * c;
        let end = (offset + len).div_ceil(c).saturating_mul(c).min(size);
        if start >= end {
            return Ok(0);
        }
        let _t = self.inflight.begin(start, end, true).await;
        let mut pos = start;
        let mut copied = 0;
        while pos < end {
            let Some((off, n)) = self.bitmap.next_dirty_run(pos, MAX_COPY_BYTES) else {
                break;
            };
            if off >= end {
                break;
            }
            let n = n.min(end - off);
            self.bitmap.reset(off, n);
            if let Err(e) = self.copy_extents(off, n).await {
                self.bitmap.set(off, n);
                return Err(e);
            }
            if self.discard_source {
                // Best effort, as QEMU's block_copy_task_entry.
                let _ = self.source.node().discard(off, n).await;
            }
            if let Some(j) = self.job() {
                j.add_progress(n);
            }
            copied += n;
            pos = off + n;
        }
        Ok(copied)
    }

    /// Copies `[off, off + n)` extent by extent: zeroes where the source
    /// reads zeroes (QEMU's `block_copy_block_status`), data elsewhere.
    async fn copy_extents(&self, off: u64, n: u64) -> Result<(), CopyError> {
        let read_err = |error| CopyError {
            error,
            is_read: true,
        };
        let write_err = |error| CopyError {
            error,
            is_read: false,
        };
        let src = self.source.node();
        let tgt = self.target.node();
        let end = off + n;
        let mut pos = off;
        while pos < end {
            let st = src.block_status(pos, end - pos).await.map_err(read_err)?;
            let len = st.len.clamp(1, end - pos);
            if st.zero && !st.data {
                tgt.write_zeroes(pos, len, ReqFlags::default())
                    .await
                    .map_err(write_err)?;
            } else {
                let data = src.read(pos, len as usize).await.map_err(read_err)?;
                tgt.write(pos, data, ReqFlags::default())
                    .await
                    .map_err(write_err)?;
            }
            pos += len;
        }
        Ok(())
    }
}

/// `copy-before-write`: see the [module docs](self).
pub struct CopyBeforeWrite {
    bcs: Arc<BlockCopy>,
}

impl CopyBeforeWrite {
    /// QEMU's `cbw_do_copy_before_write` (with `on-cbw-error`
    /// `break-guest-write`: a failed copy fails the guest's request).
    async fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        self.bcs
            .copy(offset, len)
            .await
            .map(|_| ())
            .map_err(|e| e.error)
    }
}

/// Makes a `copy-before-write` node named `name` over `source`, copying to
/// `target` in clusters of `cluster_size`, not yet in the graph; every
/// cluster starts marked (QEMU's `block_copy_state_new`).
pub fn cbw_node(
    name: String,
    auto_named: bool,
    source: &Arc<BlockNode>,
    target: &Arc<BlockNode>,
    cluster_size: u64,
    discard_source: bool,
) -> (Arc<BlockNode>, Arc<BlockCopy>) {
    let children = Children::new();
    let file = Child::new(
        "file",
        ChildRole::FILTERED | ChildRole::PRIMARY,
        source.clone(),
    );
    let tgt = Child::new("target", ChildRole::DATA, target.clone());
    children.push(file.clone());
    children.push(tgt.clone());
    let bitmap = DirtyBitmap::new(source.length(), cluster_size);
    bitmap.set_all();
    let bcs = Arc::new(BlockCopy {
        source: file,
        target: tgt,
        bitmap,
        inflight: Tracker::default(),
        discard_source,
        attached: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        job: Mutex::new(None),
    });
    let opts = NodeOptions {
        read_only: source.read_only(),
        ..NodeOptions::default()
    };
    let node = BlockNode::with_children(
        name,
        auto_named,
        opts,
        ExplicitOptions::default(),
        Box::new(CopyBeforeWrite { bcs: bcs.clone() }),
        children,
    );
    (node, bcs)
}

impl BlockDriver for CopyBeforeWrite {
    fn info(&self) -> DriverInfo {
        filtered_info(&self.bcs.source)
    }
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }
    fn length(&self) -> u64 {
        self.bcs.source.node().length()
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.bcs.source.node().read(offset, len).await })
    }
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_write(offset, data.len() as u64).await?;
            self.bcs.source.node().write(offset, data, flags).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.bcs
                .source
                .node()
                .write_zeroes(offset, len, flags)
                .await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.bcs.source.node().discard(offset, len).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        // QEMU's cbw_co_flush: the source only.
        Box::pin(async move { self.bcs.source.node().flush().await })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.bcs.source.node().block_status(offset, len).await })
    }
    fn child_perm(&self, c: &Child, parent: PermPair, writable: bool) -> PermPair {
        // QEMU's cbw_child_perm.
        if c.name() == "target" {
            // Writes shared: the guest's disk may be in the target's
            // backing chain. No resize: the sizes were checked once.
            return PermPair {
                perm: Perm::WRITE,
                shared: Perm::ALL & !Perm::RESIZE,
            };
        }
        if self.bcs.stopped.load(Ordering::Acquire) {
            return PermPair {
                perm: Perm::NONE,
                shared: Perm::ALL,
            };
        }
        let mut p = default_perms(c.role(), parent, writable);
        if self.bcs.attached.load(Ordering::Acquire) {
            // Nobody may write the source behind the filter's back.
            p.perm = p.perm | Perm::CONSISTENT_READ;
            if self.bcs.discard_source {
                p.perm = p.perm | Perm::WRITE;
            }
            p.shared = p.shared & !(Perm::WRITE | Perm::RESIZE);
        }
        p
    }
}
