//! Errors of the control path (opening, graph changes, permissions).
//!
//! The data path keeps `std::io::Error`, so that the errno survives up to
//! the error policy (`werror=enospc` needs to tell ENOSPC from EIO). Control
//! operations return [`BlockError`]: a small kind callers can match on and
//! the message a QMP client sees, worded as QEMU words it.

use std::io;

/// What kind of failure a [`BlockError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A named node, file or object does not exist.
    NotFound,
    /// An option or argument is invalid.
    InvalidArgument,
    /// Another user (in this process or another) holds a conflicting permission or lock.
    PermissionConflict,
    /// The object is in use and cannot be changed or removed.
    InUse,
    /// The operation is not supported by the driver or the configuration.
    Unsupported,
    /// Image metadata is inconsistent.
    Corrupt,
    /// Out of space.
    NoSpace,
    /// Any other I/O error.
    Io,
}

/// A control-path error: kind plus the client-facing message.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct BlockError {
    /// What kind of error.
    pub kind: ErrorKind,
    /// The message, as a QMP client sees it.
    pub msg: String,
    /// The underlying OS error, if any.
    #[source]
    pub source: Option<io::Error>,
}

impl BlockError {
    /// An error of `kind` with `msg`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        BlockError {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// `InvalidArgument`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }

    /// `Unsupported`.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    /// `InUse`.
    pub fn in_use(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InUse, msg)
    }

    /// `NotFound`.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, msg)
    }

    /// An I/O error with context: `"{context}: {strerror}"`, the kind
    /// derived from the errno.
    pub fn io(context: impl std::fmt::Display, e: io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Some(libc::EINVAL) => ErrorKind::InvalidArgument,
            Some(libc::ENOTSUP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        BlockError {
            kind,
            msg: format!("{context}: {}", strerror(&e)),
            source: Some(e),
        }
    }
}

/// The C library's text for an I/O error ("No such file or directory"),
/// without Rust's " (os error 2)" suffix, as QEMU prints it.
pub fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let s = io::Error::from_raw_os_error(code).to_string();
            match s.rfind(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_like_qemu() {
        let e = BlockError::io(
            "Could not open '/x'",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.msg, "Could not open '/x': No such file or directory");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = BlockError::io("w", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind, ErrorKind::NoSpace);
    }
}
