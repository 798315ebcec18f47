//! `file`: a regular file (or a block device) as a protocol node, QEMU's
//! `block/file-posix.c`.
//!
//! * **Open**: `filename` is a path or `/dev/fdset/N` (a descriptor passed
//!   with `add-fd`). The image is opened `O_RDWR` unless the node is
//!   read-only; with `auto-read-only`, a read-write open refused with
//!   EACCES, EPERM or EROFS falls back to read-only. `cache.direct` opens it
//!   `O_DIRECT`. Errors are worded as QEMU words them.
//! * **I/O** runs on Tokio's blocking thread pool, one task per request
//!   (`aio=threads`; `aio=native` is accepted and served the same way).
//!   Reads return buffers that the kernel filled directly, without a copy;
//!   with `O_DIRECT` they are page-aligned, and writes from unaligned memory
//!   go through an aligned bounce buffer. Short reads at end of file read
//!   as zeroes.
//! * **O_DIRECT alignment** is probed like QEMU does (block device logical
//!   block size, XFS's answer, else trial reads) and declared as the node's
//!   `request_alignment`, so the request layer pads everything to it.
//! * **Write-zeroes and discard** use `fallocate` (punch hole, zero range)
//!   or the block device ioctls, with QEMU's fallbacks.
//! * **Block status** comes from `SEEK_DATA`/`SEEK_HOLE`.
//! * **Length** is counted in whole 512-byte sectors, as QEMU counts it
//!   (`total_sectors`): a 10000-byte file is 10240 bytes long; the part
//!   beyond the end of the file reads as zeroes and writing it extends the
//!   file.
//! * **Image locking** ([`lock`]) mirrors the node's permissions into the
//!   byte-range locks QEMU uses, so blockd and QEMU processes respect each
//!   other's permissions on the same image.
//! * **Reopen and dynamic auto-read-only** ([`reopen`]): the descriptor and
//!   what depends on how it was opened (mode, `O_DIRECT`, alignment) form a
//!   [`Handle`] that can be replaced while the node is in use. A reopen
//!   that changes `read-only` or `cache.direct` opens a new descriptor at
//!   prepare and swaps it in at commit, moving the image locks over. With
//!   `auto-read-only` on a read-write node the descriptor follows the
//!   permissions, as QEMU's `dynamic-auto-read-only`: read-only while
//!   nobody needs to write, reopened read-write when a writer arrives. Every
//!   request holds the handle it started with, so a swap never closes a
//!   descriptor under a request.

mod inline;
pub mod lock;
mod reopen;
mod sys;

#[cfg(test)]
mod interop_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockd_core::driver::PrepareFuture;
use blockd_core::error::strerror;
use blockd_core::{
    BlockDriver, BlockError, BlockStatus, DriverInfo, ErrorKind, IoFuture, IoLimits, NodeOptions,
    Perm, PermPair, ReopenRequest, ReqFlags, Staged,
};
use bytes::Bytes;

use crate::open::{Env, FdSets};
use crate::options::{Aio, FileOptions, OnOffAuto};
use blockd_core::buf::AlignedBuf;
use inline::{InlineWrites, INLINE_MAX};
use lock::{LockCmds, LockState};

/// Prefix of file names that name a descriptor set.
const FDSET_PREFIX: &str = "/dev/fdset/";

/// `NFS_SUPER_MAGIC`: NFS accepts O_DIRECT at any alignment (QEMU's
/// `dio_byte_aligned`).
const NFS_SUPER_MAGIC: i64 = 0x6969;

/// QEMU's `BDRV_SECTOR_SIZE`: lengths are whole sectors.
const SECTOR: u64 = 512;

/// Chunk size of the write-zeroes fallback that writes zero buffers.
const ZERO_CHUNK: usize = 1 << 20;

/// The `file` protocol driver.
#[derive(Debug)]
pub struct FileDriver {
    inner: Arc<Inner>,
}

