//! Reopening a `file` node, and `auto-read-only` following the
//! permissions (QEMU's `raw_reopen_prepare`/`_commit`/`_abort` and
//! `raw_reconfigure_getfd`).
//!
//! A new [`Handle`] is opened when the descriptor's mode must change
//! (`read-only`, or the permissions of an `auto-read-only` node) or
//! `cache.direct` changes; the image locks move to it
//! ([`lock::transfer`]) and it replaces the old one, which closes once the
//! last request using it is done. `cache.no-flush` just changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blockd_core::{BlockError, ErrorKind, Perm, PermPair, ReopenRequest, Staged};

use super::{alignment, lock, open_fd, sys, Handle, Inner};

/// What a prepared reopen changes.
struct FileStaged {
    handle: Option<Handle>,
    read_only: bool,
    auto_read_only: bool,
    no_flush: bool,
}

impl Inner {
    /// Opens the image again in the given mode.
    fn open_handle(&self, writable: bool, direct: bool) -> Result<Handle, BlockError> {
        let fd =
            open_fd(&self.filename, writable, direct, self.fdsets.as_deref()).map_err(|e| {
                BlockError {
                    msg: match e.source.as_ref() {
                        Some(src) => format!(
                            "Could not reopen file: {}",
                            blockd_core::error::strerror(src)
                        ),
                        None => e.msg.clone(),
                    },
                    ..e
                }
            })?;
        let align = alignment(sys::rawfd(&fd), direct)?;
        Ok(Handle {
            fd,
            writable,
            direct,
            align,
        })
    }

    /// Makes `new` the handle, moving the image locks to it.
    fn install(&self, new: Handle) -> Result<(), BlockError> {
        let old = self.h();
        if let Some(cmds) = self.lock_cmds {
            let st = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            let same = sys::same_description(old.raw(), new.raw());
            lock::transfer(old.raw(), new.raw(), cmds, &st, same)?;
        }
        self.swap_handle(Arc::new(new));
        Ok(())
    }

    /// Whether the descriptor should be writable under `perm`: a
    /// read-write node's is; an `auto-read-only` one's only while somebody
    /// needs to write or resize.
    fn wants_writable(&self, perm: Perm) -> bool {
        if self.node_read_only.load(Ordering::Acquire) {
            return false;
        }
        !self.auto_read_only.load(Ordering::Acquire) || perm.intersects(Perm::WRITE | Perm::RESIZE)
    }

    /// The node's new cumulative permissions: image locks, and the
    /// descriptor's mode for `auto-read-only`. All-or-nothing.
    pub(super) fn set_perm(&self, perm: PermPair) -> Result<(), BlockError> {
        let h = self.h();
        // QEMU's block layer: writing without resize needs a length (in
        // whole sectors) that is a multiple of the alignment, because the
        // padding of the last block would grow the file.
        if perm.perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED)
            && !perm.perm.contains(Perm::RESIZE)
            && self.length.load(Ordering::Acquire) % u64::from(h.align) != 0
        {
            return Err(BlockError::new(
                ErrorKind::PermissionConflict,
                "Cannot get 'write' permission without 'resize': \
                 Image size is not a multiple of request alignment",
            ));
        }
        // Dynamic auto-read-only: a new descriptor in the wanted mode.
        let switch = if self.auto_read_only.load(Ordering::Acquire)
            && !self.node_read_only.load(Ordering::Acquire)
            && self.wants_writable(perm.perm) != h.writable
        {
            Some(self.open_handle(!h.writable, h.direct)?)
        } else {
            None
        };
        if let Some(cmds) = self.lock_cmds {
            // force-share: this node restricts nobody (QEMU makes every
            // edge to a force-share node share everything); it still
            // announces what it holds and checks that nobody unshared it.
            let shared = if self.force_share {
                Perm::ALL
            } else {
                perm.shared
            };
            let mut st = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            lock::update(h.raw(), cmds, &mut st, perm.perm, shared)?;
        }
        if let Some(new) = switch {
            tracing::debug!(
                filename = self.filename,
                writable = new.writable,
                "auto-read-only: descriptor reopened"
            );
            self.install(new)?;
        }
        Ok(())
    }
}

