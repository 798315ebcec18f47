//! Thin, blocking wrappers around the system calls the `file` driver uses.
//!
//! Everything here runs on a blocking thread (`spawn_blocking`) or during
//! open; nothing here knows about nodes or permissions. Functions return
//! `io::Result` with the raw errno preserved, so that the error policy above
//! can tell ENOSPC from EIO.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use blockd_core::buf::AlignedBuf;
use bytes::BufMut;

/// Largest alignment the O_DIRECT probe tries (QEMU's `MAX_BLOCKSIZE`).
pub(super) const MAX_BLOCKSIZE: usize = 4096;

/// `BLKROGET`: whether a block device is read-only (`_IO(0x12, 94)`).
const BLKROGET: libc::c_ulong = 0x125e;
/// `BLKDISCARD` (`_IO(0x12, 119)`).
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT` (`_IO(0x12, 127)`).
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `BLKSSZGET`: logical block size (`_IO(0x12, 104)`).
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `XFS_IOC_DIOINFO` (`_IOR('X', 30, struct dioattr)`, 12-byte argument).
const XFS_IOC_DIOINFO: libc::c_ulong = 0x800c_581e;

/// The current errno as an `io::Error`.
pub(super) fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// The raw errno of an error (EIO if it has none).
pub(super) fn raw(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// An error from an errno value.
pub(super) fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// QEMU's `translate_err`: the errnos that mean "not supported here".
pub(super) fn translate(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENODEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOTTY) => err(libc::ENOTSUP),
        _ => e,
    }
}

/// `open(2)` with `O_CLOEXEC`.
pub(super) fn open(path: &str, flags: i32) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| err(libc::EINVAL))?;
    loop {
        // SAFETY: `c` is a valid NUL-terminated string; open has no other
        // memory-safety preconditions.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by open and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Sets the status flags that `F_SETFL` can change (O_DIRECT among them)
/// on a descriptor obtained from elsewhere, as QEMU's `qemu_dup_flags` does.
pub(super) fn set_status_flags(fd: RawFd, add: i32) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) only reads the descriptor's flags.
    let cur = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if cur < 0 {
        return Err(errno());
    }
    if cur & add == add {
        return Ok(());
    }
    // SAFETY: fcntl(F_SETFL) with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, cur | add) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `fstat(2)`.
pub(super) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of a `stat`.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } < 0 {
        return Err(errno());
    }
    // SAFETY: fstat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// Whether a mode is a block device.
pub(super) fn is_blk(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFBLK
}

/// Whether a mode is a regular file.
pub(super) fn is_reg(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// `lseek(2)`; `Ok(None)` for ENXIO (beyond the end / no more data).
pub(super) fn lseek(fd: RawFd, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
    // SAFETY: lseek has no memory-safety preconditions.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        let e = errno();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The length of a file or block device (`lseek(SEEK_END)`, as QEMU on Linux).
pub(super) fn getlength(fd: RawFd) -> io::Result<u64> {
    lseek(fd, 0, libc::SEEK_END)?.ok_or_else(|| err(libc::EIO))
}

/// Whether a block device is configured read-only (`blockdev --setro`):
/// open(O_RDWR) succeeds on such devices but writes fail, so QEMU checks.
pub(super) fn blkdev_read_only(fd: RawFd) -> io::Result<bool> {
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int to the pointer.
    if unsafe { libc::ioctl(fd, BLKROGET as _, &mut ro as *mut libc::c_int) } < 0 {
        return Err(errno());
    }
    Ok(ro != 0)
}

/// The logical block size of a block device (`BLKSSZGET`).
pub(super) fn logical_block_size(fd: RawFd) -> Option<u32> {
    let mut sz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer; on a regular file
    // the ioctl fails with ENOTTY and writes nothing.
    let r = unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut sz as *mut libc::c_int) };
    (r >= 0 && sz > 0).then_some(sz as u32)
}

/// XFS's minimal O_DIRECT I/O size (`XFS_IOC_DIOINFO`), if the file is on XFS.
pub(super) fn xfs_dio_min_io(fd: RawFd) -> Option<u32> {
    let mut da = [0u32; 3]; // d_mem, d_miniosz, d_maxiosz
                            // SAFETY: the ioctl writes at most the 12-byte struct the array provides;
                            // other file systems reject the number with ENOTTY.
    let r = unsafe { libc::ioctl(fd, XFS_IOC_DIOINFO as _, da.as_mut_ptr()) };
    (r >= 0 && da[1] > 0).then_some(da[1])
}

/// Probes the request alignment O_DIRECT needs on `fd`, the way QEMU does
/// (`raw_probe_alignment`): the logical block size of a block device, XFS's
/// own answer, else the smallest of 512..4096 that a read at offset 0
/// accepts. A read that succeeds at length 1 teaches nothing (an empty file
/// accepts any length), so it means the safe 4096.
pub(super) fn probe_dio_alignment(fd: RawFd) -> Option<u32> {
    if let Some(a) = logical_block_size(fd).or_else(|| xfs_dio_min_io(fd)) {
        if a.is_power_of_two() {
            return Some(a);
        }
    }
    let mut buf = AlignedBuf::zeroed(MAX_BLOCKSIZE);
    for align in [1usize, 512, 1024, 2048, 4096] {
        // SAFETY: `buf` holds MAX_BLOCKSIZE >= align writable bytes.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), align, 0) };
        // Linux reports a misaligned O_DIRECT read with EINVAL; any other
        // error (a failing disk) says nothing about alignment.
        if r >= 0 || errno().raw_os_error() != Some(libc::EINVAL) {
            return Some(if align == 1 {
                MAX_BLOCKSIZE as u32
            } else {
                align as u32
            });
        }
    }
    None
}

/// Reads up to `len` bytes at `offset` into `buf`, retrying on EINTR and
/// after short reads. Returns the number of bytes read, less than `len`
/// only at end of file. With O_DIRECT a read continuing after a short read
/// may fail with EINVAL (unaligned position at EOF): that is EOF too.
///
/// # Safety
/// `buf` must be valid for writes of `len` bytes.
pub(super) unsafe fn pread_full(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    offset: u64,
    direct: bool,
) -> io::Result<usize> {
    let mut done = 0usize;
    while done < len {
        let pos = i64::try_from(offset + done as u64).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: the caller guarantees `buf..buf+len` is writable and
        // done < len.
        let r = unsafe { libc::pread(fd, buf.add(done).cast(), len - done, pos) };
        if r < 0 {
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if direct && done > 0 => break,
                _ => return Err(e),
            }
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    Ok(done)
}

/// Writes all `len` bytes of `buf` at `offset`, retrying on EINTR and after
/// short writes. A write that makes no progress fails with EINVAL, as in QEMU.
///
/// # Safety
/// `buf` must be valid for reads of `len` bytes.
pub(super) unsafe fn pwrite_full(
    fd: RawFd,
    buf: *const u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let pos = i64::try_from(offset + done as u64).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: the caller guarantees `buf..buf+len` is readable and
        // done < len.
        let r = unsafe { libc::pwrite(fd, buf.add(done).cast(), len - done, pos) };
        if r < 0 {
            let e = errno();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(err(libc::EINVAL));
        }
        done += r as usize;
    }
    Ok(())
}

/// `fdatasync(2)`, retrying on EINTR.
/// `sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`: starts writeback of
/// the whole file's dirty pages without waiting for it.
pub(super) fn start_writeback(fd: RawFd) -> io::Result<()> {
    // SAFETY: sync_file_range has no memory-safety preconditions.
    if unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

pub(super) fn fdatasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync has no memory-safety preconditions.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `fallocate(2)` with QEMU's error translation (unsupported → ENOTSUP).
pub(super) fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| err(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate has no memory-safety preconditions.
        if unsafe { libc::fallocate(fd, mode, off, len) } == 0 {
            return Ok(());
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(translate(e));
        }
    }
}

/// `ftruncate(2)`.
pub(super) fn ftruncate(fd: RawFd, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| err(libc::EINVAL))?;
    loop {
        // SAFETY: ftruncate has no memory-safety preconditions.
        if unsafe { libc::ftruncate(fd, len) } == 0 {
            return Ok(());
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// A range ioctl of a block device (`BLKDISCARD`, `BLKZEROOUT`).
fn blk_range_ioctl(fd: RawFd, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let mut range = [offset, len];
    loop {
        // SAFETY: both ioctls read a `u64[2]` from the pointer.
        if unsafe { libc::ioctl(fd, req as _, range.as_mut_ptr()) } == 0 {
            return Ok(());
        }
        let e = errno();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(translate(e));
        }
    }
}

/// Discards a range of a block device.
pub(super) fn blk_discard(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(fd, BLKDISCARD, offset, len)
}

/// Zeroes a range of a block device (may fall back to writing in the kernel).
pub(super) fn blk_zeroout(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(fd, BLKZEROOUT, offset, len)
}

/// Reads `len` bytes at `offset` into a new aligned buffer (O_DIRECT
/// needs one); the part beyond end of file reads as zeroes.
pub(super) fn read_aligned(
    fd: RawFd,
    len: usize,
    offset: u64,
    direct: bool,
) -> io::Result<AlignedBuf> {
    let mut b = AlignedBuf::with_capacity(len);
    // SAFETY: the buffer's spare capacity holds `len` writable bytes.
    let n = unsafe { pread_full(fd, b.chunk_mut().as_mut_ptr(), len, offset, direct)? };
    // SAFETY: pread initialised the first `n` bytes.
    unsafe { b.advance_mut(n) };
    b.put_bytes(0, len - n);
    Ok(b)
}

/// Reads `len` bytes at `offset` into a new `Vec` (buffered I/O: no
/// alignment, no zero-initialisation before the read); the part beyond end
/// of file reads as zeroes.
pub(super) fn read_vec(fd: RawFd, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut v: Vec<u8> = Vec::with_capacity(len);
    // SAFETY: the vector has capacity for `len` bytes.
    let n = unsafe { pread_full(fd, v.as_mut_ptr(), len, offset, false)? };
    // SAFETY: pread initialised the first `n` bytes.
    unsafe { v.set_len(n) };
    v.resize(len, 0);
    Ok(v)
}

/// A buffered read that must not block: `Ok(Some)` with all `len` bytes
/// if the page cache held them, `Ok(None)` if the kernel would have to
/// wait (EAGAIN) or returned less (EOF, partly cached: the caller retries
/// on the blocking pool), `Err` if `RWF_NOWAIT` is not supported.
pub(super) fn read_vec_nowait(fd: RawFd, len: usize, offset: u64) -> io::Result<Option<Vec<u8>>> {
    let pos = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
    let mut v: Vec<u8> = Vec::with_capacity(len);
    let iov = libc::iovec {
        iov_base: v.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes the vector's spare capacity of `len` bytes,
    // which stays allocated during the call.
    let r = unsafe { libc::preadv2(fd, &iov, 1, pos, libc::RWF_NOWAIT) };
    if r < 0 {
        let e = errno();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Err(e),
            // EAGAIN, EINTR, and real errors: the blocking pool retries
            // and reports what it finds.
            _ => Ok(None),
        };
    }
    if r as usize != len {
        return Ok(None);
    }
    // SAFETY: the kernel initialised all `len` bytes.
    unsafe { v.set_len(len) };
    Ok(Some(v))
}

/// A buffered write that must not block: `Ok(true)` if all of `data` was
/// written, `Ok(false)` if the kernel would have to wait (nothing or part
/// written: the caller redoes the whole write on the blocking pool, which
/// is harmless as it writes the same bytes), `Err` if not supported.
pub(super) fn write_nowait(fd: RawFd, data: &[u8], offset: u64) -> io::Result<bool> {
    let pos = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: `iov` describes `data`, live and readable during the call.
    let r = unsafe { libc::pwritev2(fd, &iov, 1, pos, libc::RWF_NOWAIT) };
    if r < 0 {
        let e = errno();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Err(e),
            _ => Ok(false),
        };
    }
    Ok(r as usize == data.len())
}

/// The file system type (`statfs.f_type`) of `fd`, if it can be had.
pub(super) fn fs_magic(fd: RawFd) -> Option<i64> {
    let mut sfs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `sfs` is valid for writes of a `statfs`.
    if unsafe { libc::fstatfs(fd, sfs.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstatfs succeeded and initialised `sfs`.
    let sfs = unsafe { sfs.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Some(sfs.f_type as i64)
}

/// Whether `p` is aligned for O_DIRECT.
pub(super) fn mem_aligned(p: *const u8) -> bool {
    blockd_core::buf::is_aligned(p)
}

/// The raw descriptor of an owned one (shorthand).
pub(super) fn rawfd(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Whether two descriptors share one open file description (`kcmp`);
/// `false` if the kernel cannot tell. Locks (OFD locks) belong to the
/// description, so releasing them through one releases them for both.
pub(super) fn same_description(a: RawFd, b: RawFd) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: getpid has no preconditions.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp only compares kernel objects named by plain integers;
    // bad values fail with an errno.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    r == 0
}
