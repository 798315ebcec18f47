//! Block graph commands: `blockdev-add`, `blockdev-del`,
//! `query-named-block-nodes`, `x-debug-query-block-graph`.

use std::collections::HashMap;
use std::sync::Arc;

use blockd_core::dirty::{Check, NamedBitmap};
use blockd_core::{BlockError, BlockNode, ChildRole, Parent};
use blockd_drivers::options::BlockdevOptions;
use blockd_qmp::{Ctx, Dispatcher, Empty, QmpError, Session};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::state::State;

type R<T> = Result<T, QmpError>;

/// Control-path errors are GenericError with the core's message (QEMU's
/// wording lives there).
pub fn qerr(e: BlockError) -> QmpError {
    QmpError::generic(e.msg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeName {
    #[serde(rename = "node-name")]
    node_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reopen {
    options: Vec<BlockdevOptions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryNodes {
    flat: Option<bool>,
}

/// The requesting monitor's `getfd` descriptors, for the `nbd` driver.
struct SessionFds(Arc<Session>);

impl blockd_drivers::NamedFds for SessionFds {
    fn take(&self, name: &str) -> Option<std::os::fd::OwnedFd> {
        self.0
            .named_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }
}

/// Registers the block graph commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "blockdev-add",
        |cx: Ctx<State>, opts: BlockdevOptions| async move {
            let st = &cx.state;
            // Node-names and backend names share a namespace (QEMU's
            // bdrv_assign_node_name).
            if let Some(n) = opts.node_name.as_deref() {
                if st.machine.backend_by_name(n).is_some() {
                    return Err(QmpError::generic(format!(
                        "node-name={n} is conflicting with a device id"
                    )));
                }
            }
            let _g = st.control.lock().await;
            let env = blockd_drivers::Env {
                named_fds: Some(Arc::new(SessionFds(cx.session.clone()))),
                ..st.env.clone()
            };
            blockd_drivers::blockdev_add(&st.graph, &env, opts)
                .await
                .map_err(qerr)?;
            R::Ok(Empty {})
        },
    );
    d.register("blockdev-del", |cx: Ctx<State>, a: NodeName| async move {
        let g = cx.state.control.lock().await;
        // A node nobody uses may still have a bitmap another node's
        // export offers: qemu-storage-daemon 10.0.2 crashes closing it.
        if let Some(n) = cx.state.graph.get(&a.node_name) {
            if n.parents().is_empty() {
                for b in n.dirty_bitmaps().list() {
                    b.check(Check::BUSY).map_err(qerr)?;
                }
            }
        }
        let removed = cx.state.graph.remove(&a.node_name).map_err(qerr)?;
        drop(g);
        close_nodes(removed).await;
        R::Ok(Empty {})
    });
    d.register("blockdev-reopen", |cx: Ctx<State>, a: Reopen| async move {
        let st = &cx.state;
        let g = st.control.lock().await;
        let removed = blockd_drivers::blockdev_reopen(&st.graph, &g, a.options)
            .await
            .map_err(qerr)?;
        drop(g);
        close_nodes(removed).await;
        R::Ok(Empty {})
    });
    d.register(
        "query-named-block-nodes",
        |cx: Ctx<State>, a: QueryNodes| async move {
            let flat = a.flat.unwrap_or(false);
            // Newest first, as QEMU's bdrv_named_nodes_list builds it.
            let nodes = cx.state.graph.nodes();
            R::Ok(Value::Array(
                nodes
                    .iter()
                    .rev()
                    .map(|n| block_device_info(n, flat))
                    .collect(),
            ))
        },
    );
    d.register(
        "x-debug-query-block-graph",
        |cx: Ctx<State>, _: blockd_qmp::NoArgs| async move { R::Ok(debug_graph(&cx.state)) },
    );
}

/// Closes nodes that left the graph, parents before children.
pub async fn close_nodes(nodes: Vec<Arc<BlockNode>>) {
    for n in nodes {
        if let Err(e) = n.close().await {
            tracing::warn!(node = n.name(), error = %e, "error closing node");
        }
    }
}

/// The backing node proper (QEMU's `bdrv_cow_bs`): a filter's
/// `backing` child is its filtered child, not a backing file.
fn backing(n: &BlockNode) -> Option<Arc<BlockNode>> {
    n.child("backing")
        .filter(|c| c.role().has(ChildRole::COW))
        .map(|c| c.node())
}

fn backing_depth(n: &BlockNode) -> u64 {
    let mut depth = 0;
    let mut cur = backing(n);
    while let Some(b) = cur {
        depth += 1;
        cur = backing(&b);
    }
    depth
}

/// `ImageInfo` of a node; with `nested`, the backing image is included.
pub fn image_info(n: &BlockNode, nested: bool) -> Value {
    let info = n.driver().info();
    let mut m = Map::new();
    m.insert("filename".into(), n.filename().into());
    m.insert("format".into(), n.driver().format_name().into());
    m.insert("dirty-flag".into(), info.dirty.unwrap_or(false).into());
    if let Some(a) = n.allocated_size() {
        m.insert("actual-size".into(), a.into());
    }
    m.insert("virtual-size".into(), n.length().into());
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), c.into());
    }
    if let Some(f) = &info.backing_filename {
        m.insert("backing-filename".into(), f.clone().into());
        if let Some(b) = backing(n) {
            m.insert("full-backing-filename".into(), b.filename().into());
        }
        if let Some(fmt) = &info.backing_format {
            m.insert("backing-filename-format".into(), fmt.clone().into());
        }
    }
    if let Some(sns) = n.driver().snapshots().filter(|s| !s.is_empty()) {
        m.insert(
            "snapshots".into(),
            sns.iter().map(|s| s.to_json()).collect::<Vec<_>>().into(),
        );
    }
    if let Some(fs) = info.format_specific {
        m.insert("format-specific".into(), fs);
    }
    if nested {
        if let Some(b) = backing(n) {
            m.insert("backing-image".into(), image_info(&b, true));
        }
    }
    Value::Object(m)
}

