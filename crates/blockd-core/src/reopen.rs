//! Reopening nodes with new options, several at once and all-or-nothing
//! (QEMU's `bdrv_reopen_multiple` with `bdrv_reopen_prepare`, `_commit`
//! and `_abort`).
//!
//! The caller (the layer that parses options, `blockd-drivers`) builds one
//! [`ReopenSpec`] per node: its new common options, the children to point
//! elsewhere, add or remove, and the driver-specific options for the
//! driver to check. [`BlockGraph::reopen`] then, under the control lock:
//!
//! 1. begins a drained section over every node involved (and so over
//!    everything above them);
//! 2. asks each driver to prepare (check and stage; see
//!    [`crate::driver`]), in order; a refusal aborts the ones prepared;
//! 3. changes the child edges and refreshes permissions for the graph as
//!    it will be (read-only states included), all-or-nothing: a conflict
//!    undoes the edges and aborts every driver;
//! 4. commits: new options on every node, every driver commits;
//! 5. lets each node that became writable finish (writes that needed the
//!    permissions); one that fails goes back to read-only, and the error
//!    is returned;
//! 6. ends the drained section, and hands back the nodes that lost their
//!    last user through a removed child, for the caller to close.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;

use crate::control::ControlGuard;
use crate::driver::Staged;
use crate::edge::{Child, ChildRef, Parent};
use crate::error::BlockError;
use crate::graph::{move_edge, BlockGraph};
use crate::node::{BlockNode, NodeOptions};
use crate::perm::ChildRole;
use crate::perms::Overrides;

/// One node to reopen.
pub struct ReopenSpec {
    /// The node.
    pub node: Arc<BlockNode>,
    /// Its new common options.
    pub options: NodeOptions,
    /// Children to change: role name, role flags (for a new edge), and the
    /// node to point at (`None` removes the child). Children not listed
    /// stay as they are.
    pub children: Vec<(String, ChildRole, Option<Arc<BlockNode>>)>,
    /// The driver-specific options, for the driver to check (`None`: the
    /// node is reopened only because its parent is, with its own options
    /// unchanged).
    pub driver_opts: Option<Box<dyn Any + Send + Sync>>,
}

/// What a driver sees of its node's reopen.
pub struct ReopenRequest<'a> {
    /// The node-name (for messages).
    pub node_name: &'a str,
    /// The options now.
    pub old: NodeOptions,
    /// The options after the reopen.
    pub new: NodeOptions,
    /// The driver-specific options (see [`ReopenSpec::driver_opts`]).
    pub driver_opts: Option<&'a (dyn Any + Send + Sync)>,
    spec: &'a ReopenSpec,
}

impl ReopenRequest<'_> {
    /// The node the child named `name` will point at after the reopen.
    pub fn child(&self, name: &str) -> Option<Arc<BlockNode>> {
        match self.spec.children.iter().find(|(n, _, _)| n == name) {
            Some((_, _, new)) => new.clone(),
            None => self.spec.node.child_list().node(name),
        }
    }

    /// Whether the node stops being read-only.
    pub fn becomes_writable(&self) -> bool {
        self.old.read_only && !self.new.read_only
    }

    /// Whether the node becomes read-only.
    pub fn becomes_read_only(&self) -> bool {
        !self.old.read_only && self.new.read_only
    }
}

/// An edge change made in step 3, to undo.
enum EdgeChange {
    /// `edge` was pointed from `from` elsewhere.
    Moved {
        edge: ChildRef,
        from: Arc<BlockNode>,
    },
    /// `edge` was added to `parent`.
    Added {
        parent: Arc<BlockNode>,
        edge: ChildRef,
    },
    /// `edge` was removed from `parent`.
    Removed {
        parent: Arc<BlockNode>,
        edge: ChildRef,
    },
}

fn undo(changes: Vec<EdgeChange>) {
    for c in changes.into_iter().rev() {
        match c {
            EdgeChange::Moved { edge, from } => {
                let to = edge.node();
                move_edge(&edge, &to, &from);
            }
            EdgeChange::Added { parent, edge } => {
                parent.child_list().set(edge.name(), None);
                edge.node().unlink_parent(&edge);
            }
            EdgeChange::Removed { parent, edge } => {
                edge.node().link_parent(&edge);
                let name = edge.name().to_string();
                parent.child_list().set(&name, Some(edge));
            }
        }
    }
}

