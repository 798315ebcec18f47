//! The filter nodes block jobs put into the graph, with QEMU's driver
//! names (shown by `query-named-block-nodes` and
//! `x-debug-query-block-graph`):
//!
//! * `commit_top` (intermediate commit, QEMU's `bdrv_commit_top`): sits
//!   above the top of the committed range and reads through it; it needs
//!   no permission on the chain below, so the job may write the base
//!   while the overlay keeps reading.
//! * `mirror_top` (mirror and active commit, `bdrv_mirror_top`): sits above
//!   the source; every write through it goes on to the source and then
//!   marks the written range dirty, or, in write-blocking mode, is also
//!   written to the target before it completes.
//! * `copy-on-read` (stream): reads through it copy what the top does not
//!   hold from its backing chain into it.
//!
//! Each has one child, named `backing` for the two job tops (as QEMU
//! names it) and `file` for `copy-on-read`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use blockd_core::bitmap::DirtyBitmap;
use blockd_core::perm::default_perms;
use blockd_core::tracked::Tracker;
use blockd_core::{
    BlockDriver, BlockNode, BlockStatus, Child, ChildRef, ChildRole, Children, DriverInfo,
    ExplicitOptions, IoFuture, NodeOptions, Perm, PermPair, ReqFlags, Root,
};
use blockd_jobs::JobCtx;
use bytes::Bytes;
use tokio::sync::Notify;

/// Makes a filter node named `name` (a generated name if `None`) over
/// `below`, with the child edge `child_name`, not yet in the graph.
pub fn filter_node(
    name: String,
    auto_named: bool,
    below: &Arc<BlockNode>,
    child_name: &str,
    make: impl FnOnce(ChildRef) -> Box<dyn BlockDriver>,
) -> Arc<BlockNode> {
    let children = Children::new();
    let edge = Child::new(
        child_name,
        ChildRole::FILTERED | ChildRole::PRIMARY,
        below.clone(),
    );
    children.push(edge.clone());
    let opts = NodeOptions {
        read_only: below.read_only(),
        ..NodeOptions::default()
    };
    BlockNode::with_children(
        name,
        auto_named,
        opts,
        ExplicitOptions::default(),
        make(edge),
        children,
    )
}

/// What queries show of a filter's image: its child's cluster size and
/// dirty flag (QEMU's `bdrv_co_get_info` falls through filters); no
/// backing file and no format-specific data of its own.
pub(crate) fn filtered_info(child: &ChildRef) -> DriverInfo {
    let i = child.node().driver().info();
    DriverInfo {
        cluster_size: i.cluster_size,
        dirty: i.dirty,
        ..DriverInfo::default()
    }
}

/// `commit_top`: reads through, takes nothing on its child.
pub struct CommitTop {
    pub(crate) child: ChildRef,
}

impl BlockDriver for CommitTop {
    fn info(&self) -> DriverInfo {
        filtered_info(&self.child)
    }
    fn format_name(&self) -> &'static str {
        "commit_top"
    }
    fn length(&self) -> u64 {
        self.child.node().length()
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.child.node().read(offset, len).await })
    }
    fn write(&self, _offset: u64, _data: Bytes, _flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.child.node().block_status(offset, len).await })
    }
    fn child_perm(&self, _c: &Child, _parent: PermPair, _writable: bool) -> PermPair {
        // QEMU's bdrv_commit_top_child_perm.
        PermPair {
            perm: Perm::NONE,
            shared: Perm::ALL,
        }
    }
}

/// What a mirror job and its `mirror_top` node share.
pub struct MirrorShared {
    /// Ranges written since they were last copied.
    pub bitmap: Arc<DirtyBitmap>,
    /// Writes also go to the target before they complete.
    pub write_blocking: AtomicBool,
    /// The target, for write-blocking writes.
    pub target: RwLock<Option<Arc<Root>>>,
    /// Wakes the job when something became dirty.
    pub dirty: Notify,
    /// The job is done with the source: take no permissions any more.
    pub stopped: AtomicBool,
    /// In sync with the target while writes are write-blocking (QEMU's
    /// `actively_synced`); a failed write-blocking write clears it.
    pub actively_synced: AtomicBool,
    /// The job's copies and write-blocking writes, per chunk: a chunk is
    /// never copied from an older state of the source over a newer
    /// write-blocking write on the target.
    pub inflight: Tracker,
    /// The running job, whose progress write-blocking writes add to
    /// (QEMU's do_sync_target_write); cleared when the job lets go of
    /// its nodes.
    pub job: Mutex<Option<JobCtx>>,
    /// Bytes of write-blocking writes in flight to the target, counted
    /// in the job's remaining work (QEMU's `active_write_bytes_in_flight`);
    /// changed together with the job's progress under this lock.
    active_bytes: Mutex<u64>,
}

impl MirrorShared {
    /// State for a job over a source of `len` bytes.
    pub fn new(len: u64, granularity: u64) -> Arc<MirrorShared> {
        Arc::new(MirrorShared {
            bitmap: Arc::new(DirtyBitmap::new(len, granularity)),
            write_blocking: AtomicBool::new(false),
            target: RwLock::new(None),
            dirty: Notify::new(),
            stopped: AtomicBool::new(false),
            actively_synced: AtomicBool::new(false),
            inflight: Tracker::default(),
            job: Mutex::new(None),
            active_bytes: Mutex::new(0),
        })
    }

