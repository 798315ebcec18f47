//! `block_resize` (QEMU's `qmp_block_resize`, `blockdev.c`) and
//! `block-set-write-threshold` (`qmp_block_set_write_threshold`,
//! `block/write-threshold.c`).

use std::sync::Arc;

use blockd_core::blocker::{self, BlockOp};
use blockd_core::{Perm, PermPair, Root, RootKind};
use blockd_qmp::{Ctx, Dispatcher, Empty, EventBus, QmpError};
use serde::Deserialize;

use super::block::qerr;
use super::blockjob::lookup_bs;
use crate::events::BlockWriteThreshold;
use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockResize {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SetWriteThreshold {
    node_name: String,
    write_threshold: u64,
}

async fn block_resize(st: &State, a: BlockResize) -> R<()> {
    let _g = st.control.lock().await;
    let bs = lookup_bs(st, a.device.as_deref(), a.node_name.as_deref())?;
    if a.size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    blocker::check(&bs, BlockOp::Resize).map_err(qerr)?;
    // QEMU's blk_co_new_with_bs(bs, BLK_PERM_RESIZE, BLK_PERM_ALL).
    let root = Root::new(
        RootKind::Backend,
        "",
        PermPair {
            perm: Perm::RESIZE,
            shared: Perm::ALL,
        },
    );
    st.graph.attach_root(&root, &bs).map_err(qerr)?;
    let r = bs.resize(a.size as u64).await;
    st.graph.detach_root(&root);
    r.map_err(qerr)
}

/// Registers the commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "block_resize",
        |cx: Ctx<State>, a: BlockResize| async move {
            block_resize(&cx.state, a).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-set-write-threshold",
        |cx: Ctx<State>, a: SetWriteThreshold| async move {
            let st = &cx.state;
            let Some(bs) = st.graph.get(&a.node_name) else {
                return Err(QmpError::generic(format!(
                    "Device '{}' not found",
                    a.node_name
                )));
            };
            let events: EventBus = st.events.clone();
            let sink: blockd_core::threshold::ThresholdSink =
                Arc::new(move |node: &str, amount: u64, threshold: u64| {
                    events.send(&BlockWriteThreshold {
                        node_name: node.to_string(),
                        amount_exceeded: amount,
                        write_threshold: threshold,
                    });
                });
            bs.set_write_threshold(a.write_threshold, Some(sink));
            R::Ok(Empty {})
        },
    );
}
