//! Dirty bitmap commands (QEMU's `block/monitor/bitmap-qmp-cmds.c`):
//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable`,
//! `-merge` and `x-debug-block-dirty-bitmap-sha256`. The logic, split for
//! transactions, is in [`crate::bitmaps`]; every error is GenericError.

use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::{Deserialize, Serialize};

use blockd_core::ControlGuard;

use super::transaction::{run_one, TxnAction, TxnFuture};
use crate::bitmaps::{self, AddArgs, Source};
use crate::qmp::qerr;
use crate::state::State;

type R<T> = Result<T, QmpError>;

/// `BlockDirtyBitmapAdd`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Add {
    node: String,
    name: String,
    granularity: Option<u32>,
    persistent: Option<bool>,
    disabled: Option<bool>,
}

/// `BlockDirtyBitmap`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Named {
    node: String,
    name: String,
}

/// `BlockDirtyBitmapOrStr`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OrStr {
    Local(String),
    External(Named),
}

/// `BlockDirtyBitmapMerge`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Merge {
    node: String,
    target: String,
    bitmaps: Vec<OrStr>,
}

#[derive(Serialize)]
struct Sha256 {
    sha256: String,
}

fn add(st: &State, a: &Add) -> Result<bitmaps::Added, blockd_core::BlockError> {
    let args = AddArgs {
        node: &a.node,
        name: &a.name,
        granularity: a.granularity.map(u64::from),
        persistent: a.persistent.unwrap_or(false),
        disabled: a.disabled.unwrap_or(false),
    };
    bitmaps::add(st, args)
}

/// A bitmap change as a transaction action (QEMU's
/// `block_dirty_bitmap_*_action`s): the change is made in prepare and
/// undone on abort; a removal takes effect at commit.
pub(super) enum BitmapAction {
    /// `block-dirty-bitmap-add`.
    Add(Add),
    /// `block-dirty-bitmap-remove`.
    Remove(Named),
    /// `block-dirty-bitmap-clear`.
    Clear(Named),
    /// `block-dirty-bitmap-enable` (`true`) or `-disable`.
    Enable(Named, bool),
    /// `block-dirty-bitmap-merge`.
    Merge(Merge),
}

/// What a prepared bitmap action can undo or finish.
enum Undo {
    Added(bitmaps::Added),
    Removing(bitmaps::Removing),
    Restore(bitmaps::Restore),
    Toggled(bitmaps::Toggled),
}

/// A [`BitmapAction`] with what its prepare did.
pub(super) struct BitmapTxn {
    action: BitmapAction,
    undo: Option<Undo>,
}

impl BitmapTxn {
    /// A new action.
    pub(super) fn new(action: BitmapAction) -> Self {
        BitmapTxn { action, undo: None }
    }
}

impl TxnAction for BitmapTxn {
    fn prepare<'a>(&'a mut self, st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, R<()>> {
        Box::pin(async move {
            let undo = match &self.action {
                BitmapAction::Add(a) => Undo::Added(add(st, a).map_err(qerr)?),
                BitmapAction::Remove(a) => Undo::Removing(
                    bitmaps::remove_prepare(st, &a.node, &a.name)
                        .await
                        .map_err(qerr)?,
                ),
                BitmapAction::Clear(a) => {
                    Undo::Restore(bitmaps::clear(st, &a.node, &a.name).map_err(qerr)?)
                }
                BitmapAction::Enable(a, on) => {
                    Undo::Toggled(bitmaps::set_enabled(st, &a.node, &a.name, *on).map_err(qerr)?)
                }
                BitmapAction::Merge(a) => Undo::Restore(
                    bitmaps::merge(st, &a.node, &a.target, &sources_of(&a.bitmaps))
                        .map_err(qerr)?,
                ),
            };
            self.undo = Some(undo);
            Ok(())
        })
    }

    fn commit<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            if let Some(Undo::Removing(r)) = self.undo.take() {
                r.commit();
            }
        })
    }

    fn abort<'a>(&'a mut self, _st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            match self.undo.take() {
                Some(Undo::Added(u)) => u.abort(),
                Some(Undo::Removing(u)) => u.abort(),
                Some(Undo::Restore(u)) => u.abort(),
                Some(Undo::Toggled(u)) => u.abort(),
                None => {}
            }
        })
    }
}

fn sources_of(list: &[OrStr]) -> Vec<Source> {
    list.iter()
        .map(|s| match s {
            OrStr::Local(n) => Source::Local(n.clone()),
            OrStr::External(Named { node, name }) => Source::External {
                node: node.clone(),
                name: name.clone(),
            },
        })
        .collect()
}

/// Registers the bitmap commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "block-dirty-bitmap-add",
        |cx: Ctx<State>, a: Add| async move {
            run_one(&cx.state, Box::new(BitmapTxn::new(BitmapAction::Add(a)))).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-dirty-bitmap-remove",
        |cx: Ctx<State>, a: Named| async move {
            run_one(&cx.state, Box::new(BitmapTxn::new(BitmapAction::Remove(a)))).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-dirty-bitmap-clear",
        |cx: Ctx<State>, a: Named| async move {
            run_one(&cx.state, Box::new(BitmapTxn::new(BitmapAction::Clear(a)))).await?;
            R::Ok(Empty {})
        },
    );
    for (cmd, on) in [
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-disable", false),
    ] {
        d.register(cmd, move |cx: Ctx<State>, a: Named| async move {
            let action = BitmapAction::Enable(a, on);
            run_one(&cx.state, Box::new(BitmapTxn::new(action))).await?;
            R::Ok(Empty {})
        });
    }
    d.register(
        "block-dirty-bitmap-merge",
        |cx: Ctx<State>, a: Merge| async move {
            run_one(&cx.state, Box::new(BitmapTxn::new(BitmapAction::Merge(a)))).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "x-debug-block-dirty-bitmap-sha256",
        |cx: Ctx<State>, a: Named| async move {
            let sha256 = bitmaps::sha256(&cx.state, &a.node, &a.name).map_err(qerr)?;
            R::Ok(Sha256 { sha256 })
        },
    );
}
