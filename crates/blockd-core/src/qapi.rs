//! QAPI types that more than one crate speaks: the error policies of
//! devices and jobs, the action an error policy takes, I/O status, the
//! direction of a failed request, and QEMU's identifier rule.
//!
//! They live here, in the lowest crate that devices (`backend`), jobs and
//! the QMP handlers share, so each is defined once.

use serde::{Deserialize, Serialize};

/// What to do when a request fails (QAPI `BlockdevOnError`): `rerror` and
/// `werror` of devices, `on-error`, `on-source-error` and
/// `on-target-error` of jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// Report the error (to the device's user, or fail the job).
    #[default]
    Report,
    /// Pretend the request succeeded.
    Ignore,
    /// Stop on `ENOSPC`, report anything else.
    Enospc,
    /// Stop on every error (the server for a device, the job for a job).
    Stop,
    /// Jobs only: as `enospc`.
    Auto,
}

impl BlockdevOnError {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BlockdevOnError::Report => "report",
            BlockdevOnError::Ignore => "ignore",
            BlockdevOnError::Enospc => "enospc",
            BlockdevOnError::Stop => "stop",
            BlockdevOnError::Auto => "auto",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<BlockdevOnError> {
        Some(match s {
            "report" => BlockdevOnError::Report,
            "ignore" => BlockdevOnError::Ignore,
            "enospc" => BlockdevOnError::Enospc,
            "stop" => BlockdevOnError::Stop,
            "auto" => BlockdevOnError::Auto,
            _ => return None,
        })
    }
}

/// What an error policy decided for one failure (QAPI `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockErrorAction {
    /// The request completed as if it had succeeded.
    Ignore,
    /// The error went to the user (the device's user, or the job fails).
    Report,
    /// The server (device) or the job stopped; the request is retried on
    /// resume.
    Stop,
}

impl BlockErrorAction {
    /// QEMU's choice (`blk_get_error_action`, `block_job_error_action`):
    /// `enospc` and `auto` stop on `ENOSPC` and report anything else.
    pub const fn for_error(on_error: BlockdevOnError, is_enospc: bool) -> Self {
        match on_error {
            BlockdevOnError::Enospc | BlockdevOnError::Auto => {
                if is_enospc {
                    BlockErrorAction::Stop
                } else {
                    BlockErrorAction::Report
                }
            }
            BlockdevOnError::Stop => BlockErrorAction::Stop,
            BlockdevOnError::Report => BlockErrorAction::Report,
            BlockdevOnError::Ignore => BlockErrorAction::Ignore,
        }
    }

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BlockErrorAction::Ignore => "ignore",
            BlockErrorAction::Report => "report",
            BlockErrorAction::Stop => "stop",
        }
    }
}

/// The direction of a failed request (QAPI `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoOperationType {
    /// A read.
    Read,
    /// A write (or write-like request: zeroes, discard, flush).
    Write,
}

impl IoOperationType {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoOperationType::Read => "read",
            IoOperationType::Write => "write",
        }
    }
}

/// I/O status of a device or a block job (QAPI `BlockDeviceIoStatus`,
/// `io-status` in `query-block` and `query-block-jobs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoStatus {
    /// No error since the last reset.
    #[default]
    Ok,
    /// Stopped on an error other than `ENOSPC`.
    Failed,
    /// Stopped on `ENOSPC`.
    Nospace,
}

impl IoStatus {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }

    /// The status after a stopping error with errno `e` (the first error
    /// since the last reset sticks).
    pub const fn after_error(self, e: i32) -> IoStatus {
        match self {
            IoStatus::Ok if e == libc::ENOSPC => IoStatus::Nospace,
            IoStatus::Ok => IoStatus::Failed,
            s => s,
        }
    }
}

/// QEMU's `id_wellformed`: an ASCII letter followed by ASCII letters,
/// digits, `-`, `.` and `_`. The one rule for device, drive, export, job
/// and object ids; node-names add a length limit
/// ([`crate::graph::check_node_name`]).
pub fn id_wellformed(id: &str) -> bool {
    let mut bytes = id.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_actions() {
        use BlockErrorAction as A;
        use BlockdevOnError as E;
        assert_eq!(A::for_error(E::Report, true), A::Report);
        assert_eq!(A::for_error(E::Ignore, true), A::Ignore);
        assert_eq!(A::for_error(E::Stop, false), A::Stop);
        assert_eq!(A::for_error(E::Enospc, true), A::Stop);
        assert_eq!(A::for_error(E::Enospc, false), A::Report);
        assert_eq!(A::for_error(E::Auto, true), A::Stop);
        assert_eq!(A::for_error(E::Auto, false), A::Report);
    }

    #[test]
    fn wire_names() {
        for e in [
            BlockdevOnError::Report,
            BlockdevOnError::Ignore,
            BlockdevOnError::Enospc,
            BlockdevOnError::Stop,
            BlockdevOnError::Auto,
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
            assert_eq!(BlockdevOnError::parse(e.as_str()), Some(e));
        }
        assert_eq!(BlockdevOnError::parse("nope"), None);
        assert_eq!(serde_json::to_value(IoStatus::Nospace).unwrap(), "nospace");
        assert_eq!(IoStatus::Nospace.as_str(), "nospace");
        assert_eq!(IoStatus::Ok.after_error(libc::ENOSPC), IoStatus::Nospace);
        assert_eq!(IoStatus::Ok.after_error(libc::EIO), IoStatus::Failed);
        assert_eq!(IoStatus::Failed.after_error(libc::ENOSPC), IoStatus::Failed);
    }

    #[test]
    fn ids() {
        assert!(id_wellformed("a"));
        assert!(id_wellformed("a-b.c_9"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("9a"));
        assert!(!id_wellformed("a b"));
        assert!(!id_wellformed("#block1"));
        assert!(!id_wellformed("é"));
    }
}
