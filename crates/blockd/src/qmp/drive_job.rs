//! `drive-mirror` and `drive-backup` over QMP: the older forms of
//! `blockdev-mirror` and `blockdev-backup` whose target is a file name
//! (QEMU's `blockdev.c`: `qmp_drive_mirror`, and `drive_backup_action`,
//! formerly `drive_backup_prepare`).
//!
//! With `mode` `absolute-paths` (the default) the target image is created
//! first, as QEMU's `bdrv_img_create` does: in the source's format unless
//! `format` says otherwise, the source's size, and for `sync` `top` the
//! source's backing file as its backing file (for `sync` `none`, the
//! source itself). With `existing` the file must be there. The image is
//! then opened by file name (the implicit open path) and handed to
//! `blockdev_mirror_common` / `do_backup_common`; it leaves the graph
//! with the job unless the mirror's pivot gave it users.
//!
//! The target may be named as QEMU names images (an NBD URI, `json:`
//! options: [`blockd_drivers::filename`]); such a target must exist
//! (`mode` `existing`): blockd creates images only in files.
//!
//! A new mirror target is opened without its backing node, which the
//! pivot attaches (QEMU's `MIRROR_SOURCE_BACKING_CHAIN`: the source for
//! `sync` none, else the source's backing node); an existing one is opened
//! with the backing chain its header names. Where blockd differs: a
//! backup target for `sync` `none` is opened without its backing node
//! (QEMU attaches the source); the image on disk is the same.

use std::sync::Arc;

use blockd_core::blocker::BlockOp;
use blockd_core::chain;
use blockd_core::qapi::BlockdevOnError;
use blockd_core::{BlockError, BlockNode, ControlGuard, DrainedSection};
use blockd_drivers::filename::{self, NameSpec};
use blockd_drivers::options::BlockdevOptions;
use blockd_drivers::ImageRequest;
use blockd_jobs::JobHandle;
use blockd_qmp::{Ctx, Dispatcher, Empty};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::backup::{
    backup_common, BackupAction, BackupArgs, BackupPerf, BitmapSyncMode, BlockdevBackup,
};
use super::block::{close_nodes, qerr};
use super::blockjob::{
    busy, gen, lookup_bs, mirror_common, root_bs, BlockdevMirror, CreatedTarget, MirrorCopyMode,
    MirrorSyncMode, R,
};
use super::image::{create_image, CreatedImage, NewImage};
use super::transaction::run_one;
use crate::state::State;

