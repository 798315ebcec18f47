//! A safe wrapper over [`super::sys`]: a connected cluster with an I/O
//! context on one pool ([`Pool`]), an open image ([`Image`]) and its
//! asynchronous requests, whose completions librbd delivers on one of its
//! own threads to a callback that hands the result to the awaiting task
//! through a oneshot channel (QEMU's `qemu_rbd_completion_cb` schedules a
//! bottom half instead). No thread waits per request.
//!
//! Buffers belong to the request, not to the future that awaits it: a
//! read's buffer and a write's data move into the completion's state,
//! which the callback frees, so dropping a future before its request
//! completes (a cancelled job) leaves librbd nothing dangling.

use std::ffi::CString;
use std::io;
use std::os::raw::{c_int, c_void};
use std::ptr;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::sys;

fn err(r: c_int) -> io::Error {
    io::Error::from_raw_os_error(-r)
}

pub(super) fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(err(r))
    } else {
        Ok(())
    }
}

/// A C string from a Rust one; an interior NUL is refused as EINVAL.
pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A cluster handle, connected or not (`rados_t`); shut down on drop.
pub struct Cluster(sys::rados_t);

// SAFETY: librados handles may be used from any thread (librados is
// thread-safe; QEMU uses one from its iothreads and main loop).
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// `rados_create` as the client `user` (default: admin).
    pub fn create(user: Option<&str>) -> io::Result<Cluster> {
        let user = user.map(cstr).transpose()?;
        let mut h = ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer; the id is NULL or a C string
        // that outlives the call.
        let r =
            unsafe { sys::rados_create(&mut h, user.as_ref().map_or(ptr::null(), |u| u.as_ptr())) };
        check(r)?;
        Ok(Cluster(h))
    }

    /// `rados_conf_read_file`: `None` reads the default locations.
    pub fn read_conf(&self, path: Option<&str>) -> io::Result<()> {
        let path = path.map(cstr).transpose()?;
        // SAFETY: the handle is live; the path is NULL or a C string.
        check(unsafe {
            sys::rados_conf_read_file(self.0, path.as_ref().map_or(ptr::null(), |p| p.as_ptr()))
        })
    }

    /// `rados_conf_set`.
    pub fn set(&self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: the handle is live; both are C strings (librados copies them).
        check(unsafe { sys::rados_conf_set(self.0, k.as_ptr(), v.as_ptr()) })
    }

    /// `rados_connect` (blocking: run it off the event loop).
    pub fn connect(&self) -> io::Result<()> {
        // SAFETY: the handle is live and configured.
        check(unsafe { sys::rados_connect(self.0) })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live and nothing uses it any more: every
        // I/O context holds the cluster and is dropped first.
        unsafe { sys::rados_shutdown(self.0) }
    }
}

/// An I/O context on one pool (and namespace) of a connected cluster.
pub struct Pool {
    io: sys::rados_ioctx_t,
    // Dropped after `io` (fields drop in order, and Drop runs first).
    _cluster: Cluster,
}

// SAFETY: an ioctx may be used from any thread for the calls made here
// (image open/create), which librados serialises itself.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// `rados_ioctx_create` on `pool`.
    pub fn open(cluster: Cluster, pool: &str) -> io::Result<Pool> {
        let p = cstr(pool)?;
        let mut io = ptr::null_mut();
        // SAFETY: the cluster is connected; `io` is a valid out-pointer.
        check(unsafe { sys::rados_ioctx_create(cluster.0, p.as_ptr(), &mut io) })?;
        Ok(Pool {
            io,
            _cluster: cluster,
        })
    }

    /// `rbd_namespace_exists`.
    pub fn namespace_exists(&self, ns: &str) -> io::Result<bool> {
        let n = cstr(ns)?;
        let mut exists = false;
        // SAFETY: live ioctx, C string, valid out-pointer.
        check(unsafe { sys::rbd_namespace_exists(self.io, n.as_ptr(), &mut exists) })?;
        Ok(exists)
    }

    /// `rados_ioctx_set_namespace` (`""`: the default namespace).
    pub fn set_namespace(&self, ns: &str) -> io::Result<()> {
        let n = cstr(ns)?;
        // SAFETY: live ioctx; librados copies the name.
        unsafe { sys::rados_ioctx_set_namespace(self.io, n.as_ptr()) };
        Ok(())
    }

    /// `rbd_create` (blocking). `order`: log2 of the object size, 0 for
    /// the default.
    pub fn create_image(&self, name: &str, size: u64, order: i32) -> io::Result<()> {
        let n = cstr(name)?;
        let mut order: c_int = order;
        // SAFETY: live ioctx, C string, valid in/out pointer.
        check(unsafe { sys::rbd_create(self.io, n.as_ptr(), size, &mut order) })
    }

    /// `rbd_remove` (blocking).
    pub fn remove_image(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: live ioctx, C string.
        check(unsafe { sys::rbd_remove(self.io, n.as_ptr()) })
    }

    /// `rbd_open` (blocking), at `snapshot` if given (then read-only).
    pub fn open_image(self, name: &str, snapshot: Option<&str>) -> io::Result<Image> {
        let n = cstr(name)?;
        let s = snapshot.map(cstr).transpose()?;
        let mut h = ptr::null_mut();
        // SAFETY: live ioctx, C strings, valid out-pointer.
        let r = unsafe {
            sys::rbd_open(
                self.io,
                n.as_ptr(),
                &mut h,
                s.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            )
        };
        check(r)?;
        Ok(Image { h, _pool: self })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the ioctx is live; every image opened on it holds the
        // pool and is closed first.
        unsafe { sys::rados_ioctx_destroy(self.io) }
    }
}

