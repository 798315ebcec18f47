//! Image locking compatible with QEMU (`file-posix.c`).
//!
//! QEMU mirrors a node's cumulative permissions into byte-range locks on
//! the image file, so that two processes (two QEMUs, or QEMU and blockd)
//! apply the same permission rules to each other:
//!
//! * byte `100 + bit` is locked while the node *holds* permission `bit`;
//! * byte `200 + bit` is locked while the node does *not share* it,
//!
//! for the bits of [`Perm`] (0 consistent read, 1 write, 2 write unchanged,
//! 3 resize; QEMU's `BLK_PERM_*`, `RAW_LOCK_PERM_BASE` = 100,
//! `RAW_LOCK_SHARED_BASE` = 200). All locks are shared (`F_RDLCK`) and
//! taken with open file description locks (`F_OFD_SETLK`), so they belong
//! to the descriptor rather than the process and never conflict with each
//! other. A conflict is found by asking whether an exclusive lock could be
//! taken (`F_OFD_GETLK` with `F_WRLCK`), which is refused exactly when
//! another descriptor holds the byte:
//!
//! * for each permission we hold, nobody else may hold its "unshared" byte
//!   (`Failed to get "write" lock`);
//! * for each permission we do not share, nobody else may hold its
//!   permission byte (`Failed to get shared "write" lock`).
//!
//! An update first locks the union of the old and new bytes, then checks,
//! then releases what the new permissions do not need; on failure the old
//! set is restored (QEMU's prepare/commit/abort). Like QEMU, the locks live
//! on the image descriptor itself, and are taken only when permissions are
//! applied, not at open.

use std::io;
use std::os::fd::RawFd;

use blockd_core::error::strerror;
use blockd_core::{BlockError, ErrorKind, Perm};

/// First byte of the permission locks (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: i64 = 100;
/// First byte of the "not shared" locks (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: i64 = 200;

/// Number of permission bits (QEMU 10's `BLK_PERM_ALL` is 0x0f).
const NBITS: u8 = 4;

/// Permission names as QEMU's `bdrv_perm_names` spells them in lock errors.
const QEMU_PERM_NAMES: [&str; NBITS as usize] =
    ["consistent read", "write", "write unchanged", "resize"];

/// Which `fcntl` lock commands to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockCmds {
    /// Open file description locks (Linux ≥ 3.15): the right semantics.
    Ofd,
    /// Classic POSIX locks, used only when `locking=on` is forced on a
    /// system without OFD locks (locks are per process and are lost when
    /// any descriptor of the file is closed; QEMU warns likewise).
    Posix,
}

impl LockCmds {
    fn setlk(self) -> libc::c_int {
        match self {
            LockCmds::Ofd => libc::F_OFD_SETLK,
            LockCmds::Posix => libc::F_SETLK,
        }
    }

    fn getlk(self) -> libc::c_int {
        match self {
            LockCmds::Ofd => libc::F_OFD_GETLK,
            LockCmds::Posix => libc::F_GETLK,
        }
    }
}

fn flock(kind: i32, start: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct for which all-zeroes is valid
    // (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = start as _;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: the lock commands read and (GETLK) write one `flock`.
        if unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Takes a shared lock on byte `off`.
pub fn lock_byte(fd: RawFd, cmds: LockCmds, off: i64) -> io::Result<()> {
    fcntl_lock(fd, cmds.setlk(), &mut flock(libc::F_RDLCK, off))
}

/// Releases byte `off`.
pub fn unlock_byte(fd: RawFd, cmds: LockCmds, off: i64) -> io::Result<()> {
    fcntl_lock(fd, cmds.setlk(), &mut flock(libc::F_UNLCK, off))
}

/// Whether another descriptor holds a lock on byte `off` (QEMU's
/// `qemu_lock_fd_test(.., exclusive=true)`): EAGAIN if so.
pub fn test_byte(fd: RawFd, cmds: LockCmds, off: i64) -> io::Result<()> {
    let mut fl = flock(libc::F_WRLCK, off);
    fcntl_lock(fd, cmds.getlk(), &mut fl)?;
    if fl.l_type as i32 == libc::F_UNLCK {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }
}

/// Whether the kernel supports OFD locks on `fd` (QEMU's
/// `qemu_has_ofd_lock`): a harmless `F_OFD_GETLK` fails with EINVAL if not.
pub fn has_ofd(fd: RawFd) -> bool {
    let mut fl = flock(libc::F_RDLCK, 0);
    !matches!(
        fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL)
    )
}

/// A lock failure, worded as QEMU's `raw_lock_error_setg_errno`: the errno
/// is left out when it only says that somebody holds the lock.
fn lock_error(e: &io::Error, msg: String) -> BlockError {
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => BlockError::new(ErrorKind::PermissionConflict, msg),
        _ => BlockError {
            kind: ErrorKind::Io,
            msg: format!("{msg}: {}", strerror(e)),
            source: Some(io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(libc::EIO),
            )),
        },
    }
}

fn bits() -> impl Iterator<Item = (u8, Perm)> {
    (0..NBITS).map(|i| (i, Perm(1 << i)))
}

