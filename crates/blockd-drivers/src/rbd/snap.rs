//! Internal snapshots of an `rbd` node are Ceph RBD snapshots of its image
//! (QEMU's `qemu_rbd_snap_create`, `qemu_rbd_snap_remove` and
//! `qemu_rbd_snap_list` in block/rbd.c).
//!
//! RBD snapshots have a name and no other id the user controls, so the
//! name is the id: the list shows `id` = `name`, and a deletion names the
//! snapshot, with an id only if it equals the name. Ceph keeps no
//! creation time or VM clock, so those are 0; QEMU reports the image size
//! at the snapshot as `vm-state-size`, and blockd does the same.
//!
//! The list is read live from librbd each time ([`list`]), as QEMU does:
//! a snapshot taken or removed from outside (`rbd snap create`) shows up
//! at once. That read is synchronous but cheap: librbd answers from the
//! open image's in-memory header and only re-reads it (one round trip)
//! after the cluster told it that the header changed.
//!
//! Rolling back (`qemu_rbd_snap_rollback`, QEMU's `bdrv_snapshot_goto`)
//! is left out: the driver trait has no hook for it.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_int;
use std::ptr;
use std::sync::Arc;

use blockd_core::snapshot::SnapshotInfo;

use super::image::{check, cstr, Image};
use super::sys;

/// `sizeof(QEMUSnapshotInfo.id_str)`: a name must be shorter than this
/// (QEMU stores it as the id too).
const ID_STR_SIZE: usize = 128;
/// `sizeof(QEMUSnapshotInfo.name)`.
const NAME_SIZE: usize = 256;
/// How many entries the first `rbd_snap_list` call offers room for
/// (QEMU's `RBD_MAX_SNAPS` is 100); librbd says how many it needs.
const FIRST_GUESS: c_int = 16;

/// One RBD snapshot as `rbd_snap_list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// Its name.
    pub name: String,
    /// The image size when it was taken.
    pub size: u64,
}

impl Image {
    /// `rbd_snap_create` (blocking).
    pub fn snap_create(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: live image, NUL-terminated name that outlives the call.
        check(unsafe { sys::rbd_snap_create(self.handle(), n.as_ptr()) })
    }

    /// `rbd_snap_remove` (blocking).
    pub fn snap_remove(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: live image, NUL-terminated name that outlives the call.
        check(unsafe { sys::rbd_snap_remove(self.handle(), n.as_ptr()) })
    }

    /// `rbd_snap_list`: the image's user snapshots, oldest first.
    pub fn snap_list(&self) -> io::Result<Vec<Snap>> {
        let mut max = FIRST_GUESS;
        loop {
            let len = usize::try_from(max).unwrap_or(0);
            let mut buf: Vec<sys::rbd_snap_info_t> = (0..len)
                .map(|_| sys::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: live image; `buf` holds `max` entries, which is what
            // librbd may write (it also ends the list with a NULL name, so
            // it asks for one more than it has snapshots).
            let r = unsafe { sys::rbd_snap_list(self.handle(), buf.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(r)?;
            let n = usize::try_from(r).unwrap_or(0).min(len);
            let out = buf[..n]
                .iter()
                .map(|s| Snap {
                    // SAFETY: librbd filled the first `r` entries with
                    // names it allocated (NUL-terminated, non-NULL).
                    name: unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned(),
                    size: s.size,
                })
                .collect();
            // SAFETY: the array `rbd_snap_list` filled, NULL-terminated;
            // this frees the names once, and `out` owns copies.
            unsafe { sys::rbd_snap_list_end(buf.as_mut_ptr()) };
            return Ok(out);
        }
    }
}

/// `s` cut to fewer than `size` bytes, as QEMU's `pstrcpy` into a
/// `size`-byte array cuts it (at a character boundary here).
fn cut(s: &str, size: usize) -> String {
    let mut end = s.len().min(size - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// How QEMU shows an RBD snapshot (`qemu_rbd_snap_list`): the name as the
/// id, the size as the VM state size, no times; `icount` 0, because
/// QEMU's entries start zeroed and only -1 means "none".
pub fn info(s: &Snap) -> SnapshotInfo {
    SnapshotInfo {
        id: cut(&s.name, ID_STR_SIZE),
        name: cut(&s.name, NAME_SIZE),
        vm_state_size: s.size,
        icount: Some(0),
        disk_size: s.size,
        ..SnapshotInfo::default()
    }
}

/// The image's snapshots as the block layer shows them, read live. A
/// failed read is logged and shows as no snapshots (QEMU fails the query
/// instead; [`blockd_core::BlockDriver::snapshots`] has no error).
pub fn list(image: &Image) -> Vec<SnapshotInfo> {
    match image.snap_list() {
        Ok(l) => l.iter().map(info).collect(),
        Err(e) => {
            tracing::warn!(
                "Failed to get a snapshot list: {}",
                blockd_core::error::strerror(&e)
            );
            Vec::new()
        }
    }
}

/// `qemu_rbd_snap_create`'s checks: a name, no id other than the name,
/// and a name short enough to be an id.
fn check_create(sn: &SnapshotInfo) -> io::Result<()> {
    if sn.name.is_empty() || (!sn.id.is_empty() && sn.id != sn.name) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // (QEMU first cuts the name to 255 bytes: still too long.)
    if sn.name.len() >= ID_STR_SIZE {
        return Err(io::Error::from_raw_os_error(libc::ERANGE));
    }
    Ok(())
}

/// Takes snapshot `sn.name` (`qemu_rbd_snap_create`); returns `sn` with
/// the name as its id, which is how the list will show it (QEMU leaves
/// the id empty, so its transaction abort fails to delete the snapshot).
pub async fn create(image: Arc<Image>, sn: SnapshotInfo) -> io::Result<SnapshotInfo> {
    check_create(&sn)?;
    let name = sn.name.clone();
    tokio::task::spawn_blocking(move || image.snap_create(&name))
        .await
        .map_err(io::Error::other)?
        .inspect_err(|e| {
            tracing::error!("failed to create snap: {}", blockd_core::error::strerror(e))
        })?;
    Ok(SnapshotInfo {
        id: sn.name.clone(),
        ..sn
    })
}

/// An error whose message is QEMU's whole message (the QMP layer shows it
/// as it is), with `errno`'s kind.
fn msg(errno: i32, m: impl Into<String>) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), m.into())
}

/// `qemu_rbd_snap_remove`'s checks: the name to remove.
fn check_remove<'a>(id: Option<&str>, name: Option<&'a str>) -> io::Result<&'a str> {
    let Some(name) = name else {
        return Err(msg(libc::EINVAL, "rbd need a valid snapshot name"));
    };
    if id.is_some_and(|i| i != name) {
        return Err(msg(
            libc::EINVAL,
            "rbd do not support snapshot id, it should be NULL or equal to snapshot name",
        ));
    }
    Ok(name)
}