/// The image descriptor and what depends on how it was opened; replaced
/// whole by a reopen or an auto-read-only switch.
#[derive(Debug)]
struct Handle {
    fd: OwnedFd,
    /// Opened `O_RDWR`.
    writable: bool,
    /// Opened with O_DIRECT.
    direct: bool,
    /// Request alignment (1 without O_DIRECT).
    align: u32,
}

impl Handle {
    fn raw(&self) -> RawFd {
        sys::rawfd(&self.fd)
    }
}

/// State shared with the blocking tasks.
struct Inner {
    handle: std::sync::RwLock<Arc<Handle>>,
    /// `filename` as given (shown in queries).
    filename: String,
    /// Descriptor sets, to open `/dev/fdset/N` again.
    fdsets: Option<Arc<dyn FdSets>>,
    /// A block device rather than a regular file.
    blkdev: bool,
    /// `cache.no-flush`: close does not sync.
    no_flush: AtomicBool,
    /// The node is read-only.
    node_read_only: AtomicBool,
    /// `auto-read-only`: the descriptor follows the permissions.
    auto_read_only: AtomicBool,
    /// `force-share`: other users' permissions are not restricted by us.
    force_share: bool,
    /// Cached length in whole sectors: updated by writes past the end and
    /// by truncate.
    length: AtomicU64,
    /// Zeroing by `fallocate(ZERO_RANGE)` / `BLKZEROOUT` may work.
    has_write_zeroes: AtomicBool,
    /// Punching holes / `BLKDISCARD` may work.
    has_discard: AtomicBool,
    /// `fallocate(0)` may work (regular files only).
    has_fallocate: AtomicBool,
    /// Non-blocking buffered reads (`RWF_NOWAIT`) may work.
    nowait_read: AtomicBool,
    /// Non-blocking buffered writes (`RWF_NOWAIT`) may work.
    nowait_write: AtomicBool,
    /// When buffered writes may run inline without `RWF_NOWAIT`.
    inline_writes: InlineWrites,
    /// errno of a failed buffered `fdatasync`: the page cache may have
    /// dropped dirty data, so every later flush fails too (as QEMU).
    page_cache_inconsistent: AtomicI32,
    /// Count of completed modifying requests.
    write_gen: AtomicU64,
    /// `write_gen` covered by the last successful flush.
    flushed_gen: AtomicU64,
    /// Lock commands, or `None` with `locking=off`.
    lock_cmds: Option<LockCmds>,
    /// Image lock state.
    locks: Mutex<LockState>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("filename", &self.filename)
            .field("handle", &self.h())
            .finish()
    }
}

/// Checks the options that need no file system access. Everything else
/// (a missing file, a bad descriptor set) is reported at open, as QEMU does.
pub fn check(o: &FileOptions) -> Result<(), BlockError> {
    if let Some(rest) = o.filename.strip_prefix(FDSET_PREFIX) {
        parse_fdset(rest).ok_or_else(|| fdset_parse_error(&o.filename))?;
    }
    Ok(())
}

/// Opens a `file` node. Returns the driver and whether the node is actually
/// read-only (it may have fallen back to read-only with `auto-read-only`).
pub async fn open(
    o: FileOptions,
    node: &NodeOptions,
    env: &Env,
) -> Result<(FileDriver, bool), BlockError> {
    check(&o)?;
    let node = *node;
    let fdsets = env.fdsets.clone();
    let inline_writes = !env.no_inline_writes;
    match tokio::task::spawn_blocking(move || open_blocking(&o, &node, fdsets, inline_writes)).await
    {
        Ok(r) => r.map(|(inner, ro)| {
            (
                FileDriver {
                    inner: Arc::new(inner),
                },
                ro,
            )
        }),
        Err(e) => Err(BlockError::new(
            ErrorKind::Io,
            format!("Could not open image: {e}"),
        )),
    }
}

