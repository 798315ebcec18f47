//! Backup (QEMU's `block/backup.c`, `backup_job_create` and `backup_run`):
//! a point-in-time copy of a node to a target of the same size while
//! clients keep writing the node.
//!
//! A `copy-before-write` filter ([`crate::cbw`]) goes above the source
//! when the job starts: from then on a write to a cluster not yet copied
//! first copies its old data to the target. The job copies the remaining
//! clusters in the background (`sync` `full`: all of them; `top`: those
//! the source holds itself; `none`: none, the job only waits for its
//! cancel while the filter copies what is written). The filter stays
//! until the job is cleaned up, so a job waiting to be finalized keeps
//! the point in time; then the users of the filter go back to the
//! source.
//!
//! With a sync bitmap (a dirty bitmap of the source), the bitmap is
//! frozen while the job runs and a successor records new writes; `sync`
//! `bitmap` copies only the clusters it marks. At the end the
//! [`BitmapMode`] decides (QEMU's `backup_cleanup_sync_bitmap`): the
//! bitmap keeps only what was written during the job (the successor's
//! bits) on success with `on-success`, always with `always` (plus, on
//! failure, what was not copied); otherwise the successor is merged back.

use std::sync::Arc;

use blockd_core::dirty::{Check, NamedBitmap};
use blockd_core::qapi::BlockdevOnError;
use blockd_core::{chain, BlockError, BlockGraph, BlockNode, ControlGuard, Perm};
use blockd_jobs::{
    FinalizeFuture, JobCtx, JobDriver, JobFuture, JobHandle, JobManager, JobOptions, JobStatus,
    JobType,
};

use crate::cbw::{cbw_node, BlockCopy, DEFAULT_CLUSTER_SIZE};
use crate::common::{io_error, JobNodes, OnIoError, Pace};
use crate::{close, StartError};

/// Copies in flight at most (QEMU's default `max-workers` is 64; a few
/// are enough to keep a file busy).
const MAX_WORKERS: usize = 16;

/// The most one background copy moves, without `max-chunk`.
const DEFAULT_CHUNK: u64 = 1 << 20;

/// What a backup copies in the background (`MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Everything.
    Full,
    /// What the source holds itself.
    Top,
    /// Nothing: only what is written while the job runs.
    None,
    /// What the sync bitmap marks.
    Bitmap,
}

/// What becomes of the sync bitmap when the job ends (`BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// Cleared of what was copied if the job succeeds.
    OnSuccess,
    /// Left as it was (with what was written meanwhile).
    Never,
    /// Cleared of what was copied, even if the job fails.
    Always,
}

/// A backup's sync bitmap.
pub struct SyncBitmap {
    /// A dirty bitmap of the source.
    pub bitmap: Arc<NamedBitmap>,
    /// What to do with it at the end.
    pub mode: BitmapMode,
}

/// A backup's `x-perf` tuning (QEMU's `BackupPerf`).
#[derive(Debug, Clone, Copy)]
pub struct Perf {
    /// Copies in flight at most.
    pub max_workers: i64,
    /// The most one copy moves (0: no limit).
    pub max_chunk: i64,
    /// The least cluster size (0: the default).
    pub min_cluster_size: u64,
}

impl Default for Perf {
    fn default() -> Self {
        Perf {
            max_workers: 64,
            max_chunk: 0,
            min_cluster_size: 0,
        }
    }
}

/// What a backup needs, resolved by the caller.
pub struct BackupParams {
    /// The job id.
    pub job_id: String,
    /// The node backed up.
    pub source: Arc<BlockNode>,
    /// Where the point-in-time copy goes.
    pub target: Arc<BlockNode>,
    /// What to copy in the background.
    pub sync: Sync,
    /// Bytes per second (0: unlimited).
    pub speed: i64,
    /// Error policy for reads of the source.
    pub on_source_error: BlockdevOnError,
    /// Error policy for writes to the target.
    pub on_target_error: BlockdevOnError,
    /// The name of the `copy-before-write` node.
    pub filter_node_name: Option<String>,
    /// Discard from the source what was copied.
    pub discard_source: bool,
    /// `x-perf`.
    pub perf: Perf,
    /// auto-finalize / auto-dismiss.
    pub options: JobOptions,
    /// The sync bitmap, for `sync` bitmap (and optionally full or top).
    pub sync_bitmap: Option<SyncBitmap>,
    /// The target was opened for this job (`drive-backup`): it leaves the
    /// graph with the job.
    pub release_target: bool,
}