/// Removes the snapshot named `name` (`qemu_rbd_snap_remove`); returns
/// how the list showed it.
pub async fn remove(
    image: Arc<Image>,
    id: Option<&str>,
    name: Option<&str>,
) -> io::Result<SnapshotInfo> {
    let name = check_remove(id, name)?.to_string();
    tokio::task::spawn_blocking(move || {
        let was = image
            .snap_list()
            .ok()
            .and_then(|l| l.into_iter().find(|s| s.name == name))
            .map(|s| info(&s));
        image.snap_remove(&name).map_err(|e| {
            msg(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!(
                    "Failed to remove the snapshot: {}",
                    blockd_core::error::strerror(&e)
                ),
            )
        })?;
        Ok(was.unwrap_or_else(|| {
            info(&Snap {
                name: name.clone(),
                size: 0,
            })
        }))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            ..SnapshotInfo::default()
        }
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn create_needs_a_short_name_that_is_also_the_id() {
        assert_eq!(check_create(&sn("", "a")).ok(), Some(()));
        assert_eq!(check_create(&sn("a", "a")).ok(), Some(()));
        assert_eq!(errno(check_create(&sn("", ""))), Some(libc::EINVAL));
        assert_eq!(errno(check_create(&sn("1", "a"))), Some(libc::EINVAL));
        assert_eq!(check_create(&sn("", &"x".repeat(127))).ok(), Some(()));
        assert_eq!(
            errno(check_create(&sn("", &"x".repeat(128)))),
            Some(libc::ERANGE)
        );
    }

    #[test]
    fn remove_needs_the_name_and_no_other_id() {
        assert_eq!(check_remove(None, Some("a")).ok(), Some("a"));
        assert_eq!(check_remove(Some("a"), Some("a")).ok(), Some("a"));
        let e = check_remove(Some("a"), None).unwrap_err();
        assert_eq!(e.to_string(), "rbd need a valid snapshot name");
        let e = check_remove(Some("1"), Some("a")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rbd do not support snapshot id, it should be NULL or equal to snapshot name"
        );
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_list_shows_the_name_as_id_and_the_size_as_vm_state() {
        let i = info(&Snap {
            name: "s1".into(),
            size: 1 << 20,
        });
        assert_eq!(i.id, "s1");
        assert_eq!(i.name, "s1");
        assert_eq!(i.vm_state_size, 1 << 20);
        assert_eq!((i.date_sec, i.date_nsec, i.vm_clock_nsec), (0, 0, 0));
        assert_eq!(i.icount, Some(0));
        let long = "é".repeat(100);
        let i = info(&Snap {
            name: long.clone(),
            size: 0,
        });
        assert!(i.id.len() < 128 && long.starts_with(&i.id));
        assert_eq!(i.name, long);
    }
}