/// `BlockDeviceInfo` of a node.
pub fn block_device_info(n: &BlockNode, flat: bool) -> Value {
    let o = n.options();
    let mut m = Map::new();
    m.insert("file".into(), n.filename().into());
    m.insert("node-name".into(), n.name().into());
    m.insert("ro".into(), n.read_only().into());
    m.insert("drv".into(), n.driver().format_name().into());
    if let Some(b) = backing(n) {
        m.insert("backing_file".into(), b.filename().into());
    }
    // QEMU counts the backing images it gathered, none in flat output.
    let depth = if flat { 0 } else { backing_depth(n) };
    m.insert("backing_file_depth".into(), depth.into());
    m.insert("active".into(), true.into());
    m.insert("encrypted".into(), false.into());
    m.insert("detect_zeroes".into(), o.detect_zeroes.as_str().into());
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(k.into(), 0.into());
    }
    m.insert("image".into(), image_info(n, !flat));
    m.insert(
        "cache".into(),
        json!({"writeback": true, "direct": o.cache_direct, "no-flush": o.cache_no_flush}),
    );
    m.insert("write_threshold".into(), n.write_threshold().into());
    let bitmaps = n.dirty_bitmaps().list();
    if !bitmaps.is_empty() {
        m.insert(
            "dirty-bitmaps".into(),
            bitmaps.iter().map(|b| dirty_info(b)).collect(),
        );
    }
    Value::Object(m)
}

/// `BlockDirtyInfo` of a bitmap (QEMU's `bdrv_query_dirty_bitmaps`).
fn dirty_info(b: &NamedBitmap) -> Value {
    let mut m = Map::new();
    if !b.name().is_empty() {
        m.insert("name".into(), b.name().into());
    }
    m.insert("count".into(), b.bits().dirty_bytes().into());
    m.insert("granularity".into(), b.granularity().into());
    m.insert("recording".into(), b.recording().into());
    m.insert("busy".into(), b.busy().into());
    m.insert("persistent".into(), b.persistent().into());
    if b.inconsistent() {
        m.insert("inconsistent".into(), true.into());
    }
    Value::Object(m)
}

/// Permission names as QEMU's `x-debug-query-block-graph` lists them
/// (highest bit first).
fn perm_names(p: blockd_core::Perm) -> Vec<&'static str> {
    let mut v = p.names();
    v.reverse();
    v
}

fn debug_graph(st: &State) -> Value {
    let nodes = st.graph.nodes();
    let mut ids: HashMap<u64, u64> = HashMap::new();
    let mut root_ids: HashMap<String, u64> = HashMap::new();
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    let mut next = 1u64;
    for n in &nodes {
        ids.insert(n.id(), next);
        out_nodes.push(json!({"id": next, "type": "block-driver", "name": n.name()}));
        next += 1;
    }
    for n in &nodes {
        for e in n.parents() {
            let parent = match e.parent() {
                Some(Parent::Node(p)) => {
                    match p.upgrade().and_then(|p| ids.get(&p.id()).copied()) {
                        Some(id) => id,
                        None => continue,
                    }
                }
                Some(Parent::Root(r)) => {
                    let Some(r) = r.upgrade() else { continue };
                    // A block job is one vertex with an edge per node it
                    // holds; every other root is a block backend.
                    let (key, ty, name) = match r.job_id() {
                        Some(job) => (format!("job {job}"), "block-job", job.to_string()),
                        None => (format!("root {}", r.id()), "block-backend", r.name()),
                    };
                    *root_ids.entry(key).or_insert_with(|| {
                        let id = next;
                        next += 1;
                        out_nodes.push(json!({"id": id, "type": ty, "name": name}));
                        id
                    })
                }
                None => continue,
            };
            let p = e.perm();
            edges.push(json!({
                "parent": parent,
                "child": ids[&n.id()],
                "name": e.name(),
                "perm": perm_names(p.perm),
                "shared-perm": perm_names(p.shared),
            }));
        }
    }
    // Newest first, as QEMU's list-prepending builder leaves them.
    out_nodes.reverse();
    edges.reverse();
    json!({"nodes": out_nodes, "edges": edges})
}
