//! `blockdev-reopen`: turning a list of `BlockdevOptions` into a reopen of
//! the graph (QEMU's `qmp_blockdev_reopen`, `bdrv_reopen_queue_child` and
//! the option checks of `bdrv_reopen_prepare`).
//!
//! Each entry names an existing node (`node-name` is required) and gives
//! its complete new options. Options the entry leaves out return to their
//! defaults (`read-only`, `auto-read-only`, `cache.*`, `detect-zeroes`),
//! except `discard`, which stays as it is, as in QEMU. The checks, in
//! QEMU's order and wording:
//!
//! 1. an option the node was opened with and that cannot change may not be
//!    left out (`Option 'X' cannot be reset to its default value`);
//! 2. a node that has a backing file (or whose image names one) needs
//!    `backing` in the entry (`backing is missing for 'X'`);
//! 3. the driver stays (`Cannot change the option 'driver'`);
//! 4. an option that cannot change keeps its value
//!    (`Cannot change the option 'X'`); what can change is per driver
//!    ([`mutable_options`]);
//! 5. children: a node-name points the child at that node (`file`, `image`,
//!    and `backing`, which must not make a cycle); `backing: null` removes
//!    the backing child; an inline definition reopens the current child
//!    with those options (it must not name another node).
//!
//! Children that were opened with their parent and take its options
//! (inline children, implicit backing files) are reopened with it, keeping
//! what they set themselves. The graph then prepares, checks permissions
//! and commits all of it at once ([`BlockGraph::reopen`]), or nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use blockd_core::{
    BlockError, BlockGraph, BlockNode, ChildRole, ControlGuard, DetectZeroes, NodeOptions,
    ReopenSpec,
};
use serde_json::Value;

use crate::open::{inherited_options, node_options, options_json, Inherit};
use crate::options::{BlockdevOptions, BlockdevRef, BlockdevRefOrNull, DriverOptions};

/// Options of a driver that a reopen may change (QEMU's `mutable_opts`
/// and what each driver's `reopen_prepare` takes).
pub fn mutable_options(driver: &str) -> &'static [&'static str] {
    match driver {
        "file" => &["drop-cache"],
        "raw" => &["offset", "size"],
        "throttle" => &["throttle-group"],
        "qcow2" => &[
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        ],
        _ => &[],
    }
}

/// The names of the child options of each driver.
fn child_options(driver: &str) -> &'static [&'static str] {
    match driver {
        "raw" => &["file"],
        "qcow2" => &["file", "backing", "data-file"],
        "blkdebug" => &["image"],
        _ => &[],
    }
}

/// Options every node has, handled by the core, not compared here.
const COMMON: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
    "force-share",
];

