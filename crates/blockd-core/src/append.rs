//! Putting an overlay on top of a node, and taking it off again (QEMU's
//! `bdrv_append` as `external_snapshot_action` uses it, and the undo in
//! `external_snapshot_abort`).
//!
//! ```text
//!   before:   export ─root─► node            after:  export ─root─► overlay
//!                                                                    │ backing
//!             overlay (no backing, unused)                           ▼
//!                                                                   node
//! ```
//!
//! [`BlockGraph::append_overlay`], inside a drained section over both
//! nodes (requests in flight finish on `node`, the ones that come after
//! go to the overlay), makes `node` the overlay's backing child and moves
//! every other parent of `node` (roots and nodes) to the overlay, with
//! one permission refresh of the graph as it will be (QEMU's
//! `bdrv_set_backing_noperm`, `bdrv_replace_node_noperm`, then
//! `bdrv_refresh_perms`): a conflict (a read-only overlay under a
//! writer, an overlay whose write-only user shares no writes) leaves the
//! graph as it was. Then the overlay is reopened with nothing changed,
//! so its driver learns it has a backing node.
//! [`BlockGraph::remove_overlay`] undoes a successful append.

use std::sync::Arc;

use crate::chain;
use crate::control::ControlGuard;
use crate::error::BlockError;
use crate::graph::BlockGraph;
use crate::node::BlockNode;
use crate::perm::ChildRole;
use crate::reopen::ReopenSpec;

/// The overlay's backing child set to `backing` (`None`: removed).
fn backing_spec(overlay: &Arc<BlockNode>, backing: Option<Arc<BlockNode>>) -> ReopenSpec {
    ReopenSpec {
        node: overlay.clone(),
        options: overlay.options(),
        children: vec![("backing".to_string(), ChildRole::COW, backing)],
        driver_opts: None,
    }
}

/// Whether `needle` is `top` or lies anywhere below it.
fn reaches(top: &Arc<BlockNode>, needle: &BlockNode) -> bool {
    if top.id() == needle.id() {
        return true;
    }
    top.children().iter().any(|c| reaches(&c.node(), needle))
}

impl BlockGraph {
    /// QEMU's `bdrv_append(overlay, node)`; see the [module docs](self).
    /// The overlay must have no backing child. All-or-nothing.
    pub async fn append_overlay(
        &self,
        control: &ControlGuard,
        overlay: &Arc<BlockNode>,
        node: &Arc<BlockNode>,
    ) -> Result<(), BlockError> {
        // bdrv_attach_child_noperm's cycle check.
        if reaches(node, overlay) {
            return Err(BlockError::invalid(format!(
                "Making '{}' a backing child of '{}' would create a cycle",
                node.name(),
                overlay.name()
            )));
        }
        {
            let _drained = self.drained_begin(&[node.clone(), overlay.clone()]).await;
            self.attach_overlay(overlay, node)?;
        }
        // The driver learns of its backing node (qcow2 treats unallocated
        // clusters differently with one): a reopen that changes nothing.
        let spec = ReopenSpec {
            children: Vec::new(),
            ..backing_spec(overlay, None)
        };
        if let Err(e) = self.reopen(control, vec![spec]).await {
            if let Err(e2) = self.remove_overlay(control, overlay, node).await {
                tracing::error!(node = overlay.name(), error = %e2, "taking an overlay off again");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Undoes [`BlockGraph::append_overlay`] (QEMU's
    /// `external_snapshot_abort`): the overlay's parents move back to
    /// `node`, then the overlay loses its backing child. `node` stays in
    /// the graph.
    pub async fn remove_overlay(
        &self,
        control: &ControlGuard,
        overlay: &Arc<BlockNode>,
        node: &Arc<BlockNode>,
    ) -> Result<(), BlockError> {
        if chain::next(overlay).is_none_or(|b| b.id() != node.id()) {
            return Err(BlockError::invalid(format!(
                "'{}' is not the backing node of '{}'",
                node.name(),
                overlay.name()
            )));
        }
        self.replace_node(control, overlay, node).await?;
        let released = self
            .reopen(control, vec![backing_spec(overlay, None)])
            .await?;
        debug_assert!(released.is_empty());
        Ok(())
    }
}
