//! Internal snapshots over QMP (QEMU's `blockdev.c`:
//! `internal_snapshot_action` with its abort, and
//! `qmp_blockdev_snapshot_delete_internal_sync`).
//!
//! The action is split as QEMU's transaction action is, so `transaction`
//! can run it: [`internal_snapshot_prepare`] checks and takes the snapshot
//! inside a drained section that the returned state keeps (QEMU's
//! `.clean` ends it when the state is dropped);
//! [`internal_snapshot_abort`] deletes the snapshot it took.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use blockd_core::blocker::{self, BlockOp};
use blockd_core::snapshot::SnapshotInfo;
use blockd_core::{BlockNode, ControlGuard, DrainedSection};
use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::Deserialize;
use serde_json::Value;

use super::block::qerr;
use super::blockjob::root_bs;
use super::transaction::{run_one, TxnAction, TxnFuture};
use crate::state::State;

type R<T> = Result<T, QmpError>;

/// `BlockdevSnapshotInternal`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotInternal {
    device: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotDelete {
    device: String,
    id: Option<String>,
    name: Option<String>,
}

/// A prepared internal snapshot action (QEMU's `InternalSnapshotState`):
/// the node stays drained until this is dropped.
pub struct InternalSnapshotState {
    bs: Arc<BlockNode>,
    device: String,
    sn: SnapshotInfo,
    _drained: DrainedSection,
}

/// The checks and the snapshot of `blockdev-snapshot-internal-sync`, in
/// QEMU's order and words.
pub async fn internal_snapshot_prepare(
    st: &State,
    device: &str,
    name: &str,
) -> R<InternalSnapshotState> {
    let bs = root_bs(st, device)?;
    let drained = st.graph.drained_begin(std::slice::from_ref(&bs)).await;
    blocker::check(&bs, BlockOp::InternalSnapshot).map_err(qerr)?;
    if bs.read_only() {
        return Err(QmpError::generic(format!("Device '{device}' is read only")));
    }
    let Some(existing) = bs.driver().snapshots() else {
        return Err(QmpError::generic(format!(
            "Block format '{}' used by device '{device}' does not support internal snapshots",
            bs.driver().format_name()
        )));
    };
    if name.is_empty() {
        return Err(QmpError::generic("Name is empty"));
    }
    if existing.iter().any(|s| s.name == name) {
        return Err(QmpError::generic(format!(
            "Snapshot with name '{name}' already exists on device '{device}'"
        )));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let sn = SnapshotInfo {
        name: name.to_string(),
        date_sec: now.as_secs(),
        // (QEMU takes microseconds: g_get_real_time)
        date_nsec: u64::from(now.subsec_micros()) * 1000,
        // qemu-storage-daemon's virtual clock is the host's.
        vm_clock_nsec: now.as_secs() * 1_000_000_000 + u64::from(now.subsec_micros()) * 1000,
        ..SnapshotInfo::default()
    };
    let sn = bs.driver().snapshot_create(sn).await.map_err(|e| {
        QmpError::generic(format!(
            "Failed to create snapshot '{name}' on device '{device}': {}",
            blockd_core::error::strerror(&e)
        ))
    })?;
    Ok(InternalSnapshotState {
        bs,
        device: device.to_string(),
        sn,
        _drained: drained,
    })
}

/// Undoes a prepared action: deletes the snapshot it took (QEMU's
/// `internal_snapshot_abort`, which only reports a failure).
pub async fn internal_snapshot_abort(state: InternalSnapshotState) {
    let sn = &state.sn;
    if let Err(e) = state
        .bs
        .driver()
        .snapshot_delete(Some(&sn.id), Some(&sn.name))
        .await
    {
        tracing::error!(
            "Failed to delete snapshot with id '{}' and name '{}' on device '{}' in abort: {e}",
            sn.id,
            sn.name,
            state.device
        );
    }
}

/// The `blockdev-snapshot-internal-sync` transaction action (QEMU's
/// `internal_snapshot_drv`; the command is a one-action transaction).
pub(super) struct InternalSnapshotAction {
    args: SnapshotInternal,
    state: Option<InternalSnapshotState>,
}

impl InternalSnapshotAction {
    /// A new action.
    pub(super) fn new(args: SnapshotInternal) -> Self {
        InternalSnapshotAction { args, state: None }
    }
}

impl TxnAction for InternalSnapshotAction {
    fn prepare<'a>(&'a mut self, st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, R<()>> {
        Box::pin(async move {
            self.state =
                Some(internal_snapshot_prepare(st, &self.args.device, &self.args.name).await?);
            Ok(())
        })
    }

    fn abort<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            if let Some(s) = self.state.take() {
                internal_snapshot_abort(s).await;
            }
        })
    }

    fn clean<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            self.state = None;
        })
    }
}

async fn delete(st: &State, a: SnapshotDelete) -> R<Value> {
    let bs = root_bs(st, &a.device)?;
    if a.id.is_none() && a.name.is_none() {
        return Err(QmpError::generic("Name or id must be provided"));
    }
    blocker::check(&bs, BlockOp::InternalSnapshotDelete).map_err(qerr)?;
    let Some(list) = bs.driver().snapshots() else {
        return Err(QmpError::generic(
            "Failed to get a snapshot list: Operation not supported",
        ));
    };
    let found = list.into_iter().any(|s| {
        a.id.as_deref().is_none_or(|i| s.id == i) && a.name.as_deref().is_none_or(|n| s.name == n)
    });
    if !found {
        return Err(QmpError::generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{}'",
            // (QEMU's STR_OR_NULL)
            a.id.as_deref().unwrap_or("null"),
            a.name.as_deref().unwrap_or("null"),
            a.device
        )));
    }
    let _drained = st.graph.drained_begin(std::slice::from_ref(&bs)).await;
    let sn = bs
        .driver()
        .snapshot_delete(a.id.as_deref(), a.name.as_deref())
        .await
        .map_err(|e| {
            // A driver that words its own error (QEMU's drivers set
            // errp) gives the whole message.
            if e.get_ref().is_some() {
                return QmpError::generic(e.to_string());
            }
            QmpError::generic(format!(
                "Failed to delete snapshot: {}",
                blockd_core::error::strerror(&e)
            ))
        })?;
    Ok(sn.to_json())
}

/// Registers the commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "blockdev-snapshot-internal-sync",
        |cx: Ctx<State>, a: SnapshotInternal| async move {
            run_one(&cx.state, Box::new(InternalSnapshotAction::new(a))).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-snapshot-delete-internal-sync",
        |cx: Ctx<State>, a: SnapshotDelete| async move {
            let st = &cx.state;
            let _g = st.control.lock().await;
            delete(st, a).await
        },
    );
}
