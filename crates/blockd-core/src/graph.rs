//! The block graph: named nodes, their edges and roots, permission
//! propagation, drained sections and node replacement.
//!
//! ```text
//!   Root (backend "drive0") ─root─► qcow2 "top" ─file──► file "top-file"
//!                                        └─backing──► qcow2 "base" ─file─► file
//! ```
//!
//! Who owns what is described in [`crate::edge`]: the graph owns the name
//! index; nodes own their child edges; edges own the nodes they point at;
//! nodes know their parents (nodes and roots) through weak back-edges.
//!
//! Every change is made here and is all-or-nothing: a new tree is inserted
//! only if its names are free and every permission it needs is granted (in
//! this process and, through the `file` driver's locks, by other
//! processes); a root is attached, detached or given new permissions; the
//! parents of one node are moved to another ([`BlockGraph::replace_node`]);
//! nodes are reopened with new options ([`crate::reopen`]). If the
//! permission refresh that follows fails, the change is undone and the
//! graph is as it was. Removals release permissions and close the nodes no
//! one references any more. Opening files happens *before* the graph lock
//! is taken, so a slow open never blocks other graph operations.
//!
//! Changes that must wait for requests in flight (replacing a node,
//! reopening) run inside a drained section ([`crate::drain`]). Callers hold
//! the [`crate::ControlLock`] for every change, so changes of different
//! clients never interleave; the short synchronous lock here only keeps the
//! index consistent for queries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::control::ControlGuard;
use crate::edge::{Child, Parent};
use crate::error::BlockError;
use crate::node::BlockNode;
use crate::perm::{ChildRole, PermPair};
use crate::perms::{edge_key, refresh, topo_order, Overrides};
use crate::root::{Root, RootKind};

#[derive(Default)]
struct Inner {
    /// Named nodes in creation order.
    order: Vec<Arc<BlockNode>>,
    index: HashMap<String, Arc<BlockNode>>,
    /// Roots created by `blockdev-add` (the monitor holds a reference).
    monitor_owned: HashSet<String>,
}

/// The block graph.
#[derive(Default)]
pub struct BlockGraph {
    inner: Mutex<Inner>,
    next_auto: AtomicU64,
}