/// Prepares a reopen: opens the new descriptor if the mode or
/// `cache.direct` changes (off the event loop).
pub(super) async fn prepare(
    inner: &Arc<Inner>,
    req: &ReopenRequest<'_>,
) -> Result<Staged, BlockError> {
    let h = inner.h();
    let writable =
        !req.new.read_only && (h.writable || !req.new.auto_read_only || req.old.read_only);
    let direct = req.new.cache_direct;
    let handle = if writable != h.writable || direct != h.direct {
        let i = inner.clone();
        tokio::task::spawn_blocking(move || i.open_handle(writable, direct))
            .await
            .map_err(|e| BlockError::new(ErrorKind::Io, format!("Could not reopen file: {e}")))?
            .map(Some)?
    } else {
        None
    };
    Ok(Box::new(FileStaged {
        handle,
        read_only: req.new.read_only,
        auto_read_only: req.new.auto_read_only,
        no_flush: req.new.cache_no_flush,
    }))
}

/// Commits a reopen: the new descriptor (with the locks) and flags.
pub(super) fn commit(inner: &Inner, staged: Staged) {
    let Ok(st) = staged.downcast::<FileStaged>() else {
        return;
    };
    if let Some(h) = st.handle {
        if let Err(e) = inner.install(h) {
            // Shared locks on a fresh descriptor of an image we hold do not
            // fail in practice; keep the old descriptor if they do.
            tracing::error!(filename = inner.filename, error = %e, "reopen: keeping the old descriptor");
        }
    }
    inner.node_read_only.store(st.read_only, Ordering::Release);
    inner
        .auto_read_only
        .store(st.auto_read_only, Ordering::Release);
    inner.no_flush.store(st.no_flush, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use blockd_core::{BlockDriver, NodeOptions, Perm, PermPair, ReqFlags};
    use bytes::Bytes;

    use super::super::tests::{make_file, open_with, TempDir};
    use super::super::{lock, FileDriver};

    fn access_mode(d: &FileDriver) -> i32 {
        // SAFETY: F_GETFL on a descriptor the handle keeps open.
        let fl = unsafe { libc::fcntl(d.inner.h().raw(), libc::F_GETFL) };
        fl & libc::O_ACCMODE
    }

    const READ: PermPair = PermPair {
        perm: Perm::CONSISTENT_READ,
        shared: Perm::ALL,
    };

    fn write() -> PermPair {
        PermPair {
            perm: Perm(Perm::CONSISTENT_READ.0 | Perm::WRITE.0 | Perm::RESIZE.0),
            shared: Perm(Perm::CONSISTENT_READ.0 | Perm::WRITE_UNCHANGED.0),
        }
    }

    #[tokio::test]
    async fn auto_read_only_descriptor_follows_the_write_permission() {
        let dir = TempDir::new("auto-ro");
        let path = dir.file("img");
        make_file(&path, &[0u8; 65536]);
        let node = NodeOptions {
            auto_read_only: true,
            ..NodeOptions::default()
        };
        let d = open_with(&path, node).await;
        d.set_perm(READ).unwrap();
        assert_eq!(access_mode(&d), libc::O_RDONLY, "nobody writes: read-only");
        d.set_perm(write()).unwrap();
        assert_eq!(access_mode(&d), libc::O_RDWR, "a writer: read-write");
        d.write(0, Bytes::from(vec![7u8; 4096]), ReqFlags::default())
            .await
            .unwrap();
        // The locks moved with the descriptor: another descriptor sees
        // that somebody holds "write" and unshares it.
        let other = std::fs::File::open(&path).unwrap();
        let cmds = d.inner.lock_cmds.expect("locking on");
        assert!(lock::check(other.as_raw_fd(), cmds, Perm::WRITE, Perm::ALL).is_err());
        assert!(lock::check(other.as_raw_fd(), cmds, Perm::CONSISTENT_READ, Perm::NONE).is_err());
        d.set_perm(READ).unwrap();
        assert_eq!(access_mode(&d), libc::O_RDONLY, "the writer left");
        lock::check(other.as_raw_fd(), cmds, Perm::WRITE, Perm::ALL).expect("write is free again");
        assert_eq!(d.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    }

    #[tokio::test]
    async fn without_auto_read_only_the_mode_stays() {
        let dir = TempDir::new("no-auto-ro");
        let path = dir.file("img");
        make_file(&path, &[0u8; 65536]);
        let d = open_with(&path, NodeOptions::default()).await;
        d.set_perm(READ).unwrap();
        assert_eq!(access_mode(&d), libc::O_RDWR);
    }
}
