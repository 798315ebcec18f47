//! Changing the backing file the header records (QEMU's
//! `qcow2_change_backing_file`, which rewrites the header with
//! `qcow2_update_header`; `bdrv_change_backing_file` checks the
//! arguments first).
//!
//! The header is rewritten whole, as QEMU rewrites it: the first cluster
//! is read back and parsed, then laid out again by
//! [`header::build_header_cluster`] with the new name and format. Every
//! other field, the feature table, the bitmaps extension, unknown
//! extensions and unknown header fields are carried over as they are on
//! disk. The read happens under the metadata lock, which every in-place
//! header update (dirty bit, refcount table move, autoclear bits) also
//! holds, so the rewrite carries their current values.
//!
//! Errors are QEMU's: `EINVAL` for a format without a name, a name over
//! 1023 bytes, or a NUL in either (C strings cannot hold one); `EINVAL`
//! too for a format over 15 bytes, which QEMU would cut short; `ENOSPC`
//! when the header does not fit in the first cluster; `EPERM` on a
//! read-only node (a write to a read-only node). Nothing is written
//! when it is refused.
//!
//! Crash safety: the cluster goes to disk in one write followed by a
//! flush, as QEMU's one `bdrv_pwrite` of the cluster (its callers flush
//! later; here the change is durable when it returns). qcow2 has a single
//! header, so no ordering makes the change atomic: a write torn inside
//! the part in use can leave a wrong backing file name, or an extension
//! list that no longer parses. That part is small (the fixed header,
//! usually a 400-byte feature table and the name: under 2 KiB), so it
//! lies in the first 4 KiB page, which the page cache and disks with
//! 4 KiB sectors write whole; only a 512-byte-sector device can tear it.
//! The driver reports the new names only once the write and the flush
//! succeeded (QEMU's `bdrv_change_backing_file` likewise).

use std::io;
use std::sync::atomic::Ordering;

use super::header::{self, MAX_BACKING_FORMAT, MAX_BACKING_NAME};
use super::{corrupt, Qcow2Driver};

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Qcow2Driver {
    /// Records `name` (in `format`) as the backing file in the header, or
    /// none.
    pub(super) async fn do_change_backing_file(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> io::Result<()> {
        if format.is_some() && name.is_none()
            || name.into_iter().chain(format).any(|s| s.contains('\0'))
            || name.is_some_and(|n| n.len() > MAX_BACKING_NAME)
            || format.is_some_and(|f| f.len() > MAX_BACKING_FORMAT)
        {
            return Err(errno(libc::EINVAL));
        }
        if self.read_only.load(Ordering::Acquire) {
            return Err(errno(libc::EPERM));
        }
        let _meta = self.meta.lock().await;
        let io = self.file_io();
        let file_len = io.len();
        let first = io
            .read(0, self.geo.cs.min(file_len).max(512) as usize)
            .await?;
        let img = header::parse(&first, file_len)
            .map_err(|e| corrupt(format!("cannot rewrite the header: {}", e.msg)))?;
        let cluster = header::build_header_cluster(&img.header, name, format, &img.ext.kept)
            .map_err(|e| errno(e.errno()))?;
        io.write(0, cluster).await?;
        io.sync().await?;
        let mut shown = self.shown.backing.lock().unwrap_or_else(|e| e.into_inner());
        shown.file = name.map(str::to_owned);
        shown.format = format.map(str::to_owned);
        Ok(())
    }
}
