//! Backend commands: `query-block`, `query-blockstats`, trays and media
//! (`eject`, `blockdev-open-tray`, `blockdev-close-tray`,
//! `blockdev-remove-medium`, `blockdev-insert-medium`,
//! `blockdev-change-medium`).

use blockd_qmp::{Ctx, Dispatcher, Empty, NoArgs, QmpError, RawReply};
use serde::Deserialize;

use crate::machine::drive::{open_medium, MediumSpec};
use crate::machine::query;
use crate::state::State;

type R<T> = Result<T, QmpError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryStats {
    #[serde(rename = "query-nodes")]
    query_nodes: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tray {
    device: Option<String>,
    id: Option<String>,
    force: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseTray {
    device: Option<String>,
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Insert {
    id: String,
    #[serde(rename = "node-name")]
    node_name: String,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum ReadOnlyMode {
    Retain,
    ReadOnly,
    ReadWrite,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    device: Option<String>,
    id: Option<String>,
    filename: String,
    format: Option<String>,
    force: Option<bool>,
    #[serde(rename = "read-only-mode")]
    read_only_mode: Option<ReadOnlyMode>,
}

/// Registers the backend commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register("query-block", |cx: Ctx<State>, _: NoArgs| async move {
        // Written straight to text: fast with thousands of backends.
        let list = cx.state.machine.listed_backends();
        R::Ok(RawReply(crate::machine::fast::query_block(&list)))
    });
    d.register(
        "query-blockstats",
        |cx: Ctx<State>, a: QueryStats| async move {
            let st = &cx.state;
            if a.query_nodes.unwrap_or(false) {
                let nodes = st.graph.nodes();
                return R::Ok(RawReply(query::blockstats_nodes(&nodes)));
            }
            let list = st.machine.listed_backends();
            R::Ok(RawReply(query::blockstats_backends(&list)))
        },
    );
    d.register("eject", |cx: Ctx<State>, a: Tray| async move {
        let st = &cx.state;
        let g = st.control.lock().await;
        let nodes = st.machine.eject(
            &st.graph,
            a.device.as_deref(),
            a.id.as_deref(),
            a.force.unwrap_or(false),
        )?;
        drop(g);
        crate::machine::close_nodes(nodes).await;
        R::Ok(Empty {})
    });
    d.register("blockdev-open-tray", |cx: Ctx<State>, a: Tray| async move {
        cx.state.machine.open_tray(
            a.device.as_deref(),
            a.id.as_deref(),
            a.force.unwrap_or(false),
        )?;
        R::Ok(Empty {})
    });
    d.register(
        "blockdev-close-tray",
        |cx: Ctx<State>, a: CloseTray| async move {
            cx.state
                .machine
                .close_tray(a.device.as_deref(), a.id.as_deref())?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-remove-medium",
        |cx: Ctx<State>, a: Id| async move {
            let st = &cx.state;
            let g = st.control.lock().await;
            let nodes = st.machine.remove_medium(&st.graph, &a.id)?;
            drop(g);
            crate::machine::close_nodes(nodes).await;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-insert-medium",
        |cx: Ctx<State>, a: Insert| async move {
            let st = &cx.state;
            let _g = st.control.lock().await;
            st.machine.insert_medium(&st.graph, &a.id, &a.node_name)?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-change-medium",
        |cx: Ctx<State>, a: Change| async move { change_medium(&cx.state, a).await },
    );
}

/// `blockdev-change-medium`: the new medium is opened first (so a file
/// that cannot be opened leaves the device untouched), then swapped in.
async fn change_medium(st: &State, a: Change) -> R<Empty> {
    let (device, id) = (a.device.as_deref(), a.id.as_deref());
    let blk = st.machine.lock().get_blk(device, id)?;
    let rs = blk.root_state();
    let mut spec = MediumSpec::from_root_state(&a.filename, a.format.as_deref(), &rs);
    match a.read_only_mode.unwrap_or(ReadOnlyMode::Retain) {
        ReadOnlyMode::Retain => {}
        ReadOnlyMode::ReadOnly => spec.read_only = true,
        ReadOnlyMode::ReadWrite => spec.read_only = false,
    }
    let (node, probed) = open_medium(&st.graph, &st.env, &spec)
        .await
        .map_err(crate::qmp::qerr)?;
    let force = a.force.unwrap_or(false);
    let g = st.control.lock().await;
    let changed = st.machine.change_medium(&st.graph, device, id, force, node);
    drop(g);
    match changed {
        Ok(old) => {
            blk.set_probed_raw(probed);
            crate::machine::close_nodes(old).await;
            Ok(Empty {})
        }
        Err((e, nodes)) => {
            crate::machine::close_nodes(nodes).await;
            Err(e)
        }
    }
}