/// QEMU's `qemu_parse_fdset` (`qemu_parse_fd`): a decimal number from 0
/// to `INT_MAX`, all of the string.
fn parse_fdset(s: &str) -> Option<i64> {
    blockd_optval::parse_fd(s).map(i64::from)
}

fn fdset_parse_error(filename: &str) -> BlockError {
    BlockError::invalid(format!("Could not parse fdset {filename}"))
}

/// The errno behind a control-path error, if it has one.
fn errno_of(e: &BlockError) -> Option<i32> {
    e.source.as_ref().and_then(|s| s.raw_os_error())
}

/// Whether a refused read-write open may fall back to read-only with
/// `auto-read-only`: the errnos that mean "no write access here"
/// (permissions, immutable file, read-only file system or device).
///
/// QEMU gets the same outcome differently: with `auto-read-only` it opens
/// the file read-only and reopens it read-write when a writer appears.
/// blockd decides at open and reports the node read-only, which the graph
/// then enforces.
fn auto_read_only_falls_back(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EACCES | libc::EPERM | libc::EROFS))
}

/// Opens the image descriptor in the given mode (QEMU's `qemu_open` plus
/// `check_hdev_writable`).
fn open_fd(
    path: &str,
    writable: bool,
    direct: bool,
    fdsets: Option<&dyn FdSets>,
) -> Result<OwnedFd, BlockError> {
    let mut flags = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    if direct {
        flags |= libc::O_DIRECT;
    }
    let fd = if let Some(rest) = path.strip_prefix(FDSET_PREFIX) {
        let id = parse_fdset(rest).ok_or_else(|| fdset_parse_error(path))?;
        let sets = fdsets.ok_or_else(|| {
            BlockError::not_found(format!("Failed to find fdset /dev/fdset/{id}"))
        })?;
        let fd = sets.dup_for(id, writable)?;
        // QEMU's qemu_dup_flags: the duplicate gets the flags fcntl can
        // set (O_DIRECT), and close-on-exec.
        let raw = fd.as_raw_fd();
        let dup_error =
            |e| BlockError::io(format!("Failed to dup() given file descriptor fd={raw}"), e);
        if direct {
            sys::set_status_flags(raw, libc::O_DIRECT).map_err(dup_error)?;
        }
        // SAFETY: F_SETFD with an integer argument.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(dup_error(sys::errno()));
        }
        fd
    } else {
        match sys::open(path, flags) {
            Ok(fd) => fd,
            Err(e) => {
                if direct && e.raw_os_error() == Some(libc::EINVAL) {
                    // Tell "no O_DIRECT here" from other EINVALs, as QEMU.
                    if sys::open(path, flags & !libc::O_DIRECT).is_ok() {
                        return Err(BlockError {
                            kind: ErrorKind::Unsupported,
                            msg: format!(
                                "Could not open '{path}': filesystem does not support O_DIRECT"
                            ),
                            source: Some(e),
                        });
                    }
                }
                return Err(BlockError::io(format!("Could not open '{path}'"), e));
            }
        }
    };
    if writable {
        // A block device set read-only (blockdev --setro) opens O_RDWR but
        // fails every write; QEMU refuses it at open.
        let st = sys::fstat(fd.as_raw_fd())
            .map_err(|e| BlockError::io("The device is not writable", e))?;
        if sys::is_blk(&st)
            && sys::blkdev_read_only(fd.as_raw_fd())
                .map_err(|e| BlockError::io("The device is not writable", e))?
        {
            return Err(BlockError {
                kind: ErrorKind::PermissionConflict,
                msg: format!(
                    "The device is not writable: {}",
                    strerror(&sys::err(libc::EACCES))
                ),
                source: Some(sys::err(libc::EACCES)),
            });
        }
    }
    Ok(fd)
}

/// The request alignment of a descriptor: probed for `O_DIRECT` (except
/// on NFS), else 1.
fn alignment(fd: RawFd, direct: bool) -> Result<u32, BlockError> {
    if direct && !on_nfs(fd) {
        sys::probe_dio_alignment(fd)
            .ok_or_else(|| BlockError::invalid("Could not find working O_DIRECT alignment"))
    } else {
        Ok(1)
    }
}