struct BackupJob {
    sync_bitmap: Option<SyncBitmap>,
    graph: Arc<BlockGraph>,
    nodes: JobNodes,
    source: Arc<BlockNode>,
    cbw: Arc<BlockNode>,
    bcs: Arc<BlockCopy>,
    sync: Sync,
    on_source_error: BlockdevOnError,
    on_target_error: BlockdevOnError,
    chunk: u64,
    workers: usize,
    pace: Pace,
    /// The target, when it leaves the graph with the job.
    owned_target: Option<Arc<BlockNode>>,
}

/// QEMU's `block_copy_calculate_cluster_size`: the target's cluster size,
/// at least 64 KiB and at least `min`.
fn cluster_size(target: &BlockNode, min: u64) -> u64 {
    let c = target.driver().info().cluster_size.unwrap_or(0);
    DEFAULT_CLUSTER_SIZE.max(c).max(min)
}

/// Undoes the filter of a start that failed.
async fn drop_filter(
    graph: &BlockGraph,
    control: &ControlGuard,
    bcs: &BlockCopy,
    cbw: &Arc<BlockNode>,
) {
    bcs.attached
        .store(false, std::sync::atomic::Ordering::Release);
    bcs.stopped
        .store(true, std::sync::atomic::Ordering::Release);
    match graph.remove_filter(control, cbw).await {
        Ok(nodes) => close(nodes).await,
        Err(e) => tracing::error!(error = %e, "backup: removing copy-before-write"),
    }
}

/// Starts a backup (QEMU's `backup_job_create`), in QEMU's order: the
/// checks the caller made, the sync bitmap (it must be changeable unless
/// its mode is `never`; it gets its successor), then the sizes, the filter
/// (`Could not create node: ...` when it cannot be made, `Could not
/// replace node: ...` when the source's users cannot move onto it), then
/// the job (a bad ID or speed fails here and takes the filter out again).
/// A failure after the successor was made merges it back.
pub async fn start(
    jobs: &JobManager,
    graph: &Arc<BlockGraph>,
    control: &ControlGuard,
    p: BackupParams,
) -> Result<(), StartError> {
    create(jobs, graph, control, p).await?.start();
    Ok(())
}

/// [`start`] without starting the job (a `transaction` starts it once
/// every action is prepared, QEMU's `blockdev_backup_commit`): the filter
/// is in place and the job is created. To give up, cancel the job
/// ([`JobManager::cancel`], QEMU's `job_cancel_sync`): it aborts and takes
/// the filter out.
pub async fn create(
    jobs: &JobManager,
    graph: &Arc<BlockGraph>,
    control: &ControlGuard,
    p: BackupParams,
) -> Result<JobHandle, StartError> {
    if p.perf.max_workers < 1 || p.perf.max_workers > i64::from(i32::MAX) {
        return Err(
            BlockError::invalid(format!("max-workers must be between 1 and {}", i32::MAX)).into(),
        );
    }
    if p.perf.max_chunk < 0 {
        return Err(BlockError::invalid(
            "max-chunk must be zero (which means no limit) or positive",
        )
        .into());
    }
    let frozen = match &p.sync_bitmap {
        Some(sb) => {
            if sb.mode != BitmapMode::Never {
                sb.bitmap.check(Check::DEFAULT)?;
            }
            p.source.dirty_bitmaps().create_successor(&sb.bitmap)?;
            Some((p.source.clone(), sb.bitmap.clone()))
        }
        None => None,
    };
    let r = start_frozen(jobs, graph, control, p).await;
    if let (Err(_), Some((src, bm))) = (&r, frozen) {
        src.dirty_bitmaps().reclaim(&bm);
    }
    r
}

