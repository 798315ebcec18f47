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

use serde_json::Value;

/// Receives the events of a [`crate::JobManager`], in order.
///
/// Events are emitted one at a time, in the order of the changes that
/// caused them, by whichever thread made the change (the caller of a
/// command, or a job's task), with none of the manager's locks held except
/// the one that serialises emission. So `emit`:
///
/// * must not block, and should be quick: other threads that changed a
///   status wait for it before returning;
/// * may call the manager's synchronous methods (queries, `pause`,
///   `dismiss`, ...); events those produce are emitted right after `emit`
///   returns, by the same loop, so they stay in order;
/// * may be called while the control-plane lock is held (by a job
///   finalizing, or by a command), so it must never wait for that lock;
///   to run a command that needs it, spawn a task.
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

pub use blockd_core::qapi::{BlockErrorAction, BlockdevOnError, IoOperationType, IoStatus};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closures_are_sinks() {
        let seen = std::sync::Mutex::new(Vec::new());
        let sink = |name: &str, _data: Value| seen.lock().unwrap().push(name.to_owned());
        sink.emit("X", Value::Null);
        NoEvents.emit("Y", Value::Null);
        assert_eq!(*seen.lock().unwrap(), ["X"]);
    }
}