fn open_blocking(
    o: &FileOptions,
    node: &NodeOptions,
    fdsets: Option<Arc<dyn FdSets>>,
    inline_writes: bool,
) -> Result<(Inner, bool), BlockError> {
    let path = o.filename.as_str();
    let direct = node.cache_direct;
    let want_rw = !node.read_only;
    let (fd, read_only) = match open_fd(path, want_rw, direct, fdsets.as_deref()) {
        Ok(fd) => (fd, !want_rw),
        Err(e) if want_rw && node.auto_read_only && auto_read_only_falls_back(errno_of(&e)) => {
            tracing::debug!(filename = path, error = %e, "auto-read-only: opening read-only");
            (open_fd(path, false, direct, fdsets.as_deref())?, true)
        }
        Err(e) => return Err(e),
    };
    let raw = fd.as_raw_fd();

    if o.aio == Some(Aio::Native) && !direct {
        return Err(BlockError::invalid(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }

    let st = sys::fstat(raw).map_err(|e| BlockError::io("Could not stat file", e))?;
    let blkdev = sys::is_blk(&st);
    // QEMU has a separate `host_device` driver for block devices; blockd's
    // `file` serves both. Anything else (directories, character devices,
    // FIFOs) is refused with QEMU's message.
    if !sys::is_reg(&st) && !blkdev {
        return Err(BlockError::invalid(format!(
            "'file' driver requires '{path}' to be a regular file"
        )));
    }

    let length = sys::getlength(raw)
        .map_err(|e| BlockError::io("Could not refresh total sector count", e))?;

    let align = alignment(raw, direct)?;

    let lock_cmds = match o.locking.unwrap_or_default() {
        OnOffAuto::Off => None,
        OnOffAuto::Auto => lock::has_ofd(raw).then_some(LockCmds::Ofd),
        OnOffAuto::On => Some(if lock::has_ofd(raw) {
            LockCmds::Ofd
        } else {
            tracing::warn!(
                filename = path,
                "File lock requested but OFD locking syscall is unavailable, \
                 falling back to POSIX file locks; locks can be lost unexpectedly"
            );
            LockCmds::Posix
        }),
    };

    let inner = Inner {
        handle: std::sync::RwLock::new(Arc::new(Handle {
            fd,
            writable: !read_only,
            direct,
            align,
        })),
        filename: o.filename.clone(),
        fdsets,
        blkdev,
        no_flush: AtomicBool::new(node.cache_no_flush),
        node_read_only: AtomicBool::new(read_only),
        auto_read_only: AtomicBool::new(node.auto_read_only),
        force_share: node.force_share,
        length: AtomicU64::new(align_up(length, SECTOR)),
        // Without O_DIRECT, BLKZEROOUT leaves stale data in the page cache
        // (QEMU disables it likewise).
        has_write_zeroes: AtomicBool::new(!blkdev || direct),
        has_discard: AtomicBool::new(true),
        has_fallocate: AtomicBool::new(!blkdev),
        nowait_read: AtomicBool::new(true),
        nowait_write: AtomicBool::new(true),
        inline_writes: InlineWrites::new(raw, inline_writes && !blkdev, direct),
        page_cache_inconsistent: AtomicI32::new(0),
        write_gen: AtomicU64::new(0),
        flushed_gen: AtomicU64::new(0),
        lock_cmds,
        locks: Mutex::new(LockState::default()),
    };
    Ok((inner, read_only))
}

/// Whether `fd` is on NFS (no O_DIRECT alignment needed).
fn on_nfs(fd: RawFd) -> bool {
    sys::fs_magic(fd) == Some(NFS_SUPER_MAGIC)
}

/// Largest request tried inline with RWF_NOWAIT: copying 1 MiB from the
/// page cache takes about as long as the pool hand-off it saves (QEMU's
/// io_uring engine copies page-cache hits of any size inline, in
/// `io_uring_enter`); bigger ones go to the pool.
const NOWAIT_MAX: usize = INLINE_MAX;

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// Runs `f` on the blocking pool (one task per request).
async fn blocking<T, F>(inner: &Arc<Inner>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
{
    let inner = inner.clone();
    match tokio::task::spawn_blocking(move || f(&inner)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "file I/O task failed");
            Err(sys::err(libc::EIO))
        }
    }
}

impl Inner {
    /// The current handle; a request keeps the one it loaded until it is
    /// done, so its descriptor stays open even if a reopen swaps it.
    fn h(&self) -> Arc<Handle> {
        self.handle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the handle (reopen, auto-read-only); returns the old one.
    fn swap_handle(&self, new: Arc<Handle>) -> Arc<Handle> {
        std::mem::replace(
            &mut *self.handle.write().unwrap_or_else(|e| e.into_inner()),
            new,
        )
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let h = self.h();
        if h.direct {
            Ok(sys::read_aligned(h.raw(), len, offset, true)?.freeze())
        } else {
            Ok(Bytes::from(sys::read_vec(h.raw(), len, offset)?))
        }
    }

    /// A buffered read done inline if the page cache holds all of it
    /// (`preadv2(RWF_NOWAIT)`); `None` means "use the blocking pool".
    fn try_read_nowait(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let h = self.h();
        if h.direct || len > NOWAIT_MAX || !self.nowait_read.load(Ordering::Relaxed) {
            return None;
        }
        match sys::read_vec_nowait(h.raw(), len, offset) {
            Ok(Some(v)) => Some(v),
            Ok(None) => None,
            Err(_) => {
                // Not supported here (EOPNOTSUPP and the like): stop trying.
                self.nowait_read.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// A buffered write done inline, on the calling thread: with
    /// `pwritev2(RWF_NOWAIT)` where the file system supports it, else
    /// where [`InlineWrites`] judges it safe. Only within the current
    /// length (whole sectors), so the file grows from the event loop at
    /// most to the end of its last sector. `None` means "use the pool".
    fn try_write_inline(&self, offset: u64, data: &[u8]) -> Option<io::Result<()>> {
        let end = offset.saturating_add(data.len() as u64);
        let length = self.length.load(Ordering::Acquire);
        let h = self.h();
        if h.direct || end > length {
            return None;
        }
        if data.len() <= NOWAIT_MAX && self.nowait_write.load(Ordering::Relaxed) {
            match sys::write_nowait(h.raw(), data, offset) {
                Ok(true) => {
                    self.wrote(end);
                    return Some(Ok(()));
                }
                Ok(false) => return None,
                Err(_) => self.nowait_write.store(false, Ordering::Relaxed),
            }
        }
        if !self.inline_writes.may(offset, data.len(), length) {
            return None;
        }
        let start = Instant::now();
        let r = self.pwrite(&h, offset, data);
        self.inline_writes.took(start.elapsed());
        if r.is_ok() {
            self.wrote(end);
        }
        Some(r)
    }

    /// Records a completed modification ending at `end`.
    fn wrote(&self, end: u64) {
        self.length
            .fetch_max(align_up(end, SECTOR), Ordering::AcqRel);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }

    fn pwrite(&self, h: &Handle, offset: u64, data: &[u8]) -> io::Result<()> {
        if h.direct && !sys::mem_aligned(data.as_ptr()) {
            let b = AlignedBuf::copy_of(data);
            let b = b.as_ref();
            // SAFETY: `b` is a live slice of b.len() bytes.
            return unsafe { sys::pwrite_full(h.raw(), b.as_ptr(), b.len(), offset) };
        }
        // SAFETY: `data` is a live slice of data.len() bytes.
        unsafe { sys::pwrite_full(h.raw(), data.as_ptr(), data.len(), offset) }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.pwrite(&self.h(), offset, data)?;
        self.wrote(offset + data.len() as u64);
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    /// `fdatasync`, remembering a buffered failure for good (QEMU's
    /// `page_cache_inconsistent`).
    fn sync(&self) -> io::Result<()> {
        let bad = self.page_cache_inconsistent.load(Ordering::Acquire);
        if bad != 0 {
            return Err(sys::err(bad));
        }
        let h = self.h();
        sys::fdatasync(h.raw()).inspect_err(|e| {
            if !h.direct {
                self.page_cache_inconsistent
                    .store(sys::raw(e), Ordering::Release);
            }
        })
    }

    fn flush(&self) -> io::Result<()> {
        // Writes completed before this point are covered by the sync below;
        // if nothing was written since the last flush there is nothing to do.
        let gen = self.write_gen.load(Ordering::Acquire);
        if gen == self.flushed_gen.load(Ordering::Acquire)
            && self.page_cache_inconsistent.load(Ordering::Acquire) == 0
        {
            return Ok(());
        }
        self.sync()?;
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    /// Writes zero buffers over a range (the slow fallback).
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let h = self.h();
        let chunk = (len.min(ZERO_CHUNK as u64)) as usize;
        let aligned;
        let plain;
        let zeroes: &[u8] = if h.direct {
            aligned = AlignedBuf::zeroed(chunk);
            aligned.as_ref()
        } else {
            plain = vec![0u8; chunk];
            &plain
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.pwrite(&h, offset + done, &zeroes[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes sure the file is at least `end` bytes long without ever
    /// shrinking it (a concurrent write may have extended it further):
    /// writes zeroes over the last block of the range, which the caller is
    /// zeroing anyway.
    fn extend_to(&self, end: u64) -> io::Result<()> {
        let h = self.h();
        let size = sys::fstat(h.raw())?.st_size as u64;
        if size >= end {
            return Ok(());
        }
        let a = u64::from(h.align);
        self.write_zero_buffers(end - a, a)
    }

    /// QEMU's `handle_aiocb_write_zeroes` (and `_block`): zero a range
    /// efficiently or fail with ENOTSUP.
    fn zero_range_fast(&self, offset: u64, len: u64, no_fallback: bool) -> io::Result<()> {
        let h = self.h();
        let fd = h.raw();
        if self.blkdev {
            if !self.has_write_zeroes.load(Ordering::Relaxed) {
                return Err(sys::err(libc::ENOTSUP));
            }
            // BLKZEROOUT may write zeroes slowly in the kernel: not allowed
            // when the caller asked for no fallback.
            if no_fallback {
                return Err(sys::err(libc::ENOTSUP));
            }
            return sys::blk_zeroout(fd, offset, len).inspect_err(|e| {
                if sys::raw(e) == libc::ENOTSUP {
                    self.has_write_zeroes.store(false, Ordering::Relaxed);
                }
            });
        }
        if self.has_write_zeroes.load(Ordering::Relaxed) {
            match sys::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if sys::raw(&e) == libc::ENOTSUP => {
                    self.has_write_zeroes.store(false, Ordering::Relaxed);
                }
                // Some file systems refuse unaligned ranges with EINVAL:
                // try the other ways.
                Err(e) if sys::raw(&e) == libc::EINVAL => {}
                Err(e) => return Err(e),
            }
        }
        if self.has_discard.load(Ordering::Relaxed) && self.has_fallocate.load(Ordering::Relaxed) {
            match sys::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => match sys::fallocate(fd, 0, offset, len) {
                    Err(e) if sys::raw(&e) == libc::ENOTSUP => {
                        self.has_fallocate.store(false, Ordering::Relaxed);
                    }
                    r => return r,
                },
                Err(e) if sys::raw(&e) == libc::EINVAL => {
                    tracing::warn!(
                        "file system misbehaves: fallocate(FALLOC_FL_PUNCH_HOLE) returned EINVAL"
                    );
                }
                Err(e) if sys::raw(&e) == libc::ENOTSUP => {
                    self.has_discard.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        // Last resort: extending the file with zeroes is what fallocate(0)
        // does past the end.
        if self.has_fallocate.load(Ordering::Relaxed) && offset >= sys::fstat(fd)?.st_size as u64 {
            match sys::fallocate(fd, 0, offset, len) {
                Err(e) if sys::raw(&e) == libc::ENOTSUP => {
                    self.has_fallocate.store(false, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        Err(sys::err(libc::ENOTSUP))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        let end = offset + len;
        if flags.may_unmap {
            // Deallocate and read back zeroes in one go, if possible.
            match sys::fallocate(
                self.h().raw(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => {
                    if !self.blkdev {
                        self.extend_to(end)?;
                    }
                    return self.finish_zeroes(end, flags);
                }
                Err(e) if matches!(sys::raw(&e), libc::ENOTSUP | libc::EINVAL | libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
        match self.zero_range_fast(offset, len, flags.no_fallback) {
            Ok(()) => {}
            Err(e) if sys::raw(&e) == libc::ENOTSUP && !flags.no_fallback => {
                self.write_zero_buffers(offset, len)?;
            }
            Err(e) => return Err(e),
        }
        self.finish_zeroes(end, flags)
    }

    fn finish_zeroes(&self, end: u64, flags: ReqFlags) -> io::Result<()> {
        self.wrote(end);
        if flags.fua {
            self.sync()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.has_discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        let h = self.h();
        let r = if self.blkdev {
            sys::blk_discard(h.raw(), offset, len)
        } else {
            sys::fallocate(
                h.raw(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match r {
            Ok(()) => {
                self.write_gen.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            // Discard is advisory: "not supported here" is not an error.
            Err(e) if sys::raw(&e) == libc::ENOTSUP => {
                self.has_discard.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// QEMU's `raw_co_block_status` over `find_allocation`.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let h = self.h();
        let a = u64::from(h.align);
        let data = |n: u64| BlockStatus {
            len: n,
            data: true,
            zero: false,
            allocated: true,
        };
        let hole = |n: u64| BlockStatus {
            len: n,
            data: false,
            zero: true,
            allocated: true,
        };
        let fd = h.raw();
        let st = match sys::lseek(fd, offset, libc::SEEK_DATA) {
            // A trailing hole (or the file shrank behind our back).
            Ok(None) => hole(len),
            // SEEK_DATA not supported or failing: all data.
            Err(_) => data(len),
            Ok(Some(d)) if d < offset => data(len),
            Ok(Some(d)) if d > offset => {
                // In a hole up to the next data; report whole blocks only.
                let n = align_down(d - offset, a);
                if n == 0 {
                    data(a.min(len))
                } else {
                    hole(n)
                }
            }
            Ok(Some(_)) => match sys::lseek(fd, offset, libc::SEEK_HOLE) {
                Ok(None) => hole(len),
                // Data up to the next hole (or EOF, rounded up to a block).
                Ok(Some(h)) if h > offset => data(align_up(h - offset, a)),
                // The hole appeared behind our back, or no answer: data.
                _ => data(len),
            },
        };
        Ok(BlockStatus {
            len: st.len.clamp(1, len),
            ..st
        })
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        if self.blkdev {
            // A device cannot be resized; shrinking is a no-op, growing
            // fails (QEMU's non-exact truncate of device files).
            let cur = sys::getlength(self.h().raw())?;
            return if len > cur {
                Err(sys::err(libc::EINVAL))
            } else {
                Ok(())
            };
        }
        sys::ftruncate(self.h().raw(), len)?;
        self.length.store(align_up(len, SECTOR), Ordering::Release);
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the descriptor drops its locks, unless the description
        // lives on elsewhere (a descriptor set keeps the original): release
        // them explicitly.
        if let Some(cmds) = self.lock_cmds {
            let fd = self.h().raw();
            let st = self.locks.get_mut().unwrap_or_else(|e| e.into_inner());
            if st.locked_perm != Perm::NONE || st.locked_unshared != Perm::NONE {
                lock::release_all(fd, cmds, st);
            }
        }
    }
}

impl FileDriver {
    /// The request alignment in use (1 unless `cache.direct`).
    pub fn alignment(&self) -> u32 {
        self.inner.h().align
    }

    /// Whether image locking is active on this node.
    pub fn locking(&self) -> bool {
        self.inner.lock_cmds.is_some()
    }
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    fn limits(&self) -> IoLimits {
        IoLimits {
            request_alignment: self.inner.h().align,
            ..IoLimits::default()
        }
    }

    fn length(&self) -> u64 {
        self.inner.length.load(Ordering::Acquire)
    }

    fn filename(&self) -> Option<String> {
        Some(self.inner.filename.clone())
    }

    fn allocated_size(&self) -> Option<u64> {
        sys::fstat(self.inner.h().raw())
            .ok()
            .map(|st| st.st_blocks as u64 * 512)
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            format_specific: Some(serde_json::json!({ "type": "file", "data": {} })),
            ..DriverInfo::default()
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        // Fast path: a buffered read that the page cache can satisfy is
        // done inline with RWF_NOWAIT, without a trip to the blocking pool
        // (the kernel refuses with EAGAIN instead of blocking).
        if let Some(v) = self.inner.try_read_nowait(offset, len) {
            return Box::pin(async move { Ok(Bytes::from(v)) });
        }
        Box::pin(blocking(&self.inner, move |i| i.read(offset, len)))
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        if !flags.fua {
            if let Some(r) = self.inner.try_write_inline(offset, &data) {
                return Box::pin(async move { r });
            }
        }
        Box::pin(blocking(&self.inner, move |i| {
            i.write(offset, &data, flags.fua)
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(blocking(&self.inner, move |i| {
            i.write_zeroes(offset, len, flags)
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(blocking(&self.inner, move |i| i.discard(offset, len)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(blocking(&self.inner, |i| i.flush()))
    }

    fn start_writeback(&self) -> IoFuture<'_, ()> {
        Box::pin(blocking(&self.inner, |i| sys::start_writeback(i.h().raw())))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        // SEEK_DATA/SEEK_HOLE answer from the filesystem's in-memory extent
        // maps: done inline, as QEMU does from its coroutine, rather than
        // paying a trip to the blocking pool on every NBD read of a region
        // (the server asks for block status before a hole-aware read).
        // Block devices (BLKDISCARD-style queries) keep using the pool.
        if !self.inner.blkdev {
            let r = self.inner.block_status(offset, len);
            return Box::pin(async move { r });
        }
        Box::pin(blocking(&self.inner, move |i| i.block_status(offset, len)))
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(blocking(&self.inner, move |i| i.truncate(len)))
    }

    fn set_perm(&self, perm: PermPair) -> Result<(), BlockError> {
        self.inner.set_perm(perm)
    }

    fn reopen_prepare<'a>(&'a self, req: &'a ReopenRequest<'a>) -> PrepareFuture<'a> {
        Box::pin(reopen::prepare(&self.inner, req))
    }

    fn reopen_commit(&self, staged: Staged) {
        reopen::commit(&self.inner, staged);
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // QEMU flushes a node before closing it, except with
            // cache.no-flush; the descriptor itself closes when the driver
            // is dropped.
            let r = if self.inner.no_flush.load(Ordering::Acquire) {
                Ok(())
            } else {
                blocking(&self.inner, |i| i.flush()).await
            };
            if let Some(cmds) = self.inner.lock_cmds {
                let mut st = self.inner.locks.lock().unwrap_or_else(|e| e.into_inner());
                lock::release_all(self.inner.h().raw(), cmds, &mut st);
            }
            r
        })
    }
}