    fn active_bytes(&self) -> MutexGuard<'_, u64> {
        self.active_bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job's total becomes what it has done plus `dirty` plus the
    /// write-blocking writes in flight (QEMU's `mirror_run`:
    /// `job_progress_set_remaining(bytes_in_flight + cnt +
    /// active_write_bytes_in_flight)`), so that their completion never
    /// takes the progress beyond the total.
    pub fn set_remaining(&self, ctx: &JobCtx, dirty: u64) {
        let active = self.active_bytes();
        ctx.set_remaining(dirty + *active);
    }

    fn job(&self) -> Option<JobCtx> {
        self.job.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn target(&self) -> Option<Arc<Root>> {
        self.target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A write-like request through `mirror_top`: to the source, then
    /// marked dirty for the job (background), or also to the target before
    /// it completes (write-blocking), excluding the job's copies of the
    /// same chunks meanwhile.
    async fn write<'a, S, SF, T, TF>(
        &'a self,
        offset: u64,
        len: u64,
        source: S,
        target: T,
    ) -> io::Result<()>
    where
        S: FnOnce() -> SF,
        SF: std::future::Future<Output = io::Result<()>> + 'a,
        T: FnOnce(Arc<Root>) -> TF,
        TF: std::future::Future<Output = io::Result<()>> + 'a,
    {
        let tgt = self
            .write_blocking
            .load(Ordering::Acquire)
            .then(|| self.target())
            .flatten();
        let Some(tgt) = tgt else {
            source().await?;
            self.bitmap.set(offset, len);
            self.dirty.notify_one();
            return Ok(());
        };
        let g = self.bitmap.granularity();
        let start = offset / g * g;
        let end = (offset + len).div_ceil(g) * g;
        let _t = self.inflight.begin(start, end, true).await;
        source().await?;
        // QEMU's do_sync_target_write: the write is part of the job's
        // work, counted as remaining before and done after it.
        let job = self.job();
        if let Some(j) = &job {
            let mut active = self.active_bytes();
            *active += len;
            j.increase_remaining(len);
        }
        let r = target(tgt).await;
        if let Some(j) = &job {
            let mut active = self.active_bytes();
            *active -= len;
            if r.is_ok() {
                j.add_progress(len);
            }
        }
        if let Err(e) = r {
            // The target missed it: the job copies it again.
            tracing::debug!(error = %e, "write-blocking mirror write failed; marked dirty");
            self.actively_synced.store(false, Ordering::Release);
            self.bitmap.set(offset, len);
            self.dirty.notify_one();
        }
        Ok(())
    }
}

/// `mirror_top`: see the [module docs](self).
pub struct MirrorTop {
    pub(crate) child: ChildRef,
    pub(crate) shared: Arc<MirrorShared>,
    /// For an active commit (the target is the source's own base).
    pub(crate) is_commit: bool,
}

impl BlockDriver for MirrorTop {
    fn info(&self) -> DriverInfo {
        filtered_info(&self.child)
    }
    fn format_name(&self) -> &'static str {
        "mirror_top"
    }
    fn length(&self) -> u64 {
        self.child.node().length()
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move { self.child.node().read(offset, len).await })
    }
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let d2 = data.clone();
            self.shared
                .write(
                    offset,
                    len,
                    || async move { self.child.node().write(offset, data, flags).await },
                    |t| async move { t.write(offset, d2, flags).await },
                )
                .await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.shared
                .write(
                    offset,
                    len,
                    || async move { self.child.node().write_zeroes(offset, len, flags).await },
                    |t| async move { t.write_zeroes(offset, len, flags).await },
                )
                .await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.child.node().discard(offset, len).await?;
            // A discarded range must read the same on the target: mark it,
            // the job copies what the source now reads there.
            self.shared.bitmap.set(offset, len);
            self.shared.dirty.notify_one();
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.child.node().flush().await?;
            if self.shared.write_blocking.load(Ordering::Acquire) {
                if let Some(t) = self.shared.target() {
                    t.flush().await?;
                }
            }
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.child.node().block_status(offset, len).await })
    }
    fn child_perm(&self, c: &Child, parent: PermPair, writable: bool) -> PermPair {
        // QEMU's bdrv_mirror_top_child_perm: nothing once the job stopped
        // using the source; else what its parents need, plus consistent
        // reads for the job. An active commit takes no consistent reads
        // (everything above the base unshares them to the job) and shares
        // writes (or it would block itself at the base).
        if self.shared.stopped.load(Ordering::Acquire) {
            return PermPair {
                perm: Perm::NONE,
                shared: Perm::ALL,
            };
        }
        let mut p = default_perms(c.role(), parent, writable);
        if self.is_commit {
            p.perm = p.perm & !Perm::CONSISTENT_READ;
            p.shared = p.shared | Perm::WRITE;
        } else {
            p.perm = p.perm | Perm::CONSISTENT_READ;
        }
        p
    }
}

/// `copy-on-read`: reads copy what the node below does not hold itself
/// from its backing chain into it (QEMU's `block/copy-on-read.c`).
pub struct CopyOnRead {
    pub(crate) child: ChildRef,
}

impl BlockDriver for CopyOnRead {
    fn info(&self) -> DriverInfo {
        filtered_info(&self.child)
    }
    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }
    fn length(&self) -> u64 {
        self.child.node().length()
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let node = self.child.node();
            node.copy_on_read(offset, len as u64).await?;
            node.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.node().write(offset, data, flags).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.node().write_zeroes(offset, len, flags).await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.node().discard(offset, len).await })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.child.node().flush().await })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move { self.child.node().block_status(offset, len).await })
    }
    fn child_perm(&self, c: &Child, parent: PermPair, writable: bool) -> PermPair {
        // It writes (unchanged data) into its child.
        let mut p = default_perms(c.role(), parent, writable);
        p.perm = p.perm | Perm::WRITE_UNCHANGED | Perm::CONSISTENT_READ;
        p
    }
}
