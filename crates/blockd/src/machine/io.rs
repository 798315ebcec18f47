//! An NBD export's I/O through a block backend: the export is the device
//! front end, so the backend's run-state wait, medium and tray checks,
//! accounting and error policy apply to every request. Without a medium
//! (or with an open tray) requests fail with `ENOMEDIUM`, which NBD clients
//! see as `EINVAL`.

use std::sync::Arc;

use blockd_core::{BlockBackend, BlockStatus, IoFuture, ReqFlags};
use blockd_nbd::ExportIo;
use bytes::Bytes;

/// [`ExportIo`] over a backend.
pub struct BackendIo {
    blk: Arc<BlockBackend>,
    writethrough: bool,
}

impl BackendIo {
    /// I/O through `blk`; with `writethrough`, every write is flushed before
    /// it completes (the export's own setting, on top of the backend's
    /// write cache mode).
    pub fn new(blk: Arc<BlockBackend>, writethrough: bool) -> Self {
        BackendIo { blk, writethrough }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.blk
    }
}

impl ExportIo for BackendIo {
    fn length(&self) -> u64 {
        self.blk.length()
    }

    fn block_limits(&self) -> (u32, u32, u32) {
        let (min, max) = match self.blk.root() {
            Some(n) => {
                let l = n.driver().limits();
                (l.request_alignment.max(1), l.max_transfer)
            }
            None => (1, 0),
        };
        let max = match max {
            0 => 32 << 20,
            m => m.min(32 << 20),
        };
        (min, min.max(4096), max)
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.blk.read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let flags = ReqFlags {
            fua: fua || self.writethrough,
            ..ReqFlags::default()
        };
        Box::pin(self.blk.write(offset, data, flags))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> IoFuture<'_, ()> {
        let flags = ReqFlags {
            fua: fua || self.writethrough,
            may_unmap,
            no_fallback: fast_only,
        };
        Box::pin(self.blk.write_zeroes(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blk.discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.blk.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.blk.block_status(offset, len))
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> IoFuture<'_, (u64, u32)> {
        Box::pin(self.blk.allocation_depth(offset, len))
    }
}
