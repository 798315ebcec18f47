//! Block jobs over QMP (QEMU's `blockdev.c`: `qmp_block_commit`,
//! `qmp_block_stream`, `blockdev_mirror_common`, `qmp_change_backing_file`,
//! and the `qmp_block_job_*` verbs): the arguments are resolved to nodes
//! and checked in QEMU's order with QEMU's messages, then the job starts
//! in `blockd-blockjob` under the control-plane lock.

use std::sync::Arc;

use blockd_blockjob::commit::CommitParams;
use blockd_blockjob::mirror::{CopyMode, MirrorParams, Sync};
use blockd_blockjob::stream::StreamParams;
use blockd_blockjob::StartError;
use blockd_core::blocker::{self, BlockOp};
use blockd_core::chain;
use blockd_core::qapi::BlockdevOnError;
use blockd_core::{BlockNode, ControlGuard, Perm};
use blockd_jobs::{JobOptions, JobType};
use blockd_qmp::{Ctx, Dispatcher, Empty, ErrorClass, NoArgs, QmpError};
use serde::Deserialize;
use serde_json::Value;

use super::block::qerr;
use super::job::jerr;
use crate::state::State;

pub(super) type R<T> = Result<T, QmpError>;

/// QEMU's default mirror buffer: 16 requests of 1 MiB in flight.
const DEFAULT_MIRROR_BUF_SIZE: u64 = 16 << 20;

pub(super) fn gen(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// A job that did not start: the job layer's class, else GenericError.
pub(super) fn start_err(e: StartError) -> QmpError {
    match e {
        StartError::Job(e) => jerr(e),
        StartError::Block(e) => qerr(e),
    }
}

/// QEMU's `bdrv_lookup_bs(device, node_name)`: a backend's medium, or a
/// node.
pub(super) fn lookup_bs(st: &State, device: Option<&str>, node: Option<&str>) -> R<Arc<BlockNode>> {
    if let Some(d) = device {
        if let Some(b) = st.machine.backend_by_name(d) {
            return b
                .root()
                .ok_or_else(|| gen(format!("Device '{d}' has no medium")));
        }
    }
    if let Some(n) = node {
        if let Some(bs) = st.graph.get(n) {
            return Ok(bs);
        }
    }
    Err(gen(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or(""),
        node.unwrap_or("")
    )))
}

/// QEMU's `qmp_get_root_bs`: a backend's medium or a node nothing but
/// backends use.
pub(super) fn root_bs(st: &State, name: &str) -> R<Arc<BlockNode>> {
    let bs = lookup_bs(st, Some(name), Some(name))?;
    if !chain::is_root_node(&bs) {
        return Err(gen("Need a root block node"));
    }
    Ok(bs)
}

/// QEMU's `bdrv_get_device_name`: the name of the backend whose medium
/// `bs` is, or empty. A job started without an id is named after it.
pub(super) fn device_name(st: &State, bs: &BlockNode) -> String {
    st.machine
        .listed_backends()
        .into_iter()
        .find(|b| !b.name().is_empty() && b.root().is_some_and(|n| n.id() == bs.id()))
        .map(|b| b.name().to_string())
        .unwrap_or_default()
}

pub(super) fn busy(node: &BlockNode, op: BlockOp) -> R<()> {
    blocker::check(node, op).map_err(qerr)
}