async fn start_frozen(
    jobs: &JobManager,
    graph: &Arc<BlockGraph>,
    control: &ControlGuard,
    p: BackupParams,
) -> Result<JobHandle, StartError> {
    let len = p.source.length();
    if p.target.length() != len {
        return Err(BlockError::invalid("Source and target image have different sizes").into());
    }
    let create = |e: BlockError| BlockError {
        msg: format!("Could not create node: {}", e.msg),
        ..e
    };
    let (name, auto) = crate::filter_name(graph, p.filter_node_name).map_err(create)?;
    let min = p.perf.min_cluster_size;
    if min != 0 && !min.is_power_of_two() {
        return Err(create(BlockError::invalid(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ))
        .into());
    }
    let cluster = cluster_size(&p.target, min);
    let (cbw, bcs) = cbw_node(name, auto, &p.source, &p.target, cluster, p.discard_source);
    graph
        .insert(std::slice::from_ref(&cbw), &cbw, false)
        .map_err(create)?;
    bcs.attached
        .store(true, std::sync::atomic::Ordering::Release);
    if let Err(e) = graph.replace_node(control, &p.source, &cbw).await {
        bcs.attached
            .store(false, std::sync::atomic::Ordering::Release);
        close(graph.release(&cbw)).await;
        return Err(BlockError {
            msg: format!("Could not replace node: {}", e.msg),
            ..e
        }
        .into());
    }
    if p.perf.max_chunk != 0 && (p.perf.max_chunk as u64) < cluster {
        drop_filter(graph, control, &bcs, &cbw).await;
        return Err(BlockError::invalid(format!(
            "Required max-chunk ({}) is less than backup cluster size ({cluster})",
            p.perf.max_chunk
        ))
        .into());
    }
    let chunk = match p.perf.max_chunk {
        0 => DEFAULT_CHUNK,
        c => (c as u64).min(DEFAULT_CHUNK).max(cluster) / cluster * cluster,
    };
    let job = BackupJob {
        sync_bitmap: p.sync_bitmap,
        graph: graph.clone(),
        nodes: JobNodes::new("backup", &p.job_id),
        source: p.source.clone(),
        cbw: cbw.clone(),
        bcs: bcs.clone(),
        sync: p.sync,
        on_source_error: p.on_source_error,
        on_target_error: p.on_target_error,
        chunk: chunk.max(cluster),
        workers: (p.perf.max_workers as usize).min(MAX_WORKERS),
        pace: Pace::default(),
        owned_target: p.release_target.then(|| p.target.clone()),
    };
    let (handle, job) =
        match crate::create_job_shared(jobs, &p.job_id, JobType::Backup, p.options, p.speed, job) {
            Ok(h) => h,
            Err((e, _)) => {
                drop_filter(graph, control, &bcs, &cbw).await;
                return Err(e);
            }
        };
    // The filter's own edges take what the copies need (QEMU's "Required
    // permissions are taken by copy-before-write filter target"); the
    // job's edges only mark the nodes busy.
    let r = (|| {
        job.nodes
            .add(graph, "main node", &cbw, Perm::NONE, Perm::ALL)?;
        job.nodes
            .add(graph, "target", &p.target, Perm::NONE, Perm::ALL)?;
        Ok::<_, BlockError>(())
    })();
    if let Err(e) = r {
        job.nodes.remove_all(graph);
        drop(handle);
        drop_filter(graph, control, &bcs, &cbw).await;
        return Err(e.into());
    }
    Ok(handle)
}

/// What one background copy did.
enum Step {
    Copied,
    Retry,
    Failed(String),
}

impl BackupJob {
    /// QEMU's `block_copy_reset_unallocated` over the whole source: `top`
    /// copies only what the source holds itself.
    async fn reset_unallocated(&self, ctx: &JobCtx) -> Result<(), String> {
        let below = chain::next(&self.source);
        let len = self.source.length();
        let c = self.bcs.cluster_size();
        let mut off = 0;
        while off < len {
            if ctx.is_cancelled() {
                return Ok(());
            }
            // Cluster by cluster: one allocated byte keeps the cluster.
            let end = (off + c).min(len);
            let mut pos = off;
            let mut alloc = false;
            while pos < end {
                let (a, n) = chain::is_allocated_above(
                    &self.source,
                    below.as_deref(),
                    false,
                    pos,
                    end - pos,
                )
                .await
                .map_err(|e| blockd_core::error::strerror(&e))?;
                if a {
                    alloc = true;
                    break;
                }
                pos += n.max(1);
            }
            if !alloc {
                self.bcs.bitmap.reset(off, end - off);
            }
            off = end;
        }
        Ok(())
    }

    async fn copy(&self, ctx: &JobCtx, off: u64, n: u64) -> Step {
        match self.bcs.copy(off, n).await {
            Ok(_) => Step::Copied,
            Err(e) => {
                let policy = if e.is_read {
                    self.on_source_error
                } else {
                    self.on_target_error
                };
                match io_error(ctx, policy, e.is_read, &e.error) {
                    OnIoError::Fail(m) => Step::Failed(m),
                    // QEMU's backup_loop retries on `ignore` too.
                    OnIoError::Retry | OnIoError::Skip => Step::Retry,
                }
            }
        }
    }