/// The lock state of one image descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockState {
    /// Permissions last applied (what the checks were made for).
    pub perm: Perm,
    /// Shared permissions last applied.
    pub shared: Perm,
    /// Permissions whose byte (100 + bit) is locked now.
    pub locked_perm: Perm,
    /// Permissions whose "unshared" byte (200 + bit) is locked now.
    pub locked_unshared: Perm,
}

impl Default for LockState {
    fn default() -> Self {
        LockState {
            perm: Perm::NONE,
            shared: Perm::ALL,
            locked_perm: Perm::NONE,
            locked_unshared: Perm::NONE,
        }
    }
}

/// Locks the bytes of `perm` and `unshared` that are not locked yet; if
/// `unlock`, also releases locked bytes outside them (QEMU's
/// `raw_apply_lock_bytes`). Stops at the first failure, with the state
/// recording exactly what is locked.
fn apply(
    fd: RawFd,
    cmds: LockCmds,
    st: &mut LockState,
    perm: Perm,
    unshared: Perm,
    unlock: bool,
) -> Result<(), BlockError> {
    for (base, want, locked) in [
        (PERM_BASE, perm, &mut st.locked_perm),
        (SHARED_BASE, unshared, &mut st.locked_unshared),
    ] {
        for (i, bit) in bits() {
            let off = base + i64::from(i);
            if want.contains(bit) && !locked.contains(bit) {
                lock_byte(fd, cmds, off)
                    .map_err(|e| lock_error(&e, format!("Failed to lock byte {off}")))?;
                *locked = *locked | bit;
            } else if unlock && locked.contains(bit) && !want.contains(bit) {
                unlock_byte(fd, cmds, off).map_err(|e| BlockError {
                    kind: ErrorKind::Io,
                    msg: format!("Failed to unlock byte {off}: {}", strerror(&e)),
                    source: Some(e),
                })?;
                *locked = Perm(locked.0 & !bit.0);
            }
        }
    }
    Ok(())
}

/// Checks other descriptors' locks against `perm` and `shared` (QEMU's
/// `raw_check_lock_bytes`).
pub fn check(fd: RawFd, cmds: LockCmds, perm: Perm, shared: Perm) -> Result<(), BlockError> {
    for (i, bit) in bits() {
        if perm.contains(bit) {
            test_byte(fd, cmds, SHARED_BASE + i64::from(i)).map_err(|e| {
                lock_error(
                    &e,
                    format!("Failed to get \"{}\" lock", QEMU_PERM_NAMES[i as usize]),
                )
            })?;
        }
    }
    for (i, bit) in bits() {
        if !shared.contains(bit) {
            test_byte(fd, cmds, PERM_BASE + i64::from(i)).map_err(|e| {
                lock_error(
                    &e,
                    format!(
                        "Failed to get shared \"{}\" lock",
                        QEMU_PERM_NAMES[i as usize]
                    ),
                )
            })?;
        }
    }
    Ok(())
}

/// Applies new permissions to the locks of `fd`: all-or-nothing. On error
/// `st` and the locks are as before.
pub fn update(
    fd: RawFd,
    cmds: LockCmds,
    st: &mut LockState,
    perm: Perm,
    shared: Perm,
) -> Result<(), BlockError> {
    let only_drops = (st.perm | perm) == st.perm && (st.shared & shared) == st.shared;
    if !only_drops {
        // Prepare: keep everything the old and the new permissions need,
        // then make sure nobody else is in the way of the new ones.
        let r = apply(fd, cmds, st, st.perm | perm, !st.shared | !shared, false)
            .and_then(|()| check(fd, cmds, perm, shared));
        if let Err(e) = r {
            // Abort: back to exactly the old bytes. Unlocking cannot
            // reasonably fail; if it does, say so and keep going.
            let (p, s) = (st.perm, !st.shared);
            if let Err(u) = apply(fd, cmds, st, p, s, true) {
                tracing::warn!(error = %u, "restoring image locks");
            }
            return Err(e);
        }
    }
    // Commit: release what the new permissions do not need.
    if let Err(u) = apply(fd, cmds, st, perm, !shared, true) {
        tracing::warn!(error = %u, "releasing image locks");
    }
    st.perm = perm;
    st.shared = shared;
    Ok(())
}

/// Releases every lock byte (close).
pub fn release_all(fd: RawFd, cmds: LockCmds, st: &mut LockState) {
    if let Err(u) = apply(fd, cmds, st, Perm::NONE, Perm::NONE, true) {
        tracing::warn!(error = %u, "releasing image locks");
    }
    *st = LockState::default();
}

/// Moves the locks recorded in `st` from `old` to `new` (a descriptor
/// replacing it): locks every byte on `new` first (shared locks never
/// conflict with our own), then releases them on `old` unless both share
/// one open file description (then they are the same locks). On error
/// nothing changed on `old` and `new` holds nothing.
pub fn transfer(
    old: RawFd,
    new: RawFd,
    cmds: LockCmds,
    st: &LockState,
    same_description: bool,
) -> Result<(), BlockError> {
    if same_description {
        return Ok(());
    }
    let mut fresh = LockState::default();
    if let Err(e) = apply(
        new,
        cmds,
        &mut fresh,
        st.locked_perm,
        st.locked_unshared,
        false,
    ) {
        release_all(new, cmds, &mut fresh);
        return Err(e);
    }
    let mut old_st = *st;
    release_all(old, cmds, &mut old_st);
    Ok(())
}