pub(super) fn job_options(auto_finalize: Option<bool>, auto_dismiss: Option<bool>) -> JobOptions {
    JobOptions {
        auto_finalize: auto_finalize.unwrap_or(true),
        auto_dismiss: auto_dismiss.unwrap_or(true),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockCommit {
    job_id: Option<String>,
    device: String,
    base_node: Option<String>,
    base: Option<String>,
    top_node: Option<String>,
    top: Option<String>,
    backing_file: Option<String>,
    backing_mask_protocol: Option<bool>,
    speed: Option<i64>,
    on_error: Option<BlockdevOnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

async fn block_commit(st: &State, a: BlockCommit) -> R<()> {
    let g = st.control.lock().await;
    // libvirt probes with this: DeviceNotFound before anything else.
    let bs = match root_bs(st, &a.device) {
        Ok(bs) => bs,
        Err(e) => {
            if lookup_bs(st, Some(&a.device), Some(&a.device)).is_err() {
                return Err(QmpError::with_class(
                    ErrorClass::DeviceNotFound,
                    format!("Device '{}' not found", a.device),
                ));
            }
            return Err(e);
        }
    };
    busy(&bs, BlockOp::CommitSource)?;
    let top = match (&a.top_node, &a.top) {
        (Some(_), Some(_)) => return Err(gen("'top-node' and 'top' are mutually exclusive")),
        (Some(t), None) => {
            let top = lookup_bs(st, None, Some(t))?;
            if !chain::contains(&bs, &top) {
                return Err(gen(format!("'{t}' is not in this backing file chain")));
            }
            Some(top)
        }
        (None, Some(t)) if bs.filename() != *t => chain::find_backing_image(&bs, t),
        _ => Some(bs.clone()),
    };
    let top = top.ok_or_else(|| {
        gen(format!(
            "Top image file {} not found",
            a.top.as_deref().unwrap_or("NULL")
        ))
    })?;
    let base = match (&a.base_node, &a.base) {
        (Some(_), Some(_)) => return Err(gen("'base-node' and 'base' are mutually exclusive")),
        (Some(b), None) => {
            let base = lookup_bs(st, None, Some(b))?;
            if !chain::contains(&top, &base) {
                return Err(gen(format!("'{b}' is not in this backing file chain")));
            }
            base
        }
        (None, Some(b)) => chain::find_backing_image(&top, b)
            .ok_or_else(|| gen(format!("Can't find '{b}' in the backing chain")))?,
        (None, None) => chain::base(&top),
    };
    let stop = chain::next(&base).map(|n| n.id());
    for n in chain::nodes(&top) {
        if Some(n.id()) == stop {
            break;
        }
        busy(&n, BlockOp::CommitTarget)?;
    }
    if top.id() == base.id() {
        return Err(gen("cannot commit an image into itself"));
    }
    // A negative speed is refused by the job layer once the job exists
    // (QEMU's block_job_create), with its created/null events.
    let speed = a.speed.unwrap_or(0);
    let on_error = a.on_error.unwrap_or_default();
    let options = job_options(a.auto_finalize, a.auto_dismiss);
    let top_is_active = chain::skip_filters(&top).id() == chain::skip_filters(&bs).id();
    if top.cumulative_perm().perm.contains(Perm::WRITE) || top_is_active {
        if a.backing_file.is_some() {
            return Err(gen(if top_is_active {
                "'backing-file' specified, but 'top' is the active layer"
            } else {
                "'backing-file' specified, but 'top' has a writer on it"
            }));
        }
        let job_id = a.job_id.unwrap_or_else(|| device_name(st, &bs));
        let p = MirrorParams {
            job_id,
            job_type: JobType::Commit,
            source: top,
            target: base.clone(),
            replaces: None,
            base: Some(base.clone()),
            sync: Sync::Full,
            speed,
            granularity: default_granularity(&base),
            buf_size: DEFAULT_MIRROR_BUF_SIZE,
            on_source_error: on_error,
            on_target_error: on_error,
            filter_node_name: a.filter_node_name,
            copy_mode: CopyMode::Background,
            options,
            release_target: false,
            zero_target: false,
            attach_backing: None,
        };
        blockd_blockjob::mirror::start(&st.jobs, &st.graph, &g, p)
            .await
            .map_err(start_err)
    } else {
        let overlay = chain::overlay(&bs, &top).ok_or_else(|| gen("Could not find overlay"))?;
        busy(&overlay, BlockOp::CommitTarget)?;
        let job_id = a.job_id.unwrap_or_else(|| device_name(st, &bs));
        let p = CommitParams {
            job_id,
            bs,
            top,
            base,
            backing_file: a.backing_file,
            backing_mask_protocol: a.backing_mask_protocol.unwrap_or(false),
            speed,
            on_error,
            filter_node_name: a.filter_node_name,
            options,
        };
        blockd_blockjob::commit::start(&st.jobs, &st.graph, &g, p)
            .await
            .map_err(start_err)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockStream {
    job_id: Option<String>,
    device: String,
    base: Option<String>,
    base_node: Option<String>,
    backing_file: Option<String>,
    backing_mask_protocol: Option<bool>,
    bottom: Option<String>,
    speed: Option<i64>,
    on_error: Option<BlockdevOnError>,
    filter_node_name: Option<String>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
}

async fn block_stream(st: &State, a: BlockStream) -> R<()> {
    if a.base.is_some() && a.base_node.is_some() {
        return Err(gen(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if a.base.is_some() && a.bottom.is_some() {
        return Err(gen(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if a.bottom.is_some() && a.base_node.is_some() {
        return Err(gen(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let g = st.control.lock().await;
    let bs = lookup_bs(st, Some(&a.device), Some(&a.device))?;
    let mut base = None;
    if let Some(b) = &a.base {
        base = Some(
            chain::find_backing_image(&bs, b)
                .ok_or_else(|| gen(format!("Can't find '{b}' in the backing chain")))?,
        );
    }
    if let Some(b) = &a.base_node {
        let n = lookup_bs(st, None, Some(b))?;
        if n.id() == bs.id() || !chain::contains(&bs, &n) {
            return Err(gen(format!(
                "Node '{b}' is not a backing image of '{}'",
                a.device
            )));
        }
        base = Some(n);
    }
    if let Some(b) = &a.bottom {
        let n = lookup_bs(st, None, Some(b))?;
        if n.driver().is_filter() {
            return Err(gen(format!(
                "Node '{b}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
        if !chain::contains(&bs, &n) {
            return Err(gen(format!(
                "Node '{b}' is not in a chain starting from '{}'",
                a.device
            )));
        }
        // Streaming down to and including `bottom`: the base is what lies
        // below it.
        base = chain::next(&n);
    }
    let end = base.as_ref().map(|b| b.id());
    for n in chain::nodes(&bs) {
        if Some(n.id()) == end {
            break;
        }
        busy(&n, BlockOp::Stream)?;
    }
    if base.is_none() && a.backing_file.is_some() {
        return Err(gen(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let p = StreamParams {
        job_id: a.job_id.unwrap_or_else(|| device_name(st, &bs)),
        bs,
        base,
        backing_file: a.backing_file,
        speed: a.speed.unwrap_or(0),
        on_error: a.on_error.unwrap_or_default(),
        filter_node_name: a.filter_node_name,
        options: job_options(a.auto_finalize, a.auto_dismiss),
    };
    let _ = a.backing_mask_protocol;
    blockd_blockjob::stream::start(&st.jobs, &st.graph, &g, p)
        .await
        .map_err(start_err)
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum MirrorSyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub(super) enum MirrorCopyMode {
    Background,
    WriteBlocking,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct BlockdevMirror {
    pub(super) job_id: Option<String>,
    pub(super) device: String,
    pub(super) target: String,
    pub(super) replaces: Option<String>,
    pub(super) sync: MirrorSyncMode,
    pub(super) speed: Option<i64>,
    pub(super) granularity: Option<i64>,
    pub(super) buf_size: Option<i64>,
    pub(super) on_source_error: Option<BlockdevOnError>,
    pub(super) on_target_error: Option<BlockdevOnError>,
    pub(super) filter_node_name: Option<String>,
    pub(super) copy_mode: Option<MirrorCopyMode>,
    pub(super) auto_finalize: Option<bool>,
    pub(super) auto_dismiss: Option<bool>,
}

/// QEMU's `bdrv_get_default_bitmap_granularity`: the cluster size,
/// between 4 KiB and 64 KiB.
fn default_granularity(target: &BlockNode) -> u64 {
    match target.driver().info().cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// QEMU's `bdrv_recurse_can_replace`: whether replacing `to_replace` by
/// a copy of `bs` changes nothing visible: it is `bs`, or what a filter
/// `bs` is over (recursively).
fn recurse_can_replace(bs: &Arc<BlockNode>, to_replace: &BlockNode) -> bool {
    let mut cur = bs.clone();
    loop {
        if cur.id() == to_replace.id() {
            return true;
        }
        if !cur.driver().is_filter() {
            return false;
        }
        match chain::next(&cur) {
            Some(n) => cur = n,
            None => return false,
        }
    }
}

async fn blockdev_mirror(st: &State, a: BlockdevMirror) -> R<()> {
    let g = st.control.lock().await;
    let bs = root_bs(st, &a.device)?;
    let target = lookup_bs(st, Some(&a.target), Some(&a.target))?;
    mirror_common(st, &g, bs, target, a, None).await
}

/// What `drive-mirror` tells `blockdev_mirror_common` about a target it
/// opened for the job.
pub(super) struct CreatedTarget {
    /// `mode` existing: a `sync` full mirror also copies what the source
    /// does not allocate (QEMU's `zero_target`; a new image reads zeroes).
    pub(super) existing: bool,
    /// The target's backing node, attached at the pivot.
    pub(super) attach_backing: Option<Arc<BlockNode>>,
}

/// QEMU's `blockdev_mirror_common`, for `blockdev-mirror` and
/// `drive-mirror` (whose target was opened for the job: `created`; it
/// leaves the graph with the job unless the pivot gives it users).
pub(super) async fn mirror_common(
    st: &State,
    g: &ControlGuard,
    bs: Arc<BlockNode>,
    target: Arc<BlockNode>,
    a: BlockdevMirror,
    created: Option<CreatedTarget>,
) -> R<()> {
    let granularity = a.granularity.unwrap_or(0);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(gen(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if granularity & (granularity - 1) != 0 {
        return Err(gen("Parameter 'granularity' expects a power of 2"));
    }
    busy(&bs, BlockOp::MirrorSource)?;
    busy(&target, BlockOp::MirrorTarget)?;
    let sync = match a.sync {
        MirrorSyncMode::Top if chain::next(&bs).is_none() => Sync::Full,
        MirrorSyncMode::Top => Sync::Top,
        MirrorSyncMode::Full => Sync::Full,
        MirrorSyncMode::None => Sync::None,
        MirrorSyncMode::Incremental => {
            return Err(gen("Sync mode 'incremental' not supported"));
        }
        MirrorSyncMode::Bitmap => return Err(gen("Sync mode 'bitmap' not supported")),
    };
    let replaces = match &a.replaces {
        None => None,
        Some(r) => {
            let n = st
                .graph
                .get(r)
                .ok_or_else(|| gen(format!("Failed to find node with node-name='{r}'")))?;
            busy(&n, BlockOp::Replace)?;
            // QEMU's check_to_replace_node: only the source itself or a
            // node below it through filters may be replaced.
            if !recurse_can_replace(&bs, &n) {
                return Err(gen(format!(
                    "Cannot replace '{r}' by a node mirrored from '{}', because it cannot be \
                     guaranteed that doing so would not lead to an abrupt change of visible data",
                    bs.name()
                )));
            }
            if n.length() != bs.length() {
                return Err(gen(
                    "cannot replace image with a mirror image of different size",
                ));
            }
            Some(n)
        }
    };
    let buf_size = match a.buf_size {
        Some(b) if b < 0 => return Err(gen("Invalid parameter 'buf-size'")),
        Some(0) | None => DEFAULT_MIRROR_BUF_SIZE,
        Some(b) => b as u64,
    };
    if chain::skip_filters(&bs).id() == chain::skip_filters(&target).id() {
        return Err(gen("Can't mirror node into itself"));
    }
    let p = MirrorParams {
        job_id: a.job_id.unwrap_or_else(|| device_name(st, &bs)),
        job_type: JobType::Mirror,
        source: bs,
        granularity: if granularity == 0 {
            default_granularity(&target)
        } else {
            granularity as u64
        },
        target,
        replaces,
        base: None,
        sync,
        speed: a.speed.unwrap_or(0),
        buf_size,
        on_source_error: a.on_source_error.unwrap_or_default(),
        on_target_error: a.on_target_error.unwrap_or_default(),
        filter_node_name: a.filter_node_name,
        copy_mode: match a.copy_mode {
            Some(MirrorCopyMode::WriteBlocking) => CopyMode::WriteBlocking,
            _ => CopyMode::Background,
        },
        options: job_options(a.auto_finalize, a.auto_dismiss),
        release_target: created.is_some(),
        zero_target: sync == Sync::Full && created.as_ref().is_none_or(|c| c.existing),
        attach_backing: created.and_then(|c| c.attach_backing),
    };
    blockd_blockjob::mirror::start(&st.jobs, &st.graph, g, p)
        .await
        .map_err(start_err)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ChangeBackingFile {
    device: String,
    image_node_name: String,
    backing_file: String,
}

async fn change_backing_file(st: &State, a: ChangeBackingFile) -> R<()> {
    let g = st.control.lock().await;
    let bs = root_bs(st, &a.device)?;
    let image = lookup_bs(st, None, Some(&a.image_node_name))?;
    if chain::base(&image).id() == image.id() {
        return Err(gen(
            "not allowing backing file change on an image without a backing file",
        ));
    }
    busy(&bs, BlockOp::Change)?;
    if !chain::contains(&bs, &image) {
        return Err(gen(format!(
            "'{}' and image file are not in the same chain",
            a.device
        )));
    }
    let ro = image.read_only();
    if ro {
        blockd_drivers::reopen::set_read_only(&st.graph, &g, &image, false)
            .await
            .map_err(qerr)?;
    }
    let format = image.driver().format_name().to_string();
    let r = image
        .driver()
        .change_backing_file(Some(&a.backing_file), Some(&format))
        .await
        .map_err(|e| {
            gen(format!(
                "Could not change backing file to '{}': {}",
                a.backing_file,
                blockd_core::error::strerror(&e)
            ))
        });
    if ro {
        let back = blockd_drivers::reopen::set_read_only(&st.graph, &g, &image, true).await;
        // QEMU reports the first error.
        if let (Ok(()), Err(e)) = (&r, back) {
            return Err(qerr(e));
        }
    }
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobId {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpeed {
    device: String,
    speed: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cancel {
    device: String,
    force: Option<bool>,
}

#[derive(Deserialize)]
struct Change {
    id: String,
    #[serde(rename = "type")]
    job_type: JobType,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Registers the block job commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "block-commit",
        |cx: Ctx<State>, a: BlockCommit| async move {
            block_commit(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-stream",
        |cx: Ctx<State>, a: BlockStream| async move {
            block_stream(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-mirror",
        |cx: Ctx<State>, a: BlockdevMirror| async move {
            blockdev_mirror(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "change-backing-file",
        |cx: Ctx<State>, a: ChangeBackingFile| async move {
            change_backing_file(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register("query-block-jobs", |cx: Ctx<State>, _: NoArgs| async move {
        R::Ok(cx.state.jobs.query_block_jobs())
    });
    d.register(
        "block-job-set-speed",
        |cx: Ctx<State>, a: SetSpeed| async move {
            cx.state
                .jobs
                .block_job_set_speed(&a.device, a.speed)
                .map_err(jerr)?;
            R::Ok(Empty {})
        },
    );
    d.register("block-job-pause", |cx: Ctx<State>, a: Device| async move {
        cx.state.jobs.block_job_pause(&a.device).map_err(jerr)?;
        R::Ok(Empty {})
    });
    d.register("block-job-resume", |cx: Ctx<State>, a: Device| async move {
        cx.state.jobs.block_job_resume(&a.device).map_err(jerr)?;
        R::Ok(Empty {})
    });
    d.register(
        "block-job-complete",
        |cx: Ctx<State>, a: Device| async move {
            cx.state.jobs.block_job_complete(&a.device).map_err(jerr)?;
            R::Ok(Empty {})
        },
    );
    d.register("block-job-dismiss", |cx: Ctx<State>, a: JobId| async move {
        cx.state.jobs.block_job_dismiss(&a.id).map_err(jerr)?;
        R::Ok(Empty {})
    });
    // These may finalize or abort a job on the spot: under the lock.
    d.register("block-job-cancel", |cx: Ctx<State>, a: Cancel| async move {
        let g = cx.state.control.lock().await;
        cx.state
            .jobs
            .block_job_cancel(&g, &a.device, a.force.unwrap_or(false))
            .await
            .map_err(jerr)?;
        R::Ok(Empty {})
    });
    d.register(
        "block-job-finalize",
        |cx: Ctx<State>, a: JobId| async move {
            let g = cx.state.control.lock().await;
            cx.state
                .jobs
                .block_job_finalize(&g, &a.id)
                .await
                .map_err(jerr)?;
            R::Ok(Empty {})
        },
    );
    d.register("block-job-change", |cx: Ctx<State>, a: Change| async move {
        // QEMU 10 does not compare 'type' with the job's type: options of
        // another type change nothing.
        let mut opts = a.rest;
        opts.insert("type".into(), Value::String(a.job_type.as_str().into()));
        cx.state
            .jobs
            .block_job_change(&a.id, &Value::Object(opts))
            .map_err(jerr)?;
        R::Ok(Empty {})
    });
}
