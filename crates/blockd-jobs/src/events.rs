//! The event sink and the events the job layer emits.
//!
//! | event | when | data |
//! | --- | --- | --- |
//! | [`JOB_STATUS_CHANGE`] | every status change of every job | `id`, `status` |
//! | [`BLOCK_JOB_READY`] | a block job became ready (after its `ready` status change) | `type`, `device`, `len`, `offset`, `speed` |
//! | [`BLOCK_JOB_PENDING`] | a block job without auto-finalize became pending (after its `pending` status change) | `type`, `id` |
//! | [`BLOCK_JOB_COMPLETED`] | a started block job was finalized and not force-cancelled (before `concluded`) | `type`, `device`, `len`, `offset`, `speed`, `error` if it failed |
//! | [`BLOCK_JOB_CANCELLED`] | a started block job was finalized after a forced cancel (before `concluded`) | `type`, `device`, `len`, `offset`, `speed` |
//! | [`BLOCK_JOB_ERROR`] | a block job hit an I/O error ([`crate::JobCtx::error_action`]) | `device`, `operation`, `action` |
//!
//! `BLOCK_JOB_*` events are emitted only for block job types
//! ([`crate::JobType::is_block_job`]), never for `create` and the other
//! non-block jobs, as in QEMU's `blockjob.c`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Receives the events of a [`crate::JobManager`], in order.
///
/// `emit` is called with no internal lock of the manager's state held, so
/// it may query the manager; it is called while the manager's operation
/// lock is held (events of concurrent operations never interleave), so it
/// should not block for long.
pub trait JobEvents: Send + Sync {
    /// Delivers one event: its QMP name and its `data` object.
    fn emit(&self, name: &str, data: Value);
}

impl<F> JobEvents for F
where
    F: Fn(&str, Value) + Send + Sync,
{
    fn emit(&self, name: &str, data: Value) {
        self(name, data)
    }
}

/// An event sink that discards every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl JobEvents for NoEvents {
    fn emit(&self, _name: &str, _data: Value) {}
}

/// `JOB_STATUS_CHANGE {"id", "status"}`.
pub const JOB_STATUS_CHANGE: &str = "JOB_STATUS_CHANGE";
/// `BLOCK_JOB_COMPLETED {"type", "device", "len", "offset", "speed", "error"?}`.
pub const BLOCK_JOB_COMPLETED: &str = "BLOCK_JOB_COMPLETED";
/// `BLOCK_JOB_CANCELLED {"type", "device", "len", "offset", "speed"}`.
pub const BLOCK_JOB_CANCELLED: &str = "BLOCK_JOB_CANCELLED";
/// `BLOCK_JOB_READY {"type", "device", "len", "offset", "speed"}`.
pub const BLOCK_JOB_READY: &str = "BLOCK_JOB_READY";
/// `BLOCK_JOB_PENDING {"type", "id"}`.
pub const BLOCK_JOB_PENDING: &str = "BLOCK_JOB_PENDING";
/// `BLOCK_JOB_ERROR {"device", "operation", "action"}`.
pub const BLOCK_JOB_ERROR: &str = "BLOCK_JOB_ERROR";

/// What a block job does on an I/O error (QAPI `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// Report the error to the job (it fails).
    #[default]
    Report,
    /// Ignore the error.
    Ignore,
    /// Stop (pause) on ENOSPC, report other errors.
    Enospc,
    /// Stop (pause) on every error.
    Stop,
    /// As `enospc` for block jobs.
    Auto,
}

/// The action taken on an I/O error (QAPI `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockErrorAction {
    /// The error is ignored.
    Ignore,
    /// The error is reported to the job.
    Report,
    /// The job is paused (as if by the user).
    Stop,
}

impl BlockErrorAction {
    /// QEMU's choice of action for `on_error` (`block_job_error_action`):
    /// `enospc` and `auto` stop on ENOSPC and report anything else.
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

    /// The QAPI wire name.
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
    /// A write.
    Write,
}

impl IoOperationType {
    /// The QAPI wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoOperationType::Read => "read",
            IoOperationType::Write => "write",
        }
    }
}

/// A block job's I/O status (QAPI `IoStatus`, `io-status` in
/// `query-block-jobs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoStatus {
    /// No error.
    #[default]
    Ok,
    /// Stopped on an error other than ENOSPC.
    Failed,
    /// Stopped on ENOSPC.
    Nospace,
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
        assert_eq!(serde_json::to_value(IoStatus::Nospace).unwrap(), "nospace");
        assert_eq!(serde_json::to_value(E::Enospc).unwrap(), "enospc");
    }

    #[test]
    fn closures_are_sinks() {
        let seen = std::sync::Mutex::new(Vec::new());
        let sink = |name: &str, _data: Value| seen.lock().unwrap().push(name.to_owned());
        sink.emit("X", Value::Null);
        NoEvents.emit("Y", Value::Null);
        assert_eq!(*seen.lock().unwrap(), ["X"]);
    }
}