    /// QEMU's `backup_loop`: the marked clusters, a few chunks at a time,
    /// at the job's pace, until none is left.
    async fn copy_all(&self, ctx: &JobCtx) -> Result<(), String> {
        let mut cursor = 0;
        loop {
            self.pace.wait(ctx).await;
            if ctx.is_cancelled() {
                return Ok(());
            }
            let mut batch = Vec::with_capacity(self.workers);
            let mut c = cursor;
            let mut budget = u64::MAX;
            let speed = ctx.speed().max(0) as u64;
            if speed > 0 {
                budget = (speed / 10).max(self.bcs.cluster_size());
            }
            while batch.len() < self.workers && budget > 0 {
                let max = self.chunk.min(budget).max(self.bcs.cluster_size());
                let Some((off, n)) = self.bcs.bitmap.next_dirty_run(c, max) else {
                    break;
                };
                batch.push((off, n));
                budget = budget.saturating_sub(n);
                c = off + n;
            }
            if batch.is_empty() {
                if cursor == 0 {
                    return Ok(());
                }
                // Clusters a failed copy marked again lie behind.
                cursor = 0;
                continue;
            }
            self.pace.account(batch.iter().map(|&(_, n)| n).sum());
            let results =
                futures::future::join_all(batch.iter().map(|&(off, n)| self.copy(ctx, off, n)))
                    .await;
            cursor = c;
            for (&(off, _), r) in batch.iter().zip(results) {
                match r {
                    Step::Copied => {}
                    Step::Retry => cursor = cursor.min(off),
                    Step::Failed(m) => return Err(m),
                }
            }
        }
    }

    async fn body(&self, ctx: &JobCtx) -> Result<(), String> {
        *self.bcs.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctx.clone());
        // QEMU's backup_init_bcs_bitmap: the estimate is what is marked.
        ctx.set_remaining(self.bcs.bitmap.dirty_bytes());
        match self.sync {
            Sync::None => {
                // Every cluster stays marked, so that any may be copied
                // before it is written; the job itself copies nothing.
                while !ctx.is_cancelled() {
                    ctx.park().await;
                }
                Ok(())
            }
            Sync::Top => {
                self.reset_unallocated(ctx).await?;
                ctx.set_remaining(self.bcs.bitmap.dirty_bytes());
                self.copy_all(ctx).await
            }
            Sync::Full => self.copy_all(ctx).await,
            Sync::Bitmap => {
                // QEMU's backup_init_bcs_bitmap: only what the sync
                // bitmap marks, in whole clusters.
                if let Some(sb) = &self.sync_bitmap {
                    self.bcs.bitmap.clear();
                    self.bcs.bitmap.merge_from(sb.bitmap.bits());
                }
                ctx.set_remaining(self.bcs.bitmap.dirty_bytes());
                self.copy_all(ctx).await
            }
        }
    }

    /// QEMU's `backup_cleanup_sync_bitmap`, for a job that succeeded
    /// (`ok`) or not.
    fn cleanup_sync_bitmap(&self, ok: bool) {
        let Some(sb) = &self.sync_bitmap else {
            return;
        };
        let bitmaps = self.source.dirty_bitmaps();
        let sync = (ok || sb.mode == BitmapMode::Always) && sb.mode != BitmapMode::Never;
        if sync {
            bitmaps.abdicate(&sb.bitmap);
        } else {
            bitmaps.reclaim(&sb.bitmap);
        }
        if !ok && sb.mode == BitmapMode::Always {
            // What was not copied stays marked.
            sb.bitmap.bits().merge_from(&self.bcs.bitmap);
        }
    }

    /// QEMU's `backup_clean`: the job lets go of its nodes and the filter
    /// goes (`bdrv_cbw_drop`).
    async fn clean(&self, control: &ControlGuard) {
        *self.bcs.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.nodes.remove_all(&self.graph);
        if self.graph.holds(&self.cbw) {
            drop_filter(&self.graph, control, &self.bcs, &self.cbw).await;
        }
        if let Some(t) = &self.owned_target {
            close(self.graph.release(t)).await;
        }
    }
}

impl JobDriver for BackupJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move { self.body(&ctx).await })
    }

    fn commit<'a>(&'a self, _control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(async move { self.cleanup_sync_bitmap(true) })
    }

    fn abort<'a>(&'a self, _control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(async move { self.cleanup_sync_bitmap(false) })
    }

    fn cancel(&self, _force: bool, _status: JobStatus) -> bool {
        // QEMU's backup_cancel: every cancel is a hard one.
        true
    }

    fn clean<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(self.clean(control))
    }
}