/// What `rbd_stat` reports that the driver uses.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// Image size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
}

/// An encryption format librbd 1.16 formats and loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// LUKS version 1.
    Luks1,
    /// LUKS version 2.
    Luks2,
}

/// A cipher librbd formats LUKS images with (AES in XTS mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 256-bit key.
    Aes256,
}

/// An open image (`rbd_image_t`); closed on drop.
pub struct Image {
    h: sys::rbd_image_t,
    _pool: Pool,
}

// SAFETY: librbd image handles are thread-safe: requests may be started
// from any thread, and QEMU does so from several iothreads.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// State of one asynchronous request, owned by librbd from the moment the
/// request starts until its callback runs.
struct Pending<T> {
    tx: Option<oneshot::Sender<(isize, T)>>,
    buf: T,
}

/// The completion callback (`rbd_callback_t`), on a librbd thread: takes
/// the request's state back and sends the result to whoever waits (if
/// nobody does any more, the buffer is simply freed).
extern "C" fn on_complete<T: Send>(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `c` is the completion librbd calls us for; we release it
    // once, here, after reading its value.
    let ret = unsafe {
        let r = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        r
    };
    // SAFETY: `arg` is the `Box<Pending<T>>` leaked in `Image::aio` for
    // this completion; librbd calls back exactly once.
    let mut p = unsafe { Box::from_raw(arg as *mut Pending<T>) };
    if let Some(tx) = p.tx.take() {
        let _ = tx.send((ret, p.buf));
    }
}

impl Image {
    /// The raw handle, for the other wrappers of this module's siblings
    /// ([`super::snap`]); valid while `self` lives.
    pub(super) fn handle(&self) -> sys::rbd_image_t {
        self.h
    }

