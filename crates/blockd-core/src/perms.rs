//! Permission refresh over a part of the graph (QEMU's
//! `bdrv_refresh_perms`, `bdrv_node_refresh_perm`, `bdrv_a_allow_b`).
//!
//! Every edge holds the permissions its parent needs on the child and the
//! ones it shares. A refresh walks the nodes reachable from some start
//! nodes, parents before children, and for each node: checks every pair of
//! its users for a conflict (one needs what the other does not share),
//! checks that a read-only node gets no writer, folds the users into the
//! node's cumulative permissions, and asks the node's driver what it then
//! needs on each child. Only when the whole walk succeeded are the drivers
//! told (the `file` driver takes and drops image locks here), in order,
//! undoing what was applied if one refuses; then the new edge permissions
//! are recorded. So a refresh either applies completely or changes nothing.
//!
//! A refresh can be asked to look at the graph as it will be after a
//! reopen: [`Overrides`] gives nodes a future read-only state and root
//! edges their future permissions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::edge::Child;
use crate::error::{BlockError, ErrorKind};
use crate::node::BlockNode;
use crate::perm::{Perm, PermPair};

/// How the graph will look after a pending change, for a refresh that
/// checks it before it is made.
#[derive(Default)]
pub struct Overrides {
    /// Node id → whether it will be read-only.
    pub read_only: HashMap<u64, bool>,
    /// Edges (by [`edge_key`]) whose permissions are given, not computed
    /// (the edges of roots changing their permissions).
    pub edges: HashMap<usize, PermPair>,
}

/// An edge's identity for maps: its address (only compared).
pub fn edge_key(c: &Arc<Child>) -> usize {
    Arc::as_ptr(c) as usize
}

impl Overrides {
    fn read_only(&self, n: &BlockNode) -> bool {
        self.read_only
            .get(&n.id())
            .copied()
            .unwrap_or_else(|| n.read_only())
    }
}

/// Nodes reachable from `starts` (themselves included), every node after
/// all of its parents within the set (reverse post-order of one DFS).
pub(crate) fn topo_order(starts: &[Arc<BlockNode>]) -> Vec<Arc<BlockNode>> {
    fn visit(n: &Arc<BlockNode>, seen: &mut HashSet<u64>, post: &mut Vec<Arc<BlockNode>>) {
        if !seen.insert(n.id()) {
            return;
        }
        for c in n.children() {
            visit(&c.node(), seen, post);
        }
        post.push(n.clone());
    }
    let mut seen = HashSet::new();
    let mut post = Vec::new();
    for s in starts {
        visit(s, &mut seen, &mut post);
    }
    post.reverse();
    post
}

/// Recomputes and applies the permissions of every node reachable from
/// `starts`. All-or-nothing.
pub(crate) fn refresh(starts: &[Arc<BlockNode>], ov: &Overrides) -> Result<(), BlockError> {
    let order = topo_order(starts);
    let mut edge_perm: HashMap<usize, PermPair> = ov.edges.clone();
    let mut plan: Vec<(Arc<BlockNode>, PermPair)> = Vec::with_capacity(order.len());
    for n in &order {
        // Newest user first (see BlockNode::link_parent): the order
        // decides which conflict is reported.
        let users: Vec<(Arc<Child>, PermPair)> = n
            .parents()
            .into_iter()
            .map(|e| {
                let p = edge_perm
                    .get(&edge_key(&e))
                    .copied()
                    .unwrap_or_else(|| e.perm());
                (e, p)
            })
            .collect();
        check_conflicts(n, &users)?;
        let cum = users.iter().fold(PermPair::FREE, |acc, (_, p)| PermPair {
            perm: acc.perm | p.perm,
            shared: acc.shared & p.shared,
        });
        let ro = ov.read_only(n);
        if cum.perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && ro {
            // QEMU's wording: the node is read-only now, or becomes so.
            let msg = if n.read_only() {
                "Block node is read-only".to_string()
            } else {
                format!(
                    "Read-only block node '{}' cannot support read-write users",
                    n.name()
                )
            };
            return Err(BlockError::new(ErrorKind::PermissionConflict, msg));
        }
        for c in n.children() {
            let mut cp = n.driver().child_perm(&c, cum, !ro);
            // A force-share child lets its parent share everything on it
            // (QEMU's bdrv_child_perm).
            if c.node().options().force_share {
                cp.shared = Perm::ALL;
            }
            edge_perm.insert(edge_key(&c), cp);
        }
        plan.push((n.clone(), cum));
    }
    apply(&plan)?;
    // Record the new edge permissions (roots' and nodes').
    for n in &order {
        for e in n.parents() {
            if let Some(p) = edge_perm.get(&edge_key(&e)) {
                e.set_perm(*p);
            }
        }
    }
    Ok(())
}

/// Tells the drivers their nodes' new cumulative permissions, in order;
/// undoes what was applied if one refuses.
fn apply(plan: &[(Arc<BlockNode>, PermPair)]) -> Result<(), BlockError> {
    let mut applied: Vec<(&Arc<BlockNode>, PermPair)> = Vec::new();
    for (n, cum) in plan {
        let old = n.cumulative_perm();
        if old == *cum {
            continue;
        }
        if let Err(e) = n.driver().set_perm(*cum) {
            for (m, prev) in applied.iter().rev() {
                if let Err(e) = m.driver().set_perm(*prev) {
                    tracing::warn!(node = m.name(), error = %e, "restoring permissions failed");
                }
                m.set_cumulative(*prev);
            }
            return Err(e);
        }
        n.set_cumulative(*cum);
        applied.push((n, old));
    }
    Ok(())
}

/// QEMU's `bdrv_parent_perms_conflict`: every ordered pair of users.
fn check_conflicts(n: &BlockNode, users: &[(Arc<Child>, PermPair)]) -> Result<(), BlockError> {
    for (i, (a, ap)) in users.iter().enumerate() {
        for (j, (b, bp)) in users.iter().enumerate() {
            if i == j {
                continue;
            }
            let denied = bp.perm & !ap.shared;
            if denied != Perm::NONE {
                return Err(BlockError::new(
                    ErrorKind::PermissionConflict,
                    format!(
                        "Permission conflict on node '{}': permissions '{}' are both required by {} and unshared by {}.",
                        n.name(),
                        denied.message_names(),
                        b.describe_user(),
                        a.describe_user(),
                    ),
                ));
            }
        }
    }
    Ok(())
}
