//! `transaction` (QEMU's `qmp_transaction` over `TransactionActionDrv`,
//! `blockdev.c` and `util/transactions.c`): several graph changes all or
//! nothing.
//!
//! Every action implements [`TxnAction`]. Under the control-plane lock
//! (held across all phases, so no other command's graph change comes in
//! between), the actions are prepared in order; each prepare does the
//! change in a way that can still be undone and records what it did. If
//! one fails, every action prepared so far, the failed one included (it
//! may have done part of its work), is aborted in reverse order;
//! otherwise every one is committed, in reverse order as QEMU's
//! transaction list runs. Then every one is cleaned, in the same order.
//!
//! The single-action commands (`blockdev-snapshot`,
//! `blockdev-snapshot-sync`, `blockdev-snapshot-internal-sync`,
//! `blockdev-backup`, `drive-backup`) are one-action
//! transactions, as in QEMU (`blockdev_do_action`).
//!
//! Adding an action: a variant of [`TransactionAction`] (and its wire
//! name in `schema/transaction.json`), a type implementing [`TxnAction`],
//! and a line in [`TransactionAction::into_action`].

use std::future::Future;
use std::pin::Pin;

use blockd_core::ControlGuard;
use blockd_qmp::{Ctx, Dispatcher, Empty};
use serde::Deserialize;

use super::backup::BackupArgs;
use super::backup::{BackupAction, BlockdevBackup};
use super::bitmap::{Add, BitmapAction, BitmapTxn, Merge, Named};
use super::blockjob::{gen, R};
use super::drive_job::DriveBackup;
use super::snapshot::{BlockdevSnapshot, BlockdevSnapshotSync, ExternalSnapshot};
use super::snapshot_internal::{InternalSnapshotAction, SnapshotInternal};
use crate::state::State;

/// A boxed future borrowing the action and the server.
pub(super) type TxnFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One action of a transaction (QEMU's `TransactionActionDrv` and the
/// action function that does its prepare). See the [module docs](self).
pub(super) trait TxnAction: Send {
    /// Checks and makes the change, undoably; records what it did.
    fn prepare<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, R<()>>;

    /// Makes the change final (every action prepared).
    fn commit<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Undoes what `prepare` did, also after a prepare that failed
    /// half-way.
    fn abort<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Lets go of what prepare held (drained sections, references), after
    /// commit or abort.
    fn clean<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// `Abort`: no arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AbortArgs {}

/// `TransactionAction`: the action's kind and its arguments.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub(super) enum TransactionAction {
    /// Always fails.
    Abort(AbortArgs),
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(Add),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(Named),
    /// `block-dirty-bitmap-clear`.
    BlockDirtyBitmapClear(Named),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(Named),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(Named),
    /// `block-dirty-bitmap-merge`.
    BlockDirtyBitmapMerge(Merge),
    /// `blockdev-backup`.
    BlockdevBackup(Box<BlockdevBackup>),
    /// `blockdev-snapshot`.
    BlockdevSnapshot(BlockdevSnapshot),
    /// `blockdev-snapshot-internal-sync`.
    BlockdevSnapshotInternalSync(SnapshotInternal),
    /// `blockdev-snapshot-sync`.
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// `drive-backup`.
    DriveBackup(Box<DriveBackup>),
}

impl TransactionAction {
    /// The wire name (`TransactionActionKind`).
    fn kind(&self) -> &'static str {
        match self {
            TransactionAction::Abort(_) => "abort",
            TransactionAction::BlockDirtyBitmapAdd(_) => "block-dirty-bitmap-add",
            TransactionAction::BlockDirtyBitmapRemove(_) => "block-dirty-bitmap-remove",
            TransactionAction::BlockDirtyBitmapClear(_) => "block-dirty-bitmap-clear",
            TransactionAction::BlockDirtyBitmapEnable(_) => "block-dirty-bitmap-enable",
            TransactionAction::BlockDirtyBitmapDisable(_) => "block-dirty-bitmap-disable",
            TransactionAction::BlockDirtyBitmapMerge(_) => "block-dirty-bitmap-merge",
            TransactionAction::BlockdevBackup(_) => "blockdev-backup",
            TransactionAction::BlockdevSnapshot(_) => "blockdev-snapshot",
            TransactionAction::BlockdevSnapshotInternalSync(_) => "blockdev-snapshot-internal-sync",
            TransactionAction::BlockdevSnapshotSync(_) => "blockdev-snapshot-sync",
            TransactionAction::DriveBackup(_) => "drive-backup",
        }
    }

    /// Whether the action makes a job that completion-mode grouped can
    /// tie to the others (QEMU: the backup actions).
    fn makes_job(&self) -> bool {
        matches!(
            self,
            TransactionAction::BlockdevBackup(_) | TransactionAction::DriveBackup(_)
        )
    }

    fn into_action(self) -> Box<dyn TxnAction> {
        match self {
            TransactionAction::Abort(_) => Box::new(AbortAction),
            TransactionAction::BlockDirtyBitmapAdd(a) => bitmap(BitmapAction::Add(a)),
            TransactionAction::BlockDirtyBitmapRemove(a) => bitmap(BitmapAction::Remove(a)),
            TransactionAction::BlockDirtyBitmapClear(a) => bitmap(BitmapAction::Clear(a)),
            TransactionAction::BlockDirtyBitmapEnable(a) => bitmap(BitmapAction::Enable(a, true)),
            TransactionAction::BlockDirtyBitmapDisable(a) => bitmap(BitmapAction::Enable(a, false)),
            TransactionAction::BlockDirtyBitmapMerge(a) => bitmap(BitmapAction::Merge(a)),
            TransactionAction::BlockdevBackup(a) => {
                Box::new(BackupAction::new(BackupArgs::Blockdev(*a)))
            }
            TransactionAction::BlockdevSnapshot(a) => Box::new(ExternalSnapshot::node(a)),
            TransactionAction::BlockdevSnapshotInternalSync(a) => {
                Box::new(InternalSnapshotAction::new(a))
            }
            TransactionAction::BlockdevSnapshotSync(a) => Box::new(ExternalSnapshot::sync(a)),
            TransactionAction::DriveBackup(a) => Box::new(BackupAction::new(BackupArgs::Drive(*a))),
        }
    }
}

