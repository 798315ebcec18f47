//! `blockdev-backup` over QMP (QEMU's `blockdev.c`: `blockdev_backup_action`
//! and `do_backup_common`, then the checks at the top of
//! `backup_job_create`): the arguments are resolved and checked in QEMU's
//! order with QEMU's messages; the job starts in `blockd-blockjob`.

use blockd_blockjob::backup::{BackupParams, BitmapMode, Perf, Sync, SyncBitmap};
use blockd_core::blocker::BlockOp;
use blockd_core::dirty::Check;
use blockd_core::qapi::BlockdevOnError;
use std::sync::Arc;

use blockd_core::{BlockNode, ControlGuard, DrainedSection};
use blockd_jobs::JobHandle;
use blockd_qmp::{Ctx, Dispatcher, Empty};
use serde::Deserialize;

use super::blockjob::{
    busy, device_name, gen, job_options, lookup_bs, start_err, MirrorSyncMode, R,
};
use super::drive_job::{drive_backup_prepare, DriveBackup};
use super::image::CreatedImage;
use super::transaction::{run_one, TxnAction, TxnFuture};
use crate::state::State;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum BitmapSyncMode {
    OnSuccess,
    Never,
    Always,
}

impl BitmapSyncMode {
    fn name(self) -> &'static str {
        match self {
            BitmapSyncMode::OnSuccess => "on-success",
            BitmapSyncMode::Never => "never",
            BitmapSyncMode::Always => "always",
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct BackupPerf {
    use_copy_range: Option<bool>,
    max_workers: Option<i64>,
    max_chunk: Option<i64>,
    min_cluster_size: Option<u64>,
}

/// `BlockdevBackup`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct BlockdevBackup {
    pub(super) job_id: Option<String>,
    pub(super) device: String,
    pub(super) target: String,
    pub(super) sync: MirrorSyncMode,
    pub(super) speed: Option<i64>,
    pub(super) bitmap: Option<String>,
    pub(super) bitmap_mode: Option<BitmapSyncMode>,
    pub(super) compress: Option<bool>,
    pub(super) on_source_error: Option<BlockdevOnError>,
    pub(super) on_target_error: Option<BlockdevOnError>,
    pub(super) auto_finalize: Option<bool>,
    pub(super) auto_dismiss: Option<bool>,
    pub(super) filter_node_name: Option<String>,
    pub(super) discard_source: Option<bool>,
    pub(super) x_perf: Option<BackupPerf>,
}

fn sync_name(s: MirrorSyncMode) -> &'static str {
    match s {
        MirrorSyncMode::Top => "top",
        MirrorSyncMode::Full => "full",
        MirrorSyncMode::None => "none",
        MirrorSyncMode::Incremental => "incremental",
        MirrorSyncMode::Bitmap => "bitmap",
    }
}

/// QEMU's `blockdev_backup_action` and `do_backup_common`: the job is
/// created, not started. The source is drained from after the lookups
/// until the transaction's clean (`drained`).
async fn prepare(
    st: &State,
    g: &ControlGuard,
    a: BlockdevBackup,
    drained: &mut Option<DrainedSection>,
) -> R<JobHandle> {
    let bs = lookup_bs(st, Some(&a.device), Some(&a.device))?;
    let target = lookup_bs(st, Some(&a.target), Some(&a.target))?;
    *drained = Some(st.graph.drained_begin(std::slice::from_ref(&bs)).await);
    backup_common(st, g, bs, target, a, false).await
}