/// QEMU's `NewImageMode`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
enum NewImageMode {
    Existing,
    #[default]
    AbsolutePaths,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DriveMirror {
    job_id: Option<String>,
    device: String,
    target: String,
    format: Option<String>,
    node_name: Option<String>,
    replaces: Option<String>,
    sync: MirrorSyncMode,
    mode: Option<NewImageMode>,
    speed: Option<i64>,
    granularity: Option<i64>,
    buf_size: Option<i64>,
    on_source_error: Option<BlockdevOnError>,
    on_target_error: Option<BlockdevOnError>,
    /// Accepted; blockd's mirror writes zeroes as zeroes either way.
    unmap: Option<bool>,
    copy_mode: Option<MirrorCopyMode>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct DriveBackup {
    job_id: Option<String>,
    device: String,
    target: String,
    format: Option<String>,
    mode: Option<NewImageMode>,
    sync: MirrorSyncMode,
    speed: Option<i64>,
    bitmap: Option<String>,
    bitmap_mode: Option<BitmapSyncMode>,
    compress: Option<bool>,
    on_source_error: Option<BlockdevOnError>,
    on_target_error: Option<BlockdevOnError>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    filter_node_name: Option<String>,
    discard_source: Option<bool>,
    x_perf: Option<BackupPerf>,
}

fn internal(v: Value) -> Result<BlockdevOptions, BlockError> {
    serde_json::from_value(v).map_err(|e| BlockError::invalid(format!("internal error: {e}")))
}

/// QEMU's `bdrv_open(filename, NULL, options, flags)` for the new target:
/// the image by file name, probed when `format` is absent, with `extra`
/// options on its format node.
async fn open_target(
    st: &State,
    filename: &str,
    format: Option<String>,
    extra: Map<String, Value>,
) -> R<Arc<BlockNode>> {
    if let Some(f) = &format {
        if !matches!(f.as_str(), "qcow2" | "raw") {
            return Err(gen(format!("Unknown driver '{f}'")));
        }
    }
    // A name that is more than a file name (an NBD URI, `json:`), as
    // QEMU's bdrv_fill_options reads it.
    let (protocol, format) = if filename::is_plain_file(filename) {
        (json!({"driver": "file", "filename": filename}), format)
    } else {
        match filename::resolve(filename, format.as_deref()).map_err(qerr)? {
            NameSpec::Layered { protocol, format } => (Value::Object(protocol), format),
            NameSpec::Node(opts) => {
                let mut m = extra;
                if opts.get("driver").and_then(Value::as_str) != Some("qcow2") {
                    m.remove("backing");
                }
                for (k, v) in opts {
                    m.entry(k).or_insert(v);
                }
                let opts = internal(Value::Object(m)).map_err(qerr)?;
                return blockd_drivers::open_implicit(&st.graph, &st.env, opts)
                    .await
                    .map_err(qerr);
            }
        }
    };
    let protocol = internal(protocol).map_err(qerr)?;
    let request = ImageRequest { protocol, format };
    let image = blockd_drivers::open_image(&st.graph, &st.env, request, |format, file| {
        let mut m = extra;
        if format != "qcow2" {
            m.remove("backing");
        }
        m.insert("driver".into(), format.into());
        m.insert("file".into(), file.name().into());
        internal(Value::Object(m))
    })
    .await
    .map_err(qerr)?;
    Ok(image.node)
}

async fn create(
    st: &State,
    created: &mut Option<CreatedImage>,
    filename: &str,
    format: &str,
    backing: Option<(String, String)>,
    size: u64,
) -> R<()> {
    if !filename::is_plain_file(filename) {
        // QEMU creates images over some protocols (nbd: by checking the
        // export's size); blockd only in files.
        filename::protocol_options(filename).map_err(qerr)?;
        return Err(gen(format!(
            "Cannot create '{filename}': blockd creates images only in files (use mode 'existing')"
        )));
    }
    let img = NewImage {
        filename,
        format,
        backing: backing.as_ref().map(|(f, b)| (f.as_str(), b.as_str())),
        size,
    };
    *created = Some(create_image(&st.graph, &st.env, &img).await.map_err(qerr)?);
    Ok(())
}

/// `drive-mirror`; a failure deletes the image it created (QEMU leaves
/// it).
async fn drive_mirror(st: &State, a: DriveMirror) -> R<()> {
    let mut created = None;
    let r = drive_mirror_inner(st, a, &mut created).await;
    if let (Err(_), Some(c)) = (&r, created) {
        c.discard();
    }
    r
}

async fn drive_mirror_inner(
    st: &State,
    a: DriveMirror,
    created: &mut Option<CreatedImage>,
) -> R<()> {
    let g = st.control.lock().await;
    let bs = root_bs(st, &a.device)?;
    busy(&bs, BlockOp::MirrorSource)?;
    let mode = a.mode.unwrap_or_default();
    let format = match (&a.format, mode) {
        (Some(f), _) => Some(f.clone()),
        (None, NewImageMode::Existing) => None,
        (None, NewImageMode::AbsolutePaths) => Some(bs.driver().format_name().to_string()),
    };
    let mut sync = a.sync;
    let mut target_backing = chain::next(&chain::skip_filters(&bs));
    if target_backing.is_none() && sync == MirrorSyncMode::Top {
        sync = MirrorSyncMode::Full;
    }
    if sync == MirrorSyncMode::None {
        target_backing = Some(bs.clone());
    }
    if a.replaces.is_some() && a.node_name.is_none() {
        return Err(gen(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    let mut extra = Map::new();
    let backing = match &target_backing {
        Some(b) if sync != MirrorSyncMode::Full => Some(b.clone()),
        _ => None,
    };
    if mode == NewImageMode::AbsolutePaths {
        let fmt = format.as_deref().unwrap_or("raw");
        let header = backing.as_ref().map(|b| {
            let b = chain::skip_filters(b);
            (
                b.filename().to_string(),
                b.driver().format_name().to_string(),
            )
        });
        create(st, created, &a.target, fmt, header, bs.length()).await?;
        // Opened without its backing file, which the pivot attaches.
        extra.insert("backing".into(), Value::Null);
    }
    if let Some(n) = &a.node_name {
        extra.insert("node-name".into(), n.clone().into());
    }
    let target = open_target(st, &a.target, format, extra).await?;
    let _ = a.unmap;
    let m = BlockdevMirror {
        job_id: a.job_id,
        device: a.device,
        target: target.name().to_string(),
        replaces: a.replaces,
        sync,
        speed: a.speed,
        granularity: a.granularity,
        buf_size: a.buf_size,
        on_source_error: a.on_source_error,
        on_target_error: a.on_target_error,
        filter_node_name: None,
        copy_mode: a.copy_mode,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
    };
    let created = CreatedTarget {
        existing: mode == NewImageMode::Existing,
        attach_backing: backing.filter(|_| mode == NewImageMode::AbsolutePaths),
    };
    let r = mirror_common(st, &g, bs, target.clone(), m, Some(created)).await;
    if r.is_err() {
        close_nodes(st.graph.release(&target)).await;
    }
    r
}

/// QEMU's `drive_backup_action`: the target made or opened, the job
/// created (not started); the source drained until the transaction's
/// clean.
pub(super) async fn drive_backup_prepare(
    st: &State,
    g: &ControlGuard,
    a: DriveBackup,
    created: &mut Option<CreatedImage>,
    drained: &mut Option<DrainedSection>,
) -> R<JobHandle> {
    let bs = lookup_bs(st, Some(&a.device), Some(&a.device))?;
    *drained = Some(st.graph.drained_begin(std::slice::from_ref(&bs)).await);
    let mode = a.mode.unwrap_or_default();
    busy(&bs, BlockOp::BackupSource)?;
    let format = match (&a.format, mode) {
        (Some(f), _) => Some(f.clone()),
        (None, NewImageMode::Existing) => None,
        (None, NewImageMode::AbsolutePaths) => Some(bs.driver().format_name().to_string()),
    };
    let mut sync = a.sync;
    let mut source = None;
    if sync == MirrorSyncMode::Top {
        source = chain::next(&chain::skip_filters(&bs));
        if source.is_none() {
            sync = MirrorSyncMode::Full;
        }
    }
    let mut extra = Map::new();
    extra.insert("discard".into(), "unmap".into());
    extra.insert("detect-zeroes".into(), "unmap".into());
    if sync == MirrorSyncMode::None {
        source = Some(bs.clone());
        extra.insert("backing".into(), Value::Null);
    }
    if mode == NewImageMode::AbsolutePaths {
        let fmt = format.as_deref().unwrap_or("raw");
        let header = source.as_ref().map(|b| {
            let b = chain::skip_filters(b);
            (
                b.filename().to_string(),
                b.driver().format_name().to_string(),
            )
        });
        create(st, created, &a.target, fmt, header, bs.length()).await?;
    }
    let target = open_target(st, &a.target, format, extra).await?;
    let b = BlockdevBackup {
        job_id: a.job_id,
        device: a.device,
        target: target.name().to_string(),
        sync,
        speed: a.speed,
        bitmap: a.bitmap,
        bitmap_mode: a.bitmap_mode,
        compress: a.compress,
        on_source_error: a.on_source_error,
        on_target_error: a.on_target_error,
        auto_finalize: a.auto_finalize,
        auto_dismiss: a.auto_dismiss,
        filter_node_name: a.filter_node_name,
        discard_source: a.discard_source,
        x_perf: a.x_perf,
    };
    let r = backup_common(st, g, bs, target.clone(), b, true).await;
    if r.is_err() {
        close_nodes(st.graph.release(&target)).await;
    }
    r
}

/// Registers `drive-mirror` and `drive-backup`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "drive-mirror",
        |cx: Ctx<State>, a: DriveMirror| async move {
            drive_mirror(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "drive-backup",
        |cx: Ctx<State>, a: DriveBackup| async move {
            let action = BackupAction::new(BackupArgs::Drive(a));
            run_one(&cx.state, Box::new(action)).await?;
            R::Ok(Empty {})
        },
    );
}
