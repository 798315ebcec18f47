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
//!
//! Each event has a type here ([`JobStatusChange`], [`BlockJobReady`],
//! ...; [`JobEvent`] gives its name), and the job layer queues only those,
//! so no event name or member is spelled twice. The sink still receives a
//! name and a `data` object (the type's serialisation): that keeps the
//! [`JobEvents`] contract, and lets the server forward them to its event
//! bus unchanged.

use serde::Serialize;
use serde_json::Value;

use crate::status::{JobStatus, JobType};

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

pub use blockd_core::qapi::{BlockErrorAction, BlockdevOnError, IoOperationType, IoStatus};

/// An event of the job layer: its QMP name, and its `data` as the type
/// serialises it (members named as on the wire).
pub trait JobEvent: Serialize {
    /// The event's name on the wire.
    const NAME: &'static str;
}

/// `JOB_STATUS_CHANGE`: a job's status changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobStatusChange {
    /// The job's id.
    pub id: String,
    /// Its new status.
    pub status: JobStatus,
}

/// The progress of a block job, the data of `BLOCK_JOB_READY` and
/// `BLOCK_JOB_CANCELLED` and most of `BLOCK_JOB_COMPLETED`'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobProgress {
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id (QEMU's legacy name for it).
    pub device: String,
    /// Total work.
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// Rate limit, bytes per second (0: none).
    pub speed: i64,
}

/// `BLOCK_JOB_READY`: a block job became ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BlockJobReady(pub BlockJobProgress);

/// `BLOCK_JOB_CANCELLED`: a block job was finalized after a forced cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BlockJobCancelled(pub BlockJobProgress);

/// `BLOCK_JOB_COMPLETED`: a block job was finalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobCompleted {
    /// Where it stood.
    #[serde(flatten)]
    pub progress: BlockJobProgress,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `BLOCK_JOB_PENDING`: a block job without auto-finalize became pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobPending {
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job's id.
    pub id: String,
}

/// `BLOCK_JOB_ERROR`: a block job hit an I/O error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobError {
    /// The job's id.
    pub device: String,
    /// The failed request.
    pub operation: IoOperationType,
    /// What the job does about it.
    pub action: BlockErrorAction,
}

impl JobEvent for JobStatusChange {
    const NAME: &'static str = "JOB_STATUS_CHANGE";
}
impl JobEvent for BlockJobReady {
    const NAME: &'static str = "BLOCK_JOB_READY";
}
impl JobEvent for BlockJobCancelled {
    const NAME: &'static str = "BLOCK_JOB_CANCELLED";
}
impl JobEvent for BlockJobCompleted {
    const NAME: &'static str = "BLOCK_JOB_COMPLETED";
}
impl JobEvent for BlockJobPending {
    const NAME: &'static str = "BLOCK_JOB_PENDING";
}
impl JobEvent for BlockJobError {
    const NAME: &'static str = "BLOCK_JOB_ERROR";
}

/// `JOB_STATUS_CHANGE`'s name, for sinks that match on names.
pub const JOB_STATUS_CHANGE: &str = JobStatusChange::NAME;
/// `BLOCK_JOB_COMPLETED`'s name.
pub const BLOCK_JOB_COMPLETED: &str = BlockJobCompleted::NAME;
/// `BLOCK_JOB_CANCELLED`'s name.
pub const BLOCK_JOB_CANCELLED: &str = BlockJobCancelled::NAME;
/// `BLOCK_JOB_READY`'s name.
pub const BLOCK_JOB_READY: &str = BlockJobReady::NAME;
/// `BLOCK_JOB_PENDING`'s name.
pub const BLOCK_JOB_PENDING: &str = BlockJobPending::NAME;
/// `BLOCK_JOB_ERROR`'s name.
pub const BLOCK_JOB_ERROR: &str = BlockJobError::NAME;

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
