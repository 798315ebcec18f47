//! The request path of a backend: what a device front end issues.
//!
//! Every request waits while the server is stopped, fails with `ENOMEDIUM`
//! without a medium or with an open tray, is refused as invalid when out of
//! range, is accounted, goes through the backend's root (its gate and
//! write-cache mode) to the medium, and on failure goes through the error
//! policy: reported, ignored, or (stop) retried once the server runs again.
//! A retried request waits for the run state *outside* the root, so a
//! drained section never waits for a stopped server.
//!
//! An export's own backend (not a front end) passes every request straight
//! to its root.

use std::io;

use bytes::{Bytes, BytesMut};

use super::{errno, BlockBackend, ErrorAction, IoErrorInfo};
use crate::accounting::AcctType;
use crate::driver::{BlockStatus, ReqFlags};
use crate::node::BlockNode;
use crate::perm::Perm;
use crate::runstate::RunStatus;

impl BlockBackend {
    /// Waits while stopped, then returns the medium or `ENOMEDIUM`.
    async fn ready(&self) -> io::Result<std::sync::Arc<BlockNode>> {
        if self.run.get() != RunStatus::Running {
            self.run.wait_running().await;
        }
        if self.is_tray_open() {
            return Err(errno(libc::ENOMEDIUM));
        }
        self.root().ok_or_else(|| errno(libc::ENOMEDIUM))
    }

    /// Checks a request's range against the medium; out of range counts as
    /// invalid.
    fn check_range(&self, node: &BlockNode, offset: u64, len: u64, ty: AcctType) -> io::Result<()> {
        let size = node.length();
        if offset > size || size - offset < len {
            self.stats.invalid(ty);
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    /// Applies the error policy to a failure: `Ok(true)` to retry (after the
    /// server was stopped), `Ok(false)` to ignore, `Err` to report.
    fn on_failure(&self, node: &BlockNode, is_read: bool, e: io::Error) -> io::Result<bool> {
        let code = e.raw_os_error().unwrap_or(libc::EIO);
        let action = self.error_action(is_read, code);
        if action == ErrorAction::Stop {
            self.iostatus_set_err(code);
        }
        let info = IoErrorInfo {
            is_read,
            action,
            errno: code,
            node_name: Some(node.name().to_string()),
            iostatus_enabled: self.iostatus_is_enabled(),
        };
        match self.hook.get() {
            Some(h) => h.io_error(self, info),
            None if action == ErrorAction::Stop => {
                self.run.stop(RunStatus::IoError);
            }
            None => {}
        }
        match action {
            ErrorAction::Stop => Ok(true),
            ErrorAction::Ignore => Ok(false),
            ErrorAction::Report => Err(e),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if !self.front_end {
            return self.root.read(offset, len).await;
        }
        loop {
            let node = self.ready().await?;
            self.check_range(&node, offset, len as u64, AcctType::Read)?;
            let c = self.stats.start(len as u64, AcctType::Read);
            match self.root.read(offset, len).await {
                Ok(d) => {
                    self.stats.done(c);
                    return Ok(d);
                }
                Err(e) => match self.on_failure(&node, true, e) {
                    Ok(true) => self.stats.cancel(c),
                    Ok(false) => {
                        self.stats.done(c);
                        return Ok(Bytes::from(vec![0u8; len]));
                    }
                    Err(e) => {
                        self.stats.failed(c);
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Common path of the write-like requests: checks, accounting, policy.
    async fn write_like<'a, F, Fut>(
        &'a self,
        offset: u64,
        len: u64,
        ty: AcctType,
        op: F,
    ) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = io::Result<()>> + 'a,
    {
        if !self.front_end {
            return op().await;
        }
        loop {
            let node = self.ready().await?;
            if !self.perm().perm.contains(Perm::WRITE) {
                return Err(errno(libc::EPERM));
            }
            self.check_range(&node, offset, len, ty)?;
            let c = self.stats.start(len, ty);
            match op().await {
                Ok(()) => {
                    self.stats.done(c);
                    return Ok(());
                }
                Err(e) => match self.on_failure(&node, false, e) {
                    Ok(true) => self.stats.cancel(c),
                    Ok(false) => {
                        self.stats.done(c);
                        return Ok(());
                    }
                    Err(e) => {
                        self.stats.failed(c);
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> io::Result<()> {
        let len = data.len() as u64;
        if self.st().probed_raw && offset < crate::probe::PROBE_BUF_SIZE as u64 && len > 0 {
            self.check_probed_write(offset, &data).await?;
        }
        self.write_like(offset, len, AcctType::Write, || {
            self.root.write(offset, data.clone(), flags)
        })
        .await
    }

    /// QEMU's guard for raw images whose format was probed: the first
    /// sector must keep probing as raw.
    async fn check_probed_write(&self, offset: u64, data: &Bytes) -> io::Result<()> {
        let n = crate::probe::PROBE_BUF_SIZE;
        self.ready().await?;
        let mut head = BytesMut::from(&self.root.read(0, n).await?[..]);
        let start = offset as usize;
        let take = (n - start).min(data.len());
        head[start..start + take].copy_from_slice(&data[..take]);
        if crate::probe::probe_format(&head).is_some() {
            return Err(errno(libc::EPERM));
        }
        Ok(())
    }

    /// Makes a range read as zeroes (accounted as a write).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.write_like(offset, len, AcctType::Write, || {
            self.root.write_zeroes(offset, len, flags)
        })
        .await
    }

    /// Discards a range.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_like(offset, len, AcctType::Unmap, || {
            self.root.discard(offset, len)
        })
        .await
    }

    /// Starts writeback of what completed writes left in caches, without
    /// waiting for it (a hint; see [`crate::BlockDriver::start_writeback`]).
    pub async fn start_writeback(&self) -> io::Result<()> {
        self.root.start_writeback().await
    }

    /// Flushes the medium.
    pub async fn flush(&self) -> io::Result<()> {
        if !self.front_end {
            return self.root.flush().await;
        }
        loop {
            let node = self.ready().await?;
            let c = self.stats.start(0, AcctType::Flush);
            match self.root.flush().await {
                Ok(()) => {
                    self.stats.done(c);
                    return Ok(());
                }
                Err(e) => match self.on_failure(&node, false, e) {
                    Ok(true) => self.stats.cancel(c),
                    Ok(false) => {
                        self.stats.done(c);
                        return Ok(());
                    }
                    Err(e) => {
                        self.stats.failed(c);
                        return Err(e);
                    }
                },
            }
        }
    }

    /// What a range of the medium holds (not accounted).
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        if self.front_end {
            self.ready().await?;
        }
        self.root.block_status(offset, len).await
    }

    /// The allocation depth of a range of the medium (not accounted).
    pub async fn allocation_depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        if self.front_end {
            self.ready().await?;
        }
        self.root.allocation_depth(offset, len).await
    }
}
