//! `raw`: the child's bytes as they are, optionally a window (`offset`,
//! `size`) of them. A reopen may move the window (QEMU's
//! `raw_reopen_prepare`); the new one is checked against the (new) file.

use std::sync::atomic::{AtomicU64, Ordering};

use blockd_core::driver::PrepareFuture;
use blockd_core::perm::default_perms;
use blockd_core::{
    BlockDriver, BlockError, BlockStatus, Child, ChildRef, ChildRole, IoFuture, PermPair,
    ReopenRequest, ReqFlags, Staged,
};
use bytes::Bytes;

use crate::open::OpenCtx;
use crate::options::{DriverOptions, RawOptions};

/// No window size: the whole file (after `offset`).
const NO_SIZE: u64 = u64::MAX;

/// The `raw` format driver.
#[derive(Debug)]
pub struct RawDriver {
    file: ChildRef,
    offset: AtomicU64,
    /// [`NO_SIZE`] without a window size.
    size: AtomicU64,
}

/// Checks a window against the file length; QEMU's messages.
fn check_window(offset: u64, size: Option<u64>, real: u64) -> Result<(), BlockError> {
    if offset > real {
        return Err(BlockError::invalid(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({real})"
        )));
    }
    if let Some(s) = size {
        if offset.checked_add(s).is_none_or(|end| end > real) {
            // (QEMU's message has the double space too.)
            return Err(BlockError::invalid(format!(
                "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({real})"
            )));
        }
    }
    Ok(())
}

/// Checks the options that need no child.
pub fn check(o: &RawOptions) -> Result<(), BlockError> {
    // QEMU's runtime options read them as QemuOpts sizes.
    for (name, v) in [("offset", o.offset), ("size", o.size)] {
        if let Some(v) = v {
            blockd_optval::qemu_opts::parse_size(name, &v.to_string())
                .map_err(BlockError::invalid)?;
        }
    }
    Ok(())
}

/// Opens a `raw` node over its `file` child.
pub async fn open(o: RawOptions, ctx: &mut OpenCtx<'_>) -> Result<RawDriver, BlockError> {
    check(&o)?;
    let windowed = o.offset.is_some() || o.size.is_some();
    let role = if windowed {
        ChildRole::DATA | ChildRole::PRIMARY
    } else {
        ChildRole::DATA | ChildRole::FILTERED | ChildRole::PRIMARY
    };
    let file = ctx.open_child("file", o.file, role).await?;
    let real = file.node().length();
    let offset = o.offset.unwrap_or(0) as u64;
    let size = o.size.map(|s| s as u64);
    check_window(offset, size, real)?;
    Ok(RawDriver {
        file,
        offset: AtomicU64::new(offset),
        size: AtomicU64::new(size.unwrap_or(NO_SIZE)),
    })
}

impl RawDriver {
    fn window(&self) -> (u64, Option<u64>) {
        let size = self.size.load(Ordering::Acquire);
        (
            self.offset.load(Ordering::Acquire),
            (size != NO_SIZE).then_some(size),
        )
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<u64> {
        let (base, size) = self.window();
        if let Some(size) = size {
            if offset.checked_add(len).is_none_or(|e| e > size) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        offset
            .checked_add(base)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> u64 {
        match self.window() {
            (_, Some(s)) => s,
            (base, None) => self.file.node().length().saturating_sub(base),
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let off = self.check(offset, len as u64)?;
            self.file.node().read(off, len).await
        })
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let off = self.check(offset, data.len() as u64)?;
            self.file.node().write(off, data, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let off = self.check(offset, len)?;
            self.file.node().write_zeroes(off, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let off = self.check(offset, len)?;
            self.file.node().discard(off, len).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.node().flush().await })
    }

    fn start_writeback(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.node().start_writeback().await })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let off = self.check(offset, len)?;
            self.file.node().block_status(off, len).await
        })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        // QEMU's raw_co_truncate: a window with a size is fixed; one with
        // only an offset moves its end.
        Box::pin(async move {
            let (base, size) = self.window();
            if size.is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let end = len.checked_add(base).filter(|&e| e <= i64::MAX as u64);
            let Some(end) = end else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "Disk size too large for the chosen offset",
                ));
            };
            self.file.node().truncate(end).await
        })
    }

    fn child_perm(&self, child: &Child, parent: PermPair, writable: bool) -> PermPair {
        // Without a window the child is FILTERED (pass-through); with one it
        // is DATA (storage defaults), as in QEMU.
        let mut p = default_perms(child.role(), parent, writable);
        if self.window() != (0, None) {
            // A window's bounds are fixed: nobody may resize under it.
            p.shared = p.shared & !blockd_core::Perm::RESIZE;
        }
        p
    }

    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        Box::pin(async move {
            let Some(DriverOptions::Raw(o)) = req
                .driver_opts
                .and_then(|o| o.downcast_ref::<DriverOptions>())
            else {
                return Ok(Box::new(self.window()) as Staged);
            };
            check(o)?;
            let offset = o.offset.unwrap_or(0) as u64;
            let size = o.size.map(|s| s as u64);
            let real = req.child("file").map(|f| f.length()).unwrap_or(0);
            check_window(offset, size, real)?;
            Ok(Box::new((offset, size)) as Staged)
        })
    }

    fn reopen_commit(&self, staged: Staged) {
        if let Ok(w) = staged.downcast::<(u64, Option<u64>)>() {
            self.offset.store(w.0, Ordering::Release);
            self.size.store(w.1.unwrap_or(NO_SIZE), Ordering::Release);
        }
    }
}