/// QEMU's `do_backup_common` and the checks of `backup_job_create`, for
/// `blockdev-backup` and `drive-backup` (whose target was opened for the
/// job: `release_target`): the job is created, not started.
pub(super) async fn backup_common(
    st: &State,
    g: &ControlGuard,
    bs: Arc<BlockNode>,
    target: Arc<BlockNode>,
    a: BlockdevBackup,
    release_target: bool,
) -> R<JobHandle> {
    // do_backup_common: the bitmap arguments.
    let mut sync_mode = a.sync;
    let mut bitmap_mode = a.bitmap_mode;
    if matches!(
        sync_mode,
        MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap
    ) && a.bitmap.is_none()
    {
        return Err(gen(format!(
            "must provide a valid bitmap name for '{}' sync mode",
            sync_name(sync_mode)
        )));
    }
    if sync_mode == MirrorSyncMode::Incremental {
        // "incremental" is "bitmap" with on-success.
        if bitmap_mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
            return Err(gen(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        sync_mode = MirrorSyncMode::Bitmap;
        bitmap_mode = Some(BitmapSyncMode::OnSuccess);
    }
    let mut sync_bitmap = None;
    if let Some(name) = &a.bitmap {
        let bm = bs
            .dirty_bitmaps()
            .find(name)
            .ok_or_else(|| gen(format!("Bitmap '{name}' could not be found")))?;
        let Some(mode) = bitmap_mode else {
            return Err(gen(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        bm.check(Check::ALLOW_RO).map_err(super::qerr)?;
        if sync_mode == MirrorSyncMode::None {
            return Err(gen(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if mode == BitmapSyncMode::Never && sync_mode != MirrorSyncMode::Bitmap {
            return Err(gen(format!(
                "Bitmap sync mode '{}' has no meaningful effect when combined with sync mode '{}'",
                mode.name(),
                sync_name(sync_mode)
            )));
        }
        let mode = match mode {
            BitmapSyncMode::OnSuccess => BitmapMode::OnSuccess,
            BitmapSyncMode::Never => BitmapMode::Never,
            BitmapSyncMode::Always => BitmapMode::Always,
        };
        sync_bitmap = Some(SyncBitmap { bitmap: bm, mode });
    } else if bitmap_mode.is_some() {
        return Err(gen("Cannot specify bitmap sync mode without a bitmap"));
    }
    let sync = match sync_mode {
        MirrorSyncMode::Full => Sync::Full,
        MirrorSyncMode::Top => Sync::Top,
        MirrorSyncMode::None => Sync::None,
        MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap => Sync::Bitmap,
    };
    let x = a.x_perf.unwrap_or_default();
    let _ = x.use_copy_range;
    let mut perf = Perf::default();
    if let Some(w) = x.max_workers {
        perf.max_workers = w;
    }
    if let Some(c) = x.max_chunk {
        perf.max_chunk = c;
    }
    if let Some(m) = x.min_cluster_size {
        perf.min_cluster_size = m;
    }
    // backup_job_create.
    if bs.id() == target.id() {
        return Err(gen("Source and target cannot be the same"));
    }
    if a.compress.unwrap_or(false) {
        // QEMU names the target's device (empty for a node). blockd's
        // drivers write no compressed clusters, qcow2's included.
        let name = device_name(st, &target);
        if target.driver().format_name() == "qcow2" {
            return Err(gen(format!(
                "Compression is not supported for this drive {name} \
                 (blockd does not write compressed qcow2 clusters)"
            )));
        }
        return Err(gen(format!(
            "Compression is not supported for this drive {name}"
        )));
    }
    busy(&bs, BlockOp::BackupSource)?;
    busy(&target, BlockOp::BackupTarget)?;
    let p = BackupParams {
        job_id: a.job_id.unwrap_or_else(|| device_name(st, &bs)),
        source: bs,
        target,
        sync,
        speed: a.speed.unwrap_or(0),
        on_source_error: a.on_source_error.unwrap_or_default(),
        on_target_error: a.on_target_error.unwrap_or_default(),
        filter_node_name: a.filter_node_name,
        discard_source: a.discard_source.unwrap_or(false),
        perf,
        options: job_options(a.auto_finalize, a.auto_dismiss),
        sync_bitmap,
        release_target,
    };
    blockd_blockjob::backup::create(&st.jobs, &st.graph, g, p)
        .await
        .map_err(start_err)
}

/// What a backup action was asked for.
pub(super) enum BackupArgs {
    /// `blockdev-backup`.
    Blockdev(BlockdevBackup),
    /// `drive-backup`: the target is made or opened from a file name.
    Drive(DriveBackup),
}

/// The `blockdev-backup` and `drive-backup` transaction actions (QEMU's
/// `blockdev_backup_drv` and `drive_backup_drv`): the job is created in
/// prepare, started in commit, cancelled in abort, which also deletes the
/// image a `drive-backup` created.
pub(super) struct BackupAction {
    args: Option<BackupArgs>,
    created: Option<CreatedImage>,
    job: Option<JobHandle>,
    drained: Option<DrainedSection>,
}

impl BackupAction {
    /// A new action.
    pub(super) fn new(a: BackupArgs) -> Self {
        BackupAction {
            args: Some(a),
            created: None,
            job: None,
            drained: None,
        }
    }
}

impl TxnAction for BackupAction {
    fn prepare<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, R<()>> {
        Box::pin(async move {
            let job = match self.args.take().expect("prepared once") {
                BackupArgs::Blockdev(a) => prepare(st, g, a, &mut self.drained).await?,
                BackupArgs::Drive(a) => {
                    drive_backup_prepare(st, g, a, &mut self.created, &mut self.drained).await?
                }
            };
            self.job = Some(job);
            Ok(())
        })
    }

    fn commit<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            if let Some(h) = &self.job {
                h.start();
            }
        })
    }

    fn abort<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            // QEMU's job_cancel_sync: the unstarted job aborts (its clean
            // takes the filter out and lets an opened target go) and goes.
            if let Some(h) = self.job.take() {
                if let Err(e) = st.jobs.cancel(g, h.id(), true).await {
                    tracing::error!(job = h.id(), error = ?e, "cancelling a backup job of a failed transaction");
                }
            }
            if let Some(c) = self.created.take() {
                c.discard();
            }
        })
    }

    fn clean<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            self.drained = None;
            self.job = None;
        })
    }
}

/// Registers `blockdev-backup`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "blockdev-backup",
        |cx: Ctx<State>, a: BlockdevBackup| async move {
            run_one(
                &cx.state,
                Box::new(BackupAction::new(BackupArgs::Blockdev(a))),
            )
            .await?;
            R::Ok(Empty {})
        },
    );
}