fn bitmap(a: BitmapAction) -> Box<dyn TxnAction> {
    Box::new(BitmapTxn::new(a))
}

/// QEMU's `abort_action`: its prepare always fails.
struct AbortAction;

impl TxnAction for AbortAction {
    fn prepare<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, R<()>> {
        Box::pin(async { Err(gen("Transaction aborted using Abort action")) })
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
enum CompletionMode {
    #[default]
    Individual,
    Grouped,
}

impl CompletionMode {
    fn as_str(self) -> &'static str {
        match self {
            CompletionMode::Individual => "individual",
            CompletionMode::Grouped => "grouped",
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Properties {
    completion_mode: Option<CompletionMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transaction {
    actions: Vec<TransactionAction>,
    properties: Option<Properties>,
}

/// Runs prepared-in-order, all-or-nothing actions under `g`; see the
/// [module docs](self).
pub(super) async fn run(
    st: &State,
    g: &ControlGuard,
    mut actions: Vec<Box<dyn TxnAction>>,
) -> R<()> {
    let mut failure = None;
    let mut prepared = 0;
    for a in actions.iter_mut() {
        prepared += 1;
        if let Err(e) = a.prepare(st, g).await {
            failure = Some(e);
            break;
        }
    }
    let done = &mut actions[..prepared];
    match &failure {
        None => {
            for a in done.iter_mut().rev() {
                a.commit(st, g).await;
            }
        }
        Some(_) => {
            for a in done.iter_mut().rev() {
                a.abort(st, g).await;
            }
        }
    }
    for a in done.iter_mut().rev() {
        a.clean(st, g).await;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A one-action transaction (QEMU's `blockdev_do_action`).
pub(super) async fn run_one(st: &State, action: Box<dyn TxnAction>) -> R<()> {
    let g = st.control.lock().await;
    run(st, &g, vec![action]).await
}

async fn transaction(st: &State, t: Transaction) -> R<()> {
    let mode = t
        .properties
        .and_then(|p| p.completion_mode)
        .unwrap_or_default();
    if mode != CompletionMode::Individual {
        if let Some(a) = t.actions.iter().find(|a| !a.makes_job()) {
            return Err(gen(format!(
                "Action '{}' does not support transaction property completion-mode = {}",
                a.kind(),
                mode.as_str()
            )));
        }
        // blockd has no job transactions (QEMU's JobTxn): one job is a
        // group of its own, more cannot be tied together.
        if t.actions.len() > 1 {
            return Err(gen(
                "completion-mode = grouped with more than one job is not supported by blockd",
            ));
        }
    }
    let g = st.control.lock().await;
    let actions = t
        .actions
        .into_iter()
        .map(TransactionAction::into_action)
        .collect();
    run(st, &g, actions).await
}

/// Registers `transaction`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("transaction", |cx: Ctx<State>, t: Transaction| async move {
        transaction(&cx.state, t).await?;
        R::Ok(Empty {})
    });
}