/// Step 3's edge changes for one node; returns the nodes that lost an
/// edge (their permissions must be refreshed too).
fn change_edges(spec: &ReopenSpec, log: &mut Vec<EdgeChange>) -> Vec<Arc<BlockNode>> {
    let mut lost = Vec::new();
    for (name, role, target) in &spec.children {
        let cur = spec.node.child(name);
        match (cur, target) {
            (Some(edge), Some(t)) => {
                if edge.points_at(t) {
                    continue;
                }
                let from = edge.node();
                move_edge(&edge, &from, t);
                lost.push(from.clone());
                log.push(EdgeChange::Moved { edge, from });
            }
            (None, Some(t)) => {
                let edge = Child::new(name.clone(), *role, t.clone());
                edge.set_parent(Parent::Node(Arc::downgrade(&spec.node)));
                t.link_parent(&edge);
                spec.node.child_list().set(name, Some(edge.clone()));
                log.push(EdgeChange::Added {
                    parent: spec.node.clone(),
                    edge,
                });
            }
            (Some(edge), None) => {
                let from = edge.node();
                from.unlink_parent(&edge);
                spec.node.child_list().set(name, None);
                lost.push(from);
                log.push(EdgeChange::Removed {
                    parent: spec.node.clone(),
                    edge,
                });
            }
            (None, None) => {}
        }
    }
    lost
}

impl BlockGraph {
    /// Reopens the nodes of `specs` together; see the
    /// [module docs](crate::reopen). Returns the nodes that left the graph
    /// because a removed child edge was their last user, for the caller to
    /// close.
    pub async fn reopen(
        &self,
        _control: &ControlGuard,
        specs: Vec<ReopenSpec>,
    ) -> Result<Vec<Arc<BlockNode>>, BlockError> {
        let mut ids = HashSet::new();
        for s in &specs {
            if !ids.insert(s.node.id()) {
                return Err(BlockError::invalid(format!(
                    "Node '{}' is listed more than once",
                    s.node.name()
                )));
            }
        }
        let mut covered: Vec<Arc<BlockNode>> = specs.iter().map(|s| s.node.clone()).collect();
        for s in &specs {
            covered.extend(s.children.iter().filter_map(|(_, _, t)| t.clone()));
        }
        let _drained = self.drained_begin(&covered).await;

        // 2. Prepare.
        let mut staged: Vec<Staged> = Vec::with_capacity(specs.len());
        for s in &specs {
            let req = request(s);
            match s.node.driver().reopen_prepare(&req).await {
                Ok(st) => staged.push(st),
                Err(e) => {
                    abort_all(&specs, staged);
                    return Err(e);
                }
            }
        }

        // 3. Edges and permissions.
        let mut log = Vec::new();
        let mut starts: Vec<Arc<BlockNode>> = Vec::new();
        let mut ov = Overrides::default();
        for s in &specs {
            starts.extend(change_edges(s, &mut log));
            starts.push(s.node.clone());
            ov.read_only.insert(s.node.id(), s.options.read_only);
        }
        if let Err(e) = self.refresh_perms(&starts, &ov) {
            undo(log);
            abort_all(&specs, staged);
            return Err(e);
        }

        // 4. Commit.
        let mut became_writable = Vec::new();
        for (s, st) in specs.iter().zip(staged) {
            let old = s.node.options();
            s.node.set_options(s.options);
            s.node.driver().reopen_commit(st);
            if old.read_only && !s.options.read_only {
                became_writable.push((s.node.clone(), old));
            }
        }

        // 5. Finish what needed the write permission.
        let mut failure = None;
        for (n, old) in became_writable {
            if let Err(e) = n.driver().reopen_finish().await {
                tracing::warn!(node = n.name(), error = %e, "reopen read-write failed; back to read-only");
                n.set_options(NodeOptions {
                    read_only: true,
                    ..old
                });
                if let Err(e2) = self.refresh_perms(std::slice::from_ref(&n), &Overrides::default())
                {
                    tracing::error!(node = n.name(), error = %e2, "dropping write permissions failed");
                }
                failure.get_or_insert(e);
            }
        }

        // 6. Nodes that lost their last user.
        let mut removed = Vec::new();
        for c in log {
            let lost = match c {
                EdgeChange::Moved { from, .. } => Some(from),
                EdgeChange::Removed { edge, .. } => Some(edge.node()),
                EdgeChange::Added { .. } => None,
            };
            if let Some(n) = lost {
                removed.extend(self.release(&n));
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

fn request(s: &ReopenSpec) -> ReopenRequest<'_> {
    ReopenRequest {
        node_name: s.node.name(),
        old: s.node.options(),
        new: s.options,
        driver_opts: s.driver_opts.as_deref(),
        spec: s,
    }
}

fn abort_all(specs: &[ReopenSpec], staged: Vec<Staged>) {
    let pairs: Vec<_> = specs.iter().zip(staged).collect();
    for (s, st) in pairs.into_iter().rev() {
        s.node.driver().reopen_abort(st);
    }
}
