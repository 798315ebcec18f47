//! `raw`: the child's bytes as they are, optionally a window
//! (`offset`, `size`) of them.

use blockd_core::perm::default_perms;
use blockd_core::{
    BlockDriver, BlockError, BlockStatus, Child, ChildRef, ChildRole, IoFuture, PermPair, ReqFlags,
};
use bytes::Bytes;

use crate::open::OpenCtx;
use crate::options::RawOptions;

/// The `raw` format driver.
#[derive(Debug)]
pub struct RawDriver {
    file: ChildRef,
    offset: u64,
    size: Option<u64>,
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
    Ok(RawDriver { file, offset, size })
}

impl RawDriver {
    fn check(&self, offset: u64, len: u64) -> std::io::Result<u64> {
        if let Some(size) = self.size {
            if offset.checked_add(len).is_none_or(|e| e > size) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        offset
            .checked_add(self.offset)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> u64 {
        match self.size {
            Some(s) => s,
            None => self.file.node().length().saturating_sub(self.offset),
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

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let off = self.check(offset, len)?;
            self.file.node().block_status(off, len).await
        })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.size.is_some() || self.offset != 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            self.file.node().truncate(len).await
        })
    }

    fn child_perm(&self, child: &Child, parent: PermPair, writable: bool) -> PermPair {
        // Without a window the child is FILTERED (pass-through); with one it
        // is DATA (storage defaults), as in QEMU.
        let mut p = default_perms(child.role(), parent, writable);
        if self.size.is_some() || self.offset != 0 {
            // A window's bounds are fixed: nobody may resize under it.
            p.shared = p.shared & !blockd_core::Perm::RESIZE;
        }
        p
    }
}
