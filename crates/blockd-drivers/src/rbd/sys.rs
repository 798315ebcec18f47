//! The few librados and librbd functions the `rbd` driver calls, declared
//! by hand from Debian's `librbd-dev` headers (`rados/librados.h`,
//! `rbd/librbd.h`; librbd 1.16, Ceph 16). No binding crate: the only ones
//! published are unmaintained (2016) or run bindgen at build time.
//!
//! Everything here is raw FFI; [`super::image`] is the safe wrapper.

#![allow(non_camel_case_types, missing_docs)]

use std::os::raw::{c_char, c_int, c_void};

/// `rados_t`: a cluster handle.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context on one pool.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_completion_t`: an asynchronous request's completion.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: called by a librbd thread when a request completes.
pub type rbd_callback_t = extern "C" fn(cb: rbd_completion_t, arg: *mut c_void);
/// The callback of `rbd_diff_iterate2`: offset, length, whether it exists.
pub type rbd_diff_cb =
    extern "C" fn(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// `RBD_MAX_BLOCK_NAME_SIZE`.
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
/// `RBD_MAX_IMAGE_NAME_SIZE`.
pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;
/// `RBD_FEATURE_STRIPINGV2`.
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
/// `RBD_FEATURE_FAST_DIFF`.
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID`.
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// `rbd_encryption_format_t` (a C enum: an `int`). librbd 1.16 has LUKS1
/// and LUKS2 only; `RBD_ENCRYPTION_FORMAT_LUKS` (either) came with 1.17.
pub type rbd_encryption_format_t = c_int;
/// `RBD_ENCRYPTION_FORMAT_LUKS1`.
pub const RBD_ENCRYPTION_FORMAT_LUKS1: rbd_encryption_format_t = 0;
/// `RBD_ENCRYPTION_FORMAT_LUKS2`.
pub const RBD_ENCRYPTION_FORMAT_LUKS2: rbd_encryption_format_t = 1;
/// `rbd_encryption_algorithm_t` (a C enum: an `int`).
pub type rbd_encryption_algorithm_t = c_int;
/// `RBD_ENCRYPTION_ALGORITHM_AES128`.
pub const RBD_ENCRYPTION_ALGORITHM_AES128: rbd_encryption_algorithm_t = 0;
/// `RBD_ENCRYPTION_ALGORITHM_AES256`.
pub const RBD_ENCRYPTION_ALGORITHM_AES256: rbd_encryption_algorithm_t = 1;

/// `rbd_encryption_luks1_format_options_t` and
/// `rbd_encryption_luks2_format_options_t`, which librbd.h declares with
/// the same members: the algorithm (used by format only) and the
/// passphrase (bytes, not NUL-terminated: `passphrase_size` counts them).
#[repr(C)]
pub struct rbd_encryption_luks_format_options_t {
    pub alg: rbd_encryption_algorithm_t,
    pub passphrase: *const c_char,
    pub passphrase_size: usize,
}

/// `rbd_image_info_t`.
#[repr(C)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

/// `rbd_snap_info_t`: one entry of `rbd_snap_list`. librbd allocates
/// `name`; `rbd_snap_list_end` frees it.
#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        io: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_create(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        order: *mut c_int,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_namespace_exists(io: rados_ioctx_t, name: *const c_char, exists: *mut bool)
        -> c_int;
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_get_flags(image: rbd_image_t, flags: *mut u64) -> c_int;
    pub fn rbd_get_parent_info(
        image: rbd_image_t,
        pool: *mut c_char,
        pool_len: usize,
        name: *mut c_char,
        name_len: usize,
        snap: *mut c_char,
        snap_len: usize,
    ) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_encryption_format(
        image: rbd_image_t,
        format: rbd_encryption_format_t,
        opts: *mut c_void,
        opts_size: usize,
    ) -> c_int;
    pub fn rbd_encryption_load(
        image: rbd_image_t,
        format: rbd_encryption_format_t,
        opts: *mut c_void,
        opts_size: usize,
    ) -> c_int;
    pub fn rbd_read(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    pub fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The struct's layout as the C compiler lays it out (checked with
    /// `offsetof` against librbd.h 1.16: 8+8+8+4+24, 4 bytes of padding,
    /// then the 8-aligned pool id and the 96-byte name).
    #[test]
    fn image_info_layout() {
        assert_eq!(std::mem::size_of::<rbd_image_info_t>(), 160);
        assert_eq!(std::mem::offset_of!(rbd_image_info_t, parent_pool), 56);
    }

    /// `rbd_snap_info_t`: two 64-bit integers and a pointer.
    #[test]
    fn snap_info_layout() {
        assert_eq!(std::mem::size_of::<rbd_snap_info_t>(), 24);
        assert_eq!(std::mem::offset_of!(rbd_snap_info_t, name), 16);
    }

    /// The LUKS options as gcc lays them out on x86-64 (a 4-byte enum,
    /// 4 bytes of padding, the pointer, the size).
    #[test]
    fn luks_options_layout() {
        assert_eq!(
            std::mem::size_of::<rbd_encryption_luks_format_options_t>(),
            24
        );
        assert_eq!(
            std::mem::offset_of!(rbd_encryption_luks_format_options_t, passphrase),
            8
        );
    }
}
