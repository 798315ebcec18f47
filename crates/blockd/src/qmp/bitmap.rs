//! Dirty bitmap commands (QEMU's `block/monitor/bitmap-qmp-cmds.c`):
//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable`,
//! `-merge` and `x-debug-block-dirty-bitmap-sha256`. The logic, split for
//! transactions, is in [`crate::bitmaps`]; every error is GenericError.

use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError};
use serde::{Deserialize, Serialize};

use crate::bitmaps::{self, AddArgs, Source};
use crate::qmp::qerr;
use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    node: String,
    name: String,
    granularity: Option<u32>,
    persistent: Option<bool>,
    disabled: Option<bool>,
}

/// `BlockDirtyBitmap`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Merge {
    node: String,
    target: String,
    bitmaps: Vec<OrStr>,
}

#[derive(Serialize)]
struct Sha256 {
    sha256: String,
}

/// Merge sources as the logic takes them.
fn sources(list: Vec<OrStr>) -> Vec<Source> {
    list.into_iter()
        .map(|s| match s {
            OrStr::Local(n) => Source::Local(n),
            OrStr::External(Named { node, name }) => Source::External { node, name },
        })
        .collect()
}

/// Registers the bitmap commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "block-dirty-bitmap-add",
        |cx: Ctx<State>, a: Add| async move {
            let _g = cx.state.control.lock().await;
            let args = AddArgs {
                node: &a.node,
                name: &a.name,
                granularity: a.granularity.map(u64::from),
                persistent: a.persistent.unwrap_or(false),
                disabled: a.disabled.unwrap_or(false),
            };
            bitmaps::add(&cx.state, args).map_err(qerr)?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-dirty-bitmap-remove",
        |cx: Ctx<State>, a: Named| async move {
            let _g = cx.state.control.lock().await;
            bitmaps::remove_prepare(&cx.state, &a.node, &a.name)
                .map_err(qerr)?
                .commit();
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-dirty-bitmap-clear",
        |cx: Ctx<State>, a: Named| async move {
            let _g = cx.state.control.lock().await;
            bitmaps::clear(&cx.state, &a.node, &a.name).map_err(qerr)?;
            R::Ok(Empty {})
        },
    );
    for (cmd, on) in [
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-disable", false),
    ] {
        d.register(cmd, move |cx: Ctx<State>, a: Named| async move {
            let _g = cx.state.control.lock().await;
            bitmaps::set_enabled(&cx.state, &a.node, &a.name, on).map_err(qerr)?;
            R::Ok(Empty {})
        });
    }
    d.register(
        "block-dirty-bitmap-merge",
        |cx: Ctx<State>, a: Merge| async move {
            let _g = cx.state.control.lock().await;
            bitmaps::merge(&cx.state, &a.node, &a.target, &sources(a.bitmaps)).map_err(qerr)?;
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