    /// `rbd_stat`.
    pub fn stat(&self) -> io::Result<Stat> {
        // SAFETY: an all-zero rbd_image_info_t is valid (integers and char arrays).
        let mut info: sys::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: live image; `info` is a valid struct of the given size.
        check(unsafe {
            sys::rbd_stat(
                self.h,
                &mut info,
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        })?;
        Ok(Stat {
            size: info.size,
            obj_size: info.obj_size,
        })
    }

    /// `rbd_encryption_format` (blocking): writes a LUKS header whose
    /// one key slot opens with `passphrase`, and loads the encryption, so
    /// the image's size becomes the payload's.
    pub fn encryption_format(
        &self,
        format: Encryption,
        alg: CipherAlg,
        passphrase: &[u8],
    ) -> io::Result<()> {
        let mut o = luks_options(passphrase);
        o.alg = match alg {
            CipherAlg::Aes128 => sys::RBD_ENCRYPTION_ALGORITHM_AES128,
            CipherAlg::Aes256 => sys::RBD_ENCRYPTION_ALGORITHM_AES256,
        };
        // SAFETY: live image; the options struct and the passphrase it
        // points to outlive the call, which copies what it keeps.
        check(unsafe {
            sys::rbd_encryption_format(
                self.h,
                format_code(format),
                (&mut o as *mut sys::rbd_encryption_luks_format_options_t).cast(),
                std::mem::size_of::<sys::rbd_encryption_luks_format_options_t>(),
            )
        })
    }

    /// `rbd_encryption_load` (blocking): from now on the image reads and
    /// writes the LUKS payload, and its size is the payload's.
    pub fn encryption_load(&self, format: Encryption, passphrase: &[u8]) -> io::Result<()> {
        let mut o = luks_options(passphrase);
        // SAFETY: as in `encryption_format`.
        check(unsafe {
            sys::rbd_encryption_load(
                self.h,
                format_code(format),
                (&mut o as *mut sys::rbd_encryption_luks_format_options_t).cast(),
                std::mem::size_of::<sys::rbd_encryption_luks_format_options_t>(),
            )
        })
    }

    /// `rbd_read` (blocking) of up to `buf.len()` bytes at `off`; returns
    /// how many were read.
    pub fn read_sync(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: live image; the buffer has room for `buf.len()` bytes.
        let r = unsafe { sys::rbd_read(self.h, off, buf.len(), buf.as_mut_ptr().cast()) };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-(r as i32)));
        }
        Ok(r as usize)
    }

    /// Closes the image and gives its pool back (to remove the image).
    pub fn into_pool(self) -> Pool {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the handle is live and, as `this` is never dropped,
        // closed only here; the pool is moved out exactly once and the
        // image's memory is not used again.
        unsafe {
            sys::rbd_close(this.h);
            ptr::read(&this._pool)
        }
    }

    /// `rbd_get_size`.
    pub fn size(&self) -> io::Result<u64> {
        let mut s = 0;
        // SAFETY: live image, valid out-pointer.
        check(unsafe { sys::rbd_get_size(self.h, &mut s) })?;
        Ok(s)
    }

    /// `rbd_resize` (blocking).
    pub fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: live image.
        check(unsafe { sys::rbd_resize(self.h, size) })
    }

    /// `rbd_get_features`.
    pub fn features(&self) -> io::Result<u64> {
        let mut f = 0;
        // SAFETY: live image, valid out-pointer.
        check(unsafe { sys::rbd_get_features(self.h, &mut f) })?;
        Ok(f)
    }

    /// `rbd_get_flags`.
    pub fn flags(&self) -> io::Result<u64> {
        let mut f = 0;
        // SAFETY: live image, valid out-pointer.
        check(unsafe { sys::rbd_get_flags(self.h, &mut f) })?;
        Ok(f)
    }

    /// Whether the image is a clone (has a parent).
    pub fn has_parent(&self) -> bool {
        // SAFETY: live image; NULL buffers of length 0 ask only whether a
        // parent exists (-ENOENT when none), as QEMU calls it.
        let r = unsafe {
            sys::rbd_get_parent_info(
                self.h,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
                0,
                ptr::null_mut(),
                0,
            )
        };
        r != -libc::ENOENT
    }

    /// `rbd_diff_iterate2` over `[ofs, ofs+len)` from the image's creation
    /// (blocking): calls `f(offset, length, exists)` for each extent
    /// until it returns false. Returns whether it was stopped.
    pub fn diff_iterate(
        &self,
        ofs: u64,
        len: u64,
        whole_object: bool,
        f: &mut dyn FnMut(u64, u64, bool) -> bool,
    ) -> io::Result<bool> {
        const STOP: c_int = -9000;
        extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `&mut &mut dyn FnMut` passed below,
            // alive for the whole (synchronous) iteration.
            let f = unsafe { &mut *(arg as *mut &mut dyn FnMut(u64, u64, bool) -> bool) };
            if f(off, len as u64, exists != 0) {
                0
            } else {
                STOP
            }
        }
        let mut f = f;
        // SAFETY: live image; the callback and its argument outlive the
        // call, which does not keep them.
        let r = unsafe {
            sys::rbd_diff_iterate2(
                self.h,
                ptr::null(),
                ofs,
                len,
                1,
                u8::from(whole_object),
                cb,
                &mut f as *mut &mut dyn FnMut(u64, u64, bool) -> bool as *mut c_void,
            )
        };
        match r {
            STOP => Ok(true),
            r => check(r).map(|()| false),
        }
    }

    /// Starts a request with `start(image, completion, &mut buf)`; the
    /// receiver gets librbd's return value and the buffer back.
    /// Synchronous, so that no raw pointer lives in an awaiting future.
    fn submit<T: Send + 'static>(
        &self,
        buf: T,
        start: impl FnOnce(sys::rbd_image_t, sys::rbd_completion_t, &mut T) -> c_int,
    ) -> io::Result<oneshot::Receiver<(isize, T)>> {
        let (tx, rx) = oneshot::channel();
        let p = Box::into_raw(Box::new(Pending { tx: Some(tx), buf }));
        let mut c = ptr::null_mut();
        // SAFETY: `p` stays valid until the callback reclaims it; the
        // callback matches the state's type.
        let r =
            unsafe { sys::rbd_aio_create_completion(p as *mut c_void, on_complete::<T>, &mut c) };
        if r < 0 {
            // SAFETY: no completion exists, so nothing else owns `p`.
            drop(unsafe { Box::from_raw(p) });
            return Err(err(r));
        }
        // SAFETY: `p` is live until the request completes, and the
        // request has not started yet: the buffer is ours to lend.
        let r = start(self.h, c, unsafe { &mut (*p).buf });
        if r < 0 {
            // The request never started: the callback will not run.
            // SAFETY: release the unused completion and reclaim the state.
            unsafe {
                sys::rbd_aio_release(c);
                drop(Box::from_raw(p));
            }
            return Err(err(r));
        }
        Ok(rx)
    }

    /// Waits for a request [`Image::submit`] started.
    async fn finish<T>(rx: oneshot::Receiver<(isize, T)>) -> io::Result<(isize, T)> {
        let (ret, buf) = rx
            .await
            .map_err(|_| io::Error::other("librbd dropped a completion"))?;
        if ret < 0 {
            return Err(io::Error::from_raw_os_error(-(ret as i32)));
        }
        Ok((ret, buf))
    }

    /// Reads `len` bytes at `off`; a short read (past the end) is padded
    /// with zeroes, as QEMU pads it. The buffer is not cleared first:
    /// librbd fills what it returns, the rest is zeroed here.
    pub async fn read(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let rx = self.submit(
            Vec::<u8>::with_capacity(len),
            move |h, c, b: &mut Vec<u8>| {
                // SAFETY: the buffer has room for `len` bytes and lives in
                // the request's state until the callback.
                unsafe { sys::rbd_aio_read(h, off, len, b.as_mut_ptr().cast(), c) }
            },
        )?;
        let (ret, mut buf) = Self::finish(rx).await?;
        let got = usize::try_from(ret).unwrap_or(0).min(len);
        // SAFETY: librbd wrote `got` bytes at the start of the buffer; the
        // rest of its `len` bytes of capacity is zeroed before `set_len`.
        unsafe {
            std::ptr::write_bytes(buf.as_mut_ptr().add(got), 0, len - got);
            buf.set_len(len);
        }
        Ok(buf)
    }

    /// Writes `data` at `off`.
    pub async fn write(&self, off: u64, data: Bytes) -> io::Result<()> {
        let rx = self.submit(data, move |h, c, d: &mut Bytes| {
            // SAFETY: the data lives in the request's state until the callback.
            unsafe { sys::rbd_aio_write(h, off, d.len(), d.as_ptr().cast(), c) }
        })?;
        Self::finish(rx).await.map(drop)
    }

    /// Discards `len` bytes at `off`.
    pub async fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: no buffer; live image.
        let rx = self.submit((), move |h, c, _| unsafe {
            sys::rbd_aio_discard(h, off, len, c)
        })?;
        Self::finish(rx).await.map(drop)
    }

    /// Writes zeroes; `thick` allocates them (librbd's thick provisioning).
    pub async fn write_zeroes(&self, off: u64, len: u64, thick: bool) -> io::Result<()> {
        let flags = if thick {
            sys::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let rx = self.submit((), move |h, c, _| {
            // SAFETY: no buffer; live image.
            unsafe { sys::rbd_aio_write_zeroes(h, off, len, c, flags, 0) }
        })?;
        Self::finish(rx).await.map(drop)
    }

    /// Flushes librbd's cache.
    pub async fn flush(&self) -> io::Result<()> {
        // SAFETY: no buffer; live image.
        let rx = self.submit((), |h, c, _| unsafe { sys::rbd_aio_flush(h, c) })?;
        Self::finish(rx).await.map(drop)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle is live; rbd_close waits for requests in
        // flight, whose callbacks own their buffers.
        unsafe { sys::rbd_close(self.h) };
    }
}

/// librbd's code of a format.
fn format_code(f: Encryption) -> sys::rbd_encryption_format_t {
    match f {
        Encryption::Luks1 => sys::RBD_ENCRYPTION_FORMAT_LUKS1,
        Encryption::Luks2 => sys::RBD_ENCRYPTION_FORMAT_LUKS2,
    }
}

/// LUKS options pointing at `passphrase` (which must outlive their use).
fn luks_options(passphrase: &[u8]) -> sys::rbd_encryption_luks_format_options_t {
    sys::rbd_encryption_luks_format_options_t {
        alg: sys::RBD_ENCRYPTION_ALGORITHM_AES256,
        passphrase: passphrase.as_ptr().cast(),
        passphrase_size: passphrase.len(),
    }
}

/// `strerror` of an errno, for messages.
pub fn describe(e: &io::Error) -> String {
    blockd_core::error::strerror(e)
}
