//! The block graph: named nodes, who uses them, and permission propagation.
//!
//! ```text
//!   backend "drive0" ─(external user)─► qcow2 "top" ─file──► file "top-file"
//!                                              └─backing──► qcow2 "base" ─file─► file
//! ```
//!
//! The graph owns the name index and the parent (user) back-edges; nodes own
//! their children through their drivers. Changes happen under one lock and
//! are all-or-nothing: a new tree is inserted only if its names are free
//! and every permission it needs is granted (in this process and, through
//! the `file` driver's locks, by other processes); removals release
//! permissions and close the nodes that no one references any more.
//! Opening files is done *before* taking the lock, so a slow open never
//! blocks other graph operations.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::BlockError;
use crate::node::{BlockNode, ParentLink, User};
use crate::perm::{Perm, PermPair};

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
        // Link every new node to its children.
        for n in new_nodes {
            for c in n.children() {
                c.node().parents_mut().push(ParentLink {
                    user: User::Node {
                        parent: n.name().to_string(),
                        child: c.name().to_string(),
                    },
                    perm: PermPair::FREE,
                });
            }
        }
        if let Err(e) = update_perms(root) {
            for n in new_nodes {
                unlink_children(n);
            }
            // Re-establish the permissions of the existing nodes we touched.
            for n in new_nodes {
                for c in n.children() {
                    let _ = update_perms(&c.node());
                }
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
        // Backends, exports and jobs hold the node through a BlockBackend
        // in QEMU, which makes it "in use".
        if parents
            .iter()
            .any(|p| matches!(p.user, User::External { .. }))
        {
            return Err(BlockError::in_use(format!("Node {name} is in use")));
        }
        if let Some(p) = parents.iter().find_map(|p| match &p.user {
            User::Node { parent, child } if child == "backing" => Some(parent.clone()),
            _ => None,
        }) {
            return Err(BlockError::in_use(format!(
                "Node '{name}' is busy: node is used as backing hd of '{p}'"
            )));
        }
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

    /// Adds an external user (backend, export, job) with permissions.
    pub fn add_user(
        &self,
        node: &Arc<BlockNode>,
        key: &str,
        label: &str,
        backend: bool,
        perm: PermPair,
    ) -> Result<(), BlockError> {
        let _g = self.lock();
        node.parents_mut().push(ParentLink {
            user: User::External {
                key: key.to_string(),
                label: label.to_string(),
                backend,
            },
            perm,
        });
        if let Err(e) = update_perms(node) {
            node.parents_mut()
                .retain(|p| !matches!(&p.user, User::External { key: k, .. } if k == key));
            let _ = update_perms(node);
            return Err(e);
        }
        Ok(())
    }

    /// Removes an external user and releases its permissions.
    pub fn remove_user(&self, node: &Arc<BlockNode>, key: &str) {
        let _g = self.lock();
        node.parents_mut()
            .retain(|p| !matches!(&p.user, User::External { key: k, .. } if k == key));
        if let Err(e) = update_perms(node) {
            tracing::warn!(node = node.name(), error = %e, "releasing permissions failed");
        }
    }

    /// Changes the permissions (and description) of an external user in
    /// one step; on error nothing changed.
    pub fn update_user(
        &self,
        node: &Arc<BlockNode>,
        key: &str,
        label: &str,
        perm: PermPair,
    ) -> Result<(), BlockError> {
        let _g = self.lock();
        let old = {
            let mut parents = node.parents_mut();
            let Some(link) = parents
                .iter_mut()
                .find(|p| matches!(&p.user, User::External { key: k, .. } if k == key))
            else {
                return Err(BlockError::not_found(format!(
                    "internal error: no user '{key}' on node '{}'",
                    node.name()
                )));
            };
            let old = link.clone();
            if let User::External { label: l, .. } = &mut link.user {
                *l = label.to_string();
            }
            link.perm = perm;
            old
        };
        if let Err(e) = update_perms(node) {
            let mut parents = node.parents_mut();
            if let Some(link) = parents
                .iter_mut()
                .find(|p| matches!(&p.user, User::External { key: k, .. } if k == key))
            {
                *link = old;
            }
            drop(parents);
            let _ = update_perms(node);
            return Err(e);
        }
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

    /// Whether an external user that is a block backend uses the node
    /// (QEMU's `bdrv_has_blk`).
    pub fn has_backend_user(&self, node: &BlockNode) -> bool {
        node.parents()
            .iter()
            .any(|p| matches!(p.user, User::External { backend: true, .. }))
    }

    /// Removes every node (shutdown); returns them for closing.
    pub fn clear(&self) -> Vec<Arc<BlockNode>> {
        let mut g = self.lock();
        g.monitor_owned.clear();
        g.index.clear();
        std::mem::take(&mut g.order)
    }
}

impl BlockNode {
    pub(crate) fn parents_mut(&self) -> MutexGuard<'_, Vec<ParentLink>> {
        self.parents.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unlink_children(n: &Arc<BlockNode>) {
    for c in n.children() {
        c.node().parents_mut().retain(|p| {
            !matches!(&p.user, User::Node { parent, child } if parent == n.name() && child == c.name())
        });
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
        if let Err(e) = update_perms(&child) {
            tracing::warn!(node = child.name(), error = %e, "releasing permissions failed");
        }
        if child.parents().is_empty()
            && !g.monitor_owned.contains(child.name())
            && g.index.contains_key(child.name())
        {
            remove_unreferenced(g, &child, removed);
        }
    }
}

/// Nodes reachable from `root` (itself included) in an order where every
/// node comes after all its parents within the set.
fn topo_order(root: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
    fn visit(n: &Arc<BlockNode>, seen: &mut HashSet<u64>, post: &mut Vec<Arc<BlockNode>>) {
        if !seen.insert(n.id()) {
            return;
        }
        for c in n.children() {
            visit(&c.node(), seen, post);
        }
        post.push(n.clone());
    }
    let mut post = Vec::new();
    visit(root, &mut HashSet::new(), &mut post);
    post.reverse();
    post
}

/// Recomputes permissions from `root` downwards and applies them: checks
/// conflicts between users of every node, then asks drivers to apply the
/// new cumulative permissions (image locks). All-or-nothing.
pub(crate) fn update_perms(root: &Arc<BlockNode>) -> Result<(), BlockError> {
    let order = topo_order(root);
    // New permissions of each edge (child id, parent name, child role).
    let mut edge_perm: HashMap<(u64, String, String), PermPair> = HashMap::new();
    let mut plan: Vec<(Arc<BlockNode>, PermPair)> = Vec::new();
    for n in &order {
        let parents = n.parents();
        let perms: Vec<(User, PermPair)> = parents
            .iter()
            .map(|p| {
                let pp = match &p.user {
                    User::Node { parent, child } => edge_perm
                        .get(&(n.id(), parent.clone(), child.clone()))
                        .copied()
                        .unwrap_or(p.perm),
                    User::External { .. } => p.perm,
                };
                (p.user.clone(), pp)
            })
            .collect();
        check_conflicts(n, &perms)?;
        let cum = perms.iter().fold(PermPair::FREE, |acc, (_, p)| PermPair {
            perm: acc.perm | p.perm,
            shared: acc.shared & p.shared,
        });
        if cum.perm.intersects(Perm::WRITE | Perm::RESIZE) && n.read_only() {
            let who = perms
                .iter()
                .find(|(_, p)| p.perm.intersects(Perm::WRITE | Perm::RESIZE))
                .map(|(u, _)| u.describe())
                .unwrap_or_default();
            return Err(BlockError::new(
                crate::error::ErrorKind::PermissionConflict,
                format!(
                    "Block node is read-only (needed for write by {who}): {}",
                    n.name()
                ),
            ));
        }
        for c in n.children() {
            let mut cp = n.driver().child_perm(&c, cum, !n.read_only());
            // A force-share child lets its parent share everything on it
            // (QEMU's bdrv_child_perm).
            if c.node().options().force_share {
                cp.shared = Perm::ALL;
            }
            edge_perm.insert(
                (c.node().id(), n.name().to_string(), c.name().to_string()),
                cp,
            );
        }
        plan.push((n.clone(), cum));
    }
    // Apply, remembering what to restore if a driver refuses.
    let mut applied: Vec<(Arc<BlockNode>, PermPair)> = Vec::new();
    for (n, cum) in &plan {
        let old = n.cumulative_perm();
        if old != *cum {
            if let Err(e) = n.driver().set_perm(*cum) {
                for (m, prev) in applied.iter().rev() {
                    let _ = m.driver().set_perm(*prev);
                    *m.cumulative.lock().unwrap_or_else(|e| e.into_inner()) = *prev;
                }
                return Err(e);
            }
            *n.cumulative.lock().unwrap_or_else(|e| e.into_inner()) = *cum;
            applied.push((n.clone(), old));
        }
    }
    // Record the new edge permissions.
    for n in &order {
        let mut parents = n.parents_mut();
        for p in parents.iter_mut() {
            if let User::Node { parent, child } = &p.user {
                if let Some(pp) = edge_perm.get(&(n.id(), parent.clone(), child.clone())) {
                    p.perm = *pp;
                }
            }
        }
    }
    Ok(())
}

fn check_conflicts(n: &BlockNode, perms: &[(User, PermPair)]) -> Result<(), BlockError> {
    for (i, (ua, a)) in perms.iter().enumerate() {
        for (j, (ub, b)) in perms.iter().enumerate() {
            if i == j {
                continue;
            }
            let denied = a.perm & !b.shared;
            if denied != Perm::NONE {
                return Err(BlockError::new(
                    crate::error::ErrorKind::PermissionConflict,
                    format!(
                        "Permission conflict on node '{}': permissions '{}' are both required by {} and unshared by {}",
                        n.name(),
                        denied.names().join(", "),
                        ua.describe(),
                        ub.describe()
                    ),
                ));
            }
        }
    }
    Ok(())
}