/// A node's driver-specific options, flattened to dotted keys
/// (`overlap-check.template`), children and common options left out.
fn specific(driver: &str, v: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(&format!("{prefix}{k}."), v, out);
                }
            }
            v => {
                out.insert(prefix.trim_end_matches('.').to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Value::Object(m) = v {
        for (k, v) in m {
            if COMMON.contains(&k.as_str()) || child_options(driver).contains(&k.as_str()) {
                continue;
            }
            match v {
                Value::Object(_) => walk(&format!("{k}."), v, &mut out),
                v => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

fn is_mutable(driver: &str, key: &str) -> bool {
    let top = key.split('.').next().unwrap_or(key);
    mutable_options(driver).contains(&top)
}

/// What the reopen will do, built entry by entry.
#[derive(Default)]
struct Plan {
    specs: Vec<ReopenSpec>,
    /// The options to record on each explicitly listed node afterwards.
    recorded: Vec<(Arc<BlockNode>, Value)>,
    planned: HashSet<u64>,
    /// Edges being changed: (parent id, child name).
    changed_edges: HashSet<(u64, String)>,
}

/// `blockdev-reopen`: see the [module docs](self). Returns the nodes that
/// left the graph (children that lost their last user), to be closed.
pub async fn blockdev_reopen(
    graph: &BlockGraph,
    control: &ControlGuard,
    entries: Vec<BlockdevOptions>,
) -> Result<Vec<Arc<BlockNode>>, BlockError> {
    if entries.is_empty() {
        return Err(BlockError::invalid(
            "blockdev-reopen needs at least one node in 'options'",
        ));
    }
    let mut plan = Plan::default();
    for e in entries {
        let name = e
            .node_name
            .clone()
            .ok_or_else(|| BlockError::invalid("node-name not specified"))?;
        let node = graph.get(&name).ok_or_else(|| {
            BlockError::not_found(format!("Failed to find node with node-name='{name}'"))
        })?;
        plan_entry(graph, &mut plan, &node, e)?;
    }
    // Children that take their options from a reopened parent follow it.
    let mut i = 0;
    while i < plan.specs.len() {
        let (parent, opts) = (plan.specs[i].node.clone(), plan.specs[i].options);
        for c in parent.children() {
            let child = c.node();
            if !c.inherits()
                || plan.planned.contains(&child.id())
                || plan
                    .changed_edges
                    .contains(&(parent.id(), c.name().to_string()))
            {
                continue;
            }
            let new = inherited_options(&child, &opts, c.role());
            if new == child.options() {
                continue;
            }
            plan.planned.insert(child.id());
            plan.specs.push(ReopenSpec {
                node: child,
                options: new,
                children: Vec::new(),
                driver_opts: None,
            });
        }
        i += 1;
    }
    let removed = graph.reopen(control, plan.specs).await?;
    for (n, v) in plan.recorded {
        n.set_open_options(v);
    }
    Ok(removed)
}

/// Plans the reopen of `node` with the options of entry `e` (a listed
/// node, or an inline definition of one of a listed node's children).
fn plan_entry(
    graph: &BlockGraph,
    plan: &mut Plan,
    node: &Arc<BlockNode>,
    e: BlockdevOptions,
) -> Result<(), BlockError> {
    let cur_driver = node.driver().format_name();
    let new_driver = e.driver.name();
    let old_json = node.open_options();
    let new_json = options_json(&e);
    let old = specific(cur_driver, &old_json);
    let new = specific(new_driver, &new_json);
    for k in old.keys() {
        if !new.contains_key(k) && !is_mutable(cur_driver, k) {
            return Err(BlockError::invalid(format!(
                "Option '{k}' cannot be reset to its default value"
            )));
        }
    }
    if old_json.get("force-share").is_some() && e.force_share.is_none() {
        return Err(BlockError::invalid(
            "Option 'force-share' cannot be reset to its default value",
        ));
    }
    // QEMU: 'backing' must be given if the node has a backing child or
    // its image names a backing file.
    let has_backing = node.backing().is_some() || node.driver().info().backing_filename.is_some();
    if cur_driver == "qcow2"
        && has_backing
        && !matches!(&e.driver, DriverOptions::Qcow2(q) if q.backing.is_some())
    {
        return Err(BlockError::invalid(format!(
            "backing is missing for '{}'",
            node.name()
        )));
    }
    if new_driver != cur_driver {
        return Err(BlockError::invalid("Cannot change the option 'driver'"));
    }
    for (k, v) in &new {
        if old.get(k) != Some(v) && !is_mutable(cur_driver, k) {
            return Err(BlockError::invalid(format!(
                "Cannot change the option '{k}'"
            )));
        }
    }
    // force-share cannot be given in a reopen at all (QEMU consumes it at
    // open, so any value differs from the recorded none).
    if e.force_share.is_some() {
        return Err(BlockError::invalid(
            "Cannot change the option 'force-share'",
        ));
    }
    let options = reopen_node_options(node, &e)?;
    if !plan.planned.insert(node.id()) {
        return Err(BlockError::invalid(format!(
            "Node '{}' is listed more than once",
            node.name()
        )));
    }

    // Children.
    let mut children = Vec::new();
    let mut inline = Vec::new();
    match &e.driver {
        DriverOptions::Raw(r) => {
            child_ref(graph, node, "file", &r.file, &mut children, &mut inline)?
        }
        DriverOptions::Blkdebug(b) => {
            child_ref(graph, node, "image", &b.image, &mut children, &mut inline)?
        }
        DriverOptions::Throttle(t) => {
            child_ref(graph, node, "file", &t.file, &mut children, &mut inline)?
        }
        DriverOptions::Qcow2(q) => {
            child_ref(graph, node, "file", &q.file, &mut children, &mut inline)?;
            match &q.backing {
                Some(BlockdevRefOrNull::Null(())) if node.child("backing").is_some() => {
                    children.push(("backing".to_string(), ChildRole::COW, None));
                }
                Some(BlockdevRefOrNull::Null(())) => {}
                Some(BlockdevRefOrNull::Reference(r)) => {
                    let t = target(graph, node, "backing", r)?;
                    if !node.child("backing").is_some_and(|c| c.points_at(&t)) {
                        children.push(("backing".to_string(), ChildRole::COW, Some(t)));
                    }
                }
                Some(BlockdevRefOrNull::Definition(d)) => {
                    inline_child(node, "backing", d, &mut inline)?
                }
                None => {}
            }
        }
        DriverOptions::File(_)
        | DriverOptions::Null(_)
        | DriverOptions::Nbd(_)
        | DriverOptions::Rbd(_) => {}
    }
    for (name, _, _) in &children {
        plan.changed_edges.insert((node.id(), name.clone()));
    }
    plan.recorded.push((node.clone(), new_json));
    plan.specs.push(ReopenSpec {
        node: node.clone(),
        options,
        children,
        driver_opts: Some(Box::new(e.driver)),
    });
    for (child, opts) in inline {
        plan_entry(graph, plan, &child, *opts)?;
    }
    Ok(())
}

fn lookup(graph: &BlockGraph, name: &str) -> Result<Arc<BlockNode>, BlockError> {
    graph.get(name).ok_or_else(|| {
        BlockError::not_found(format!("Cannot find device='' nor node-name='{name}'"))
    })
}

/// The node a child option names, which must exist and must not make a
/// cycle when it becomes `node`'s child `name`.
fn target(
    graph: &BlockGraph,
    node: &BlockNode,
    name: &str,
    r: &str,
) -> Result<Arc<BlockNode>, BlockError> {
    let t = lookup(graph, r)?;
    if would_cycle(&t, node) {
        return Err(BlockError::invalid(format!(
            "Making '{}' a {name} child of '{}' would create a cycle",
            t.name(),
            node.name()
        )));
    }
    Ok(t)
}

/// Whether making `target` a child of `node` would make a cycle: `node`
/// is `target` or lies below it.
fn would_cycle(target: &Arc<BlockNode>, node: &BlockNode) -> bool {
    let mut todo = vec![target.clone()];
    let mut seen = HashSet::new();
    while let Some(n) = todo.pop() {
        if n.id() == node.id() {
            return true;
        }
        if seen.insert(n.id()) {
            todo.extend(n.children().iter().map(|c| c.node()));
        }
    }
    false
}

type Inline = Vec<(Arc<BlockNode>, Box<BlockdevOptions>)>;
type ChildChanges = Vec<(String, ChildRole, Option<Arc<BlockNode>>)>;

/// A `file`/`image` child option: a reference moves the edge (if it
/// differs), a definition reopens the current child.
fn child_ref(
    graph: &BlockGraph,
    node: &Arc<BlockNode>,
    name: &str,
    r: &BlockdevRef,
    changes: &mut ChildChanges,
    inline: &mut Inline,
) -> Result<(), BlockError> {
    match r {
        BlockdevRef::Reference(r) => {
            let t = target(graph, node, name, r)?;
            match node.child(name) {
                Some(c) if c.points_at(&t) => {}
                Some(c) => changes.push((name.to_string(), c.role(), Some(t))),
                None => {
                    return Err(BlockError::invalid(format!(
                        "Cannot change the option '{name}'"
                    )))
                }
            }
            Ok(())
        }
        BlockdevRef::Definition(d) => inline_child(node, name, d, inline),
    }
}

/// An inline definition in a reopen: options for the current child,
/// which it must not rename.
fn inline_child(
    node: &Arc<BlockNode>,
    name: &str,
    d: &BlockdevOptions,
    inline: &mut Inline,
) -> Result<(), BlockError> {
    let Some(c) = node.child(name) else {
        return Err(BlockError::invalid(format!(
            "Cannot change the option '{name}.driver'"
        )));
    };
    let child = c.node();
    if d.node_name.as_deref().is_some_and(|n| n != child.name()) {
        return Err(BlockError::invalid("Cannot change the option 'node-name'"));
    }
    let mut d = d.clone();
    d.node_name = Some(child.name().to_string());
    inline.push((child, Box::new(d)));
    Ok(())
}

/// The common options of a listed node after the reopen: what the entry
/// gives, defaults for the rest, except `discard`, which stays.
fn reopen_node_options(node: &BlockNode, e: &BlockdevOptions) -> Result<NodeOptions, BlockError> {
    let cur = node.options();
    let mut o = node_options(e, Inherit::default());
    if e.discard.is_none() {
        o.discard_unmap = cur.discard_unmap;
    }
    // force-share never changes in a reopen (refused above).
    o.force_share = cur.force_share;
    if o.detect_zeroes == DetectZeroes::Unmap && !o.discard_unmap {
        return Err(BlockError::invalid(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    Ok(o)
}

/// QEMU's `bdrv_reopen_set_read_only`: reopens `node` read-only or
/// read-write, keeping its other options; children that take their
/// options from it follow. Returns the nodes to close (none in practice).
pub async fn set_read_only(
    graph: &BlockGraph,
    control: &ControlGuard,
    node: &Arc<BlockNode>,
    read_only: bool,
) -> Result<Vec<Arc<BlockNode>>, BlockError> {
    let options = NodeOptions {
        read_only,
        ..node.options()
    };
    let mut specs = vec![ReopenSpec {
        node: node.clone(),
        options,
        children: Vec::new(),
        driver_opts: None,
    }];
    let mut i = 0;
    while i < specs.len() {
        let (parent, popts) = (specs[i].node.clone(), specs[i].options);
        for c in parent.children() {
            let child = c.node();
            if !c.inherits() || specs.iter().any(|s| s.node.id() == child.id()) {
                continue;
            }
            let new = inherited_options(&child, &popts, c.role());
            if new != child.options() {
                specs.push(ReopenSpec {
                    node: child,
                    options: new,
                    children: Vec::new(),
                    driver_opts: None,
                });
            }
        }
        i += 1;
    }
    graph.reopen(control, specs).await
}
