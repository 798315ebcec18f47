//! Operation blockers (QEMU's `bdrv_op_is_blocked`): which graph-changing
//! commands a node refuses because of who uses it.
//!
//! QEMU keeps explicit blocker lists per operation. blockd derives the same
//! answers from the graph's edges, which already say who uses a node:
//!
//! * a block job's use of a node (QEMU's `block_job_add_bdrv`) blocks every
//!   operation: `block device is in use by block job: commit`;
//! * a node used as another's `backing` child blocks every operation except
//!   committing into it, streaming, and backing up from or to it
//!   (`bdrv_backing_attach`): `node is used as backing hd of 'top'`.
//!
//! QEMU reports the newest blocker; here the most recently attached user
//! (the first of a node's parents).

use crate::error::BlockError;
use crate::node::BlockNode;

/// The operations that check blockers (QEMU's `BlockOpType`, those blockd
/// has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// `blockdev-backup` from the node.
    BackupSource,
    /// `blockdev-backup` to the node.
    BackupTarget,
    /// `change-backing-file` on the node.
    Change,
    /// `block-commit` of the node's chain.
    CommitSource,
    /// `block-commit` through or into the node.
    CommitTarget,
    /// `blockdev-del`.
    DriveDel,
    /// `blockdev-snapshot`, `blockdev-snapshot-sync` over the node.
    ExternalSnapshot,
    /// `blockdev-mirror` from the node.
    MirrorSource,
    /// `blockdev-mirror` to the node.
    MirrorTarget,
    /// Being replaced at the end of a mirror (`replaces`).
    Replace,
    /// `block_resize`.
    Resize,
    /// `blockdev-snapshot-internal-sync`.
    InternalSnapshot,
    /// `blockdev-snapshot-delete-internal-sync`.
    InternalSnapshotDelete,
    /// `block-stream` through the node.
    Stream,
}

impl BlockOp {
    /// Whether a backing parent lets this operation through.
    fn allowed_on_backing(self) -> bool {
        matches!(
            self,
            BlockOp::CommitTarget | BlockOp::Stream | BlockOp::BackupSource | BlockOp::BackupTarget
        )
    }
}

/// Why `op` is blocked on `node`, if it is (the reason without the
/// `Node 'x' is busy: ` prefix).
pub fn reason(node: &BlockNode, op: BlockOp) -> Option<String> {
    node.parents().iter().find_map(|e| {
        let p = e.parent()?;
        if let Some(r) = p.root() {
            return r
                .job_type()
                .map(|t| format!("block device is in use by block job: {t}"));
        }
        let n = p.node()?;
        (e.name() == "backing" && !op.allowed_on_backing())
            .then(|| format!("node is used as backing hd of '{}'", n.name()))
    })
}

/// QEMU's `bdrv_op_is_blocked`: `Node 'x' is busy: <reason>`.
pub fn check(node: &BlockNode, op: BlockOp) -> Result<(), BlockError> {
    match reason(node, op) {
        Some(r) => Err(BlockError::in_use(format!(
            "Node '{}' is busy: {r}",
            node.name()
        ))),
        None => Ok(()),
    }
}