/// Checks a user-given node-name as QEMU does.
pub fn check_node_name(name: &str) -> Result<(), BlockError> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        // QEMU does not echo huge names back; neither do we.
        let shown: String = name.chars().take(64).collect();
        return Err(BlockError::invalid(format!("Invalid node-name: '{shown}'")));
    }
    if name.len() > 31 {
        return Err(BlockError::invalid("Node name too long"));
    }
    Ok(())
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh generated node-name, `#blockN`.
    pub fn auto_name(&self) -> String {
        format!(
            "#block{}",
            self.next_auto.fetch_add(1, Ordering::Relaxed) + 100
        )
    }

    /// The node named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.lock().index.get(name).cloned()
    }

    /// Whether `name` is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().index.contains_key(name)
    }

    /// Every node, in creation order.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.lock().order.clone()
    }

    /// Whether `node` (this very node, not one of the same name) is in the
    /// graph.
    pub fn holds(&self, node: &BlockNode) -> bool {
        self.lock()
            .index
            .get(node.name())
            .is_some_and(|n| n.id() == node.id())
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether the graph is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the node is a root owned by the monitor (`blockdev-add`).
    pub fn is_monitor_owned(&self, name: &str) -> bool {
        self.lock().monitor_owned.contains(name)
    }

    /// Inserts a newly opened tree. `new_nodes` are the nodes created for it
    /// (children before parents, `root` last); existing nodes it references
    /// are already in the graph. All-or-nothing: on error the graph is
    /// unchanged and the caller drops (closes) the new nodes.
    pub fn insert(
        &self,
        new_nodes: &[Arc<BlockNode>],
        root: &Arc<BlockNode>,
        monitor_owned: bool,
    ) -> Result<(), BlockError> {
        let mut g = self.lock();
        let mut seen = HashSet::new();
        for n in new_nodes {
            if g.index.contains_key(n.name()) || !seen.insert(n.name().to_string()) {
                return Err(BlockError::invalid(format!(
                    "Duplicate nodes with node-name='{}'",
                    n.name()
                )));
            }
        }
        // Link every new node's edges into its children.
        for n in new_nodes {
            for c in n.children() {
                c.node().link_parent(&c);
            }
        }
        if let Err(e) = refresh(std::slice::from_ref(root), &Overrides::default()) {
            for n in new_nodes {
                unlink_children(n);
            }
            return Err(e);
        }
        for n in new_nodes {
            g.index.insert(n.name().to_string(), n.clone());
            g.order.push(n.clone());
        }
        if monitor_owned {
            g.monitor_owned.insert(root.name().to_string());
        }
        Ok(())
    }

    /// Removes a monitor-owned root (`blockdev-del`), with QEMU's checks and
    /// messages. Returns the nodes that left the graph, to be closed by the
    /// caller outside any lock.
    pub fn remove(&self, name: &str) -> Result<Vec<Arc<BlockNode>>, BlockError> {
        let mut g = self.lock();
        let node = g.index.get(name).cloned().ok_or_else(|| {
            BlockError::not_found(format!("Failed to find node with node-name='{name}'"))
        })?;
        let parents = node.parents();
        let roots: Vec<Arc<Root>> = parents
            .iter()
            .filter_map(|e| e.parent().and_then(Parent::root))
            .collect();
        // Backends, exports and the block backends jobs do I/O through
        // make it "in use" (QEMU's bdrv_has_blk); the nodes a job holds
        // otherwise are busy (below).
        if roots.iter().any(|r| r.job_type().is_none()) {
            return Err(BlockError::in_use(format!("Node {name} is in use")));
        }
        crate::blocker::check(&node, crate::blocker::BlockOp::DriveDel)?;
        if !g.monitor_owned.contains(name) {
            return Err(BlockError::in_use(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !parents.is_empty() {
            return Err(BlockError::in_use(format!("Block device {name} is in use")));
        }
        g.monitor_owned.remove(name);
        let mut removed = Vec::new();
        remove_unreferenced(&mut g, &node, &mut removed);
        Ok(removed)
    }

    /// Makes `root` a user of `node` with the root's permissions (QEMU's
    /// `blk_insert_bs`). All-or-nothing; fails if the root has a node.
    pub fn attach_root(&self, root: &Arc<Root>, node: &Arc<BlockNode>) -> Result<(), BlockError> {
        let _g = self.lock();
        if root.edge().is_some() {
            return Err(BlockError::in_use(
                "There already is a medium in the device",
            ));
        }
        let edge = Child::new(
            "root",
            ChildRole::FILTERED | ChildRole::PRIMARY,
            node.clone(),
        );
        edge.set_parent(Parent::Root(Arc::downgrade(root)));
        node.link_parent(&edge);
        let mut ov = Overrides::default();
        ov.edges.insert(edge_key(&edge), root.perm());
        if let Err(e) = refresh(std::slice::from_ref(node), &ov) {
            node.unlink_parent(&edge);
            return Err(e);
        }
        root.set_edge(Some(edge));
        Ok(())
    }

    /// Takes `root` off its node (QEMU's `blk_remove_bs`) and releases its
    /// permissions; returns the node. The node stays in the graph (see
    /// [`BlockGraph::release`]).
    pub fn detach_root(&self, root: &Root) -> Option<Arc<BlockNode>> {
        let _g = self.lock();
        let edge = root.set_edge(None)?;
        let node = edge.node();
        node.unlink_parent(&edge);
        if let Err(e) = refresh(std::slice::from_ref(&node), &Overrides::default()) {
            tracing::warn!(node = node.name(), error = %e, "releasing permissions failed");
        }
        Some(node)
    }

    /// Changes the permissions a root holds (or will hold) on its node;
    /// on a conflict nothing changed.
    pub fn set_root_perm(&self, root: &Root, perm: PermPair) -> Result<(), BlockError> {
        let _g = self.lock();
        if let Some(edge) = root.edge() {
            let mut ov = Overrides::default();
            ov.edges.insert(edge_key(&edge), perm);
            refresh(&[edge.node()], &ov)?;
        }
        root.store_perm(perm);
        Ok(())
    }

    /// Takes a node that was opened implicitly (not by `blockdev-add`) out
    /// of the graph once nothing uses it any more, with the children that
    /// die with it. Returns the nodes to close; empty if the node is
    /// monitor-owned, still used, or already gone.
    pub fn release(&self, node: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
        let mut g = self.lock();
        let present = g
            .index
            .get(node.name())
            .is_some_and(|n| n.id() == node.id());
        if !present || g.monitor_owned.contains(node.name()) || !node.parents().is_empty() {
            return Vec::new();
        }
        let mut removed = Vec::new();
        remove_unreferenced(&mut g, node, &mut removed);
        removed
    }

    /// Whether a block backend uses the node (QEMU's `bdrv_has_blk`, for
    /// the backends of devices and drives).
    pub fn has_backend_user(&self, node: &BlockNode) -> bool {
        node.parents().iter().any(|e| {
            e.parent()
                .and_then(Parent::root)
                .is_some_and(|r| *r.kind() == RootKind::Backend)
        })
    }

    /// Recomputes the permissions below `nodes` (after a change made under
    /// the graph lock by this crate, such as a reopen). All-or-nothing.
    pub(crate) fn refresh_perms(
        &self,
        nodes: &[Arc<BlockNode>],
        ov: &Overrides,
    ) -> Result<(), BlockError> {
        let _g = self.lock();
        refresh(nodes, ov)
    }

    /// Removes every node (shutdown); returns them for closing.
    pub fn clear(&self) -> Vec<Arc<BlockNode>> {
        let mut g = self.lock();
        g.monitor_owned.clear();
        g.index.clear();
        std::mem::take(&mut g.order)
    }

    /// QEMU's `bdrv_replace_node`: moves every parent of `old` (nodes and
    /// roots) to `new`, in one all-or-nothing step with the permission
    /// refresh, inside a drained section over both. Edges whose parent is
    /// `new` itself or lies below it stay (moving them would make a cycle,
    /// as when a filter above `new` is replaced by `new`). On a conflict
    /// (QEMU's messages) nothing changed.
    pub async fn replace_node(
        &self,
        _control: &ControlGuard,
        old: &Arc<BlockNode>,
        new: &Arc<BlockNode>,
    ) -> Result<(), BlockError> {
        if old.id() == new.id() {
            return Ok(());
        }
        let _drained = self.drained_begin(&[old.clone(), new.clone()]).await;
        let _g = self.lock();
        let moved = movable_parents(old, new);
        for e in &moved {
            move_edge(e, old, new);
        }
        if let Err(err) = refresh(&[new.clone(), old.clone()], &Overrides::default()) {
            for e in &moved {
                move_edge(e, new, old);
            }
            return Err(err);
        }
        Ok(())
    }
}

impl BlockGraph {
    /// QEMU's `bdrv_append`: puts `filter` (opened with `top` as its
    /// child, not yet in the graph) above `top`: it joins the graph, then
    /// every parent of `top` moves to it. All-or-nothing.
    pub async fn append(
        &self,
        control: &ControlGuard,
        filter: &Arc<BlockNode>,
        top: &Arc<BlockNode>,
    ) -> Result<(), BlockError> {
        self.insert(std::slice::from_ref(filter), filter, false)?;
        if let Err(e) = self.replace_node(control, top, filter).await {
            self.release(filter);
            return Err(e);
        }
        Ok(())
    }

    /// The graph part of QEMU's `bdrv_append(overlay, node)` as one
    /// all-or-nothing step with one permission refresh (so conflicts are
    /// found in the graph as it will be, as QEMU's): `node` becomes the
    /// overlay's `backing` child and every other parent of `node` moves to
    /// the overlay. The caller holds a drained section over both and
    /// tells the overlay's driver (see [`crate::append`]).
    pub(crate) fn attach_overlay(
        &self,
        overlay: &Arc<BlockNode>,
        node: &Arc<BlockNode>,
    ) -> Result<(), BlockError> {
        let _g = self.lock();
        let moved = movable_parents(node, overlay);
        let backing = Child::new("backing", ChildRole::COW, node.clone());
        backing.set_parent(Parent::Node(Arc::downgrade(overlay)));
        node.link_parent(&backing);
        overlay.child_list().set("backing", Some(backing.clone()));
        for e in &moved {
            move_edge(e, node, overlay);
        }
        if let Err(err) = refresh(&[overlay.clone(), node.clone()], &Overrides::default()) {
            for e in &moved {
                move_edge(e, overlay, node);
            }
            overlay.child_list().set("backing", None);
            node.unlink_parent(&backing);
            if let Err(e) = refresh(&[overlay.clone(), node.clone()], &Overrides::default()) {
                tracing::error!(error = %e, "restoring permissions after a failed append");
            }
            return Err(err);
        }
        Ok(())
    }

    /// Takes a filter out again: its parents move to the node below it,
    /// and it leaves the graph (returned, to be closed).
    pub async fn remove_filter(
        &self,
        control: &ControlGuard,
        filter: &Arc<BlockNode>,
    ) -> Result<Vec<Arc<BlockNode>>, BlockError> {
        if let Some(below) = filter.child_list().first().map(|c| c.node()) {
            self.replace_node(control, filter, &below).await?;
        }
        Ok(self.release(filter))
    }
}

/// Points edge `e` from `from` at `to`, moving its back-edge. The moved
/// edge goes first among `to`'s parents, as in QEMU (whose permission
/// messages name the newest user first).
pub(crate) fn move_edge(e: &Arc<Child>, from: &BlockNode, to: &Arc<BlockNode>) {
    from.unlink_parent(e);
    e.retarget(to.clone());
    to.link_parent(e);
}

fn unlink_children(n: &BlockNode) {
    for c in n.children() {
        c.node().unlink_parent(&c);
    }
}

/// Takes `node` out of the graph and, recursively, children that lose their
/// last user and are not monitor-owned (inline children die with their parent).
fn remove_unreferenced(g: &mut Inner, node: &Arc<BlockNode>, removed: &mut Vec<Arc<BlockNode>>) {
    g.index.remove(node.name());
    g.order.retain(|n| n.id() != node.id());
    removed.push(node.clone());
    unlink_children(node);
    for c in node.children() {
        let child = c.node();
        if let Err(e) = refresh(std::slice::from_ref(&child), &Overrides::default()) {
            tracing::warn!(node = child.name(), error = %e, "releasing permissions failed");
        }
        if child.parents().is_empty()
            && !g.monitor_owned.contains(child.name())
            && g.index
                .get(child.name())
                .is_some_and(|n| n.id() == child.id())
        {
            remove_unreferenced(g, &child, removed);
        }
    }
}

/// The parent edges of `old` that can move onto `new` (QEMU's
/// `should_update_child`): roots, and nodes that are not `new` or below
/// it, which would make a cycle.
fn movable_parents(old: &BlockNode, new: &Arc<BlockNode>) -> Vec<Arc<Child>> {
    let below_new: HashSet<u64> = topo_order(std::slice::from_ref(new))
        .iter()
        .map(|n| n.id())
        .collect();
    old.parents()
        .into_iter()
        .filter(|e| match e.parent() {
            Some(Parent::Node(p)) => p.upgrade().is_some_and(|p| !below_new.contains(&p.id())),
            Some(Parent::Root(_)) => true,
            None => false,
        })
        .collect()
}
