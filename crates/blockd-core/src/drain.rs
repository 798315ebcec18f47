//! Drained sections (QEMU's `bdrv_drained_begin`/`bdrv_drained_end`).
//!
//! A drained section over some nodes covers them and everything above
//! them: every root whose requests can reach one of the nodes stops
//! letting new requests in (they wait at the root's gate, see
//! [`crate::root`]), the section waits until the requests already in flight
//! at those roots and nodes have finished, and only then does
//! [`BlockGraph::drained_begin`] return. While the section lasts, no
//! request enters any of the covered nodes, so the graph below can be
//! changed (a node replaced, reopened, its children swapped). Ending the
//! section (dropping the [`DrainedSection`]) lets the waiting requests in,
//! in the order they arrived. Nothing is failed or lost.
//!
//! Sections nest: a root stays closed until every section covering it has
//! ended. The roots a section closes are the ones above the nodes when it
//! begins; graph changes are made under the [`crate::ControlLock`], so a
//! root cannot appear above a drained node meanwhile except through the
//! section owner's own changes (a replaced node's roots move with their
//! edges and stay closed).
//!
//! Requests that do not come from a root (a node's own background work)
//! are waited for through the nodes' request trackers.
//!
//! A root that forwards requests for a node (a mirror's target, written
//! by `mirror_top` in write-blocking mode, see [`crate::root`]) can be
//! reached from that node's parents: a section covering the root covers
//! the forwarding node and everything above it too. The forwarding root
//! does not hold requests back (they are made by requests in flight
//! elsewhere in the section, which must finish), so the section waits
//! until all its roots are idle at the same time.

use std::collections::HashSet;
use std::sync::Arc;

use crate::edge::Parent;
use crate::graph::BlockGraph;
use crate::node::BlockNode;
use crate::root::Root;

/// A drained section: ends (and releases the requests waiting at its
/// roots) when dropped.
#[must_use = "the section ends when this is dropped"]
pub struct DrainedSection {
    roots: Vec<Arc<Root>>,
    nodes: Vec<Arc<BlockNode>>,
}

impl std::fmt::Debug for DrainedSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainedSection")
            .field("roots", &self.roots.len())
            .field(
                "nodes",
                &self.nodes.iter().map(|n| n.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DrainedSection {
    /// The nodes the section covers (the given ones and all above them).
    pub fn nodes(&self) -> &[Arc<BlockNode>] {
        &self.nodes
    }

    /// The roots it closed.
    pub fn roots(&self) -> &[Arc<Root>] {
        &self.roots
    }
}

impl Drop for DrainedSection {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.driver().drained_end();
        }
        for r in &self.roots {
            r.drained_end();
        }
    }
}

/// `nodes` and every node above them, and the roots above them.
fn above(nodes: &[Arc<BlockNode>]) -> (Vec<Arc<BlockNode>>, Vec<Arc<Root>>) {
    let mut seen_nodes = HashSet::new();
    let mut seen_roots = HashSet::new();
    let mut out_nodes = Vec::new();
    let mut out_roots = Vec::new();
    let mut todo: Vec<Arc<BlockNode>> = nodes.to_vec();
    while let Some(n) = todo.pop() {
        if !seen_nodes.insert(n.id()) {
            continue;
        }
        for e in n.parents() {
            match e.parent() {
                Some(Parent::Node(p)) => {
                    if let Some(p) = p.upgrade() {
                        todo.push(p);
                    }
                }
                Some(Parent::Root(r)) => {
                    if let Some(r) = r.upgrade() {
                        if seen_roots.insert(r.id()) {
                            if let Some(f) = r.forwarder() {
                                todo.push(f);
                            }
                            out_roots.push(r);
                        }
                    }
                }
                None => {}
            }
        }
        out_nodes.push(n);
    }
    (out_nodes, out_roots)
}

impl BlockGraph {
    /// Begins a drained section over `nodes` and everything above them;
    /// returns once no request is in flight there. See the
    /// [module docs](crate::drain).
    pub async fn drained_begin(&self, nodes: &[Arc<BlockNode>]) -> DrainedSection {
        let (nodes, roots) = above(nodes);
        for r in &roots {
            r.drained_begin();
        }
        for n in &nodes {
            n.driver().drained_begin();
        }
        let section = DrainedSection { roots, nodes };
        loop {
            for r in &section.roots {
                r.gate().wait_idle().await;
            }
            for n in &section.nodes {
                n.drain().await;
            }
            // A forwarding root may have got requests from others still
            // in flight while it was waited for.
            if section.roots.iter().all(|r| r.gate().in_flight() == 0) {
                break;
            }
        }
        section
    }
}
