//! `block_resize` on a node (QEMU's `bdrv_co_truncate` as `blk_co_truncate`
//! calls it for `qmp_block_resize`, `blockdev.c`/`block/io.c`): QEMU's
//! checks and messages around the serialising [`BlockNode::truncate`].

use crate::error::{BlockError, ErrorKind};
use crate::node::BlockNode;

impl BlockNode {
    /// `block_resize`'s truncate (QEMU's `bdrv_co_truncate` as
    /// `blk_co_truncate` calls it): QEMU's checks and messages around
    /// [`BlockNode::truncate`]. A driver's refusal with a message of its
    /// own (an `io::Error` carrying one) is shown as it is.
    pub async fn resize(&self, len: u64) -> Result<(), BlockError> {
        // BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT.
        const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);
        if len > MAX_LENGTH {
            // (bdrv_check_request's words)
            return Err(BlockError::invalid(format!(
                "offset({len}) exceeds maximum({MAX_LENGTH})"
            )));
        }
        if self.read_only() {
            return Err(BlockError::new(
                ErrorKind::PermissionConflict,
                "Image is read-only",
            ));
        }
        match self.truncate(len).await {
            Ok(()) => Ok(()),
            Err(e) if e.get_ref().is_some() => Err(BlockError::invalid(e.to_string())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Err(BlockError::unsupported(
                "Image format driver does not support resize",
            )),
            Err(e) => Err(BlockError::io("Could not resize image", e)),
        }
    }
}
