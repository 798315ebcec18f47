//! Per-job state, the event queue, and [`transition`], through which every
//! status change passes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::driver::{JobDriver, JobOptions};
use crate::error::{JobError, CANCELED_MESSAGE};
use crate::events::{BlockJobCompleted, BlockJobProgress, IoStatus, JobEvent, JobStatusChange};
use crate::info::{BlockJobInfo, JobInfo};
use crate::status::{JobStatus, JobType, JobVerb};

/// Identity of a job inside one manager; unlike the ID it is never reused,
/// so a stale [`crate::JobCtx`] or [`crate::JobHandle`] cannot reach a newer
/// job with the same ID.
pub(crate) type JobKey = u64;

/// Events produced under the state lock, in the order of the changes that
/// caused them; emitted in that order once the state lock is released (see
/// `engine::Inner::flush_events`).
#[derive(Default)]
pub(crate) struct EventQueue(VecDeque<(&'static str, Value)>);

impl EventQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn push<E: JobEvent>(&mut self, event: E) {
        let data = serde_json::to_value(&event)
            .unwrap_or_else(|e| panic!("event {} does not serialise: {e}", E::NAME));
        self.0.push_back((E::NAME, data));
    }

    pub(crate) fn pop(&mut self) -> Option<(&'static str, Value)> {
        self.0.pop_front()
    }
}

/// The parts of a job shared with its body and handle without the lock.
pub(crate) struct JobShared {
    /// Wakes the body (QEMU's `job_enter`); used with `notify_waiters`, so
    /// only a body already waiting is woken.
    pub(crate) kick: Notify,
    /// Cancelled once the job is force-cancelled.
    pub(crate) token: CancellationToken,
    /// Mirrors the status, for waiters.
    pub(crate) status: watch::Sender<JobStatus>,
    /// Set when the job is finalized: `Ok` or its error message.
    pub(crate) outcome: Mutex<Option<Result<(), String>>>,
}

/// One job (QEMU's `Job`).
pub(crate) struct JobRecord {
    pub(crate) key: JobKey,
    pub(crate) id: String,
    pub(crate) job_type: JobType,
    pub(crate) driver: Arc<dyn JobDriver>,
    pub(crate) shared: Arc<JobShared>,
    pub(crate) status: JobStatus,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    /// Pause requests in effect; 1 from creation until start.
    pub(crate) pause_count: u32,
    /// One of the pause requests is the user's (`job-pause`, or an error
    /// with action `stop`).
    pub(crate) user_paused: bool,
    /// The body is parked at a pause point (or not started yet).
    pub(crate) paused: bool,
    /// The body is running (not parked, not sleeping).
    pub(crate) busy: bool,
    /// The body is in [`crate::JobCtx::sleep`] (QEMU: sleep timer pending).
    pub(crate) sleeping: bool,
    /// `start()` was called.
    pub(crate) started: bool,
    /// The body has returned and `job_exit` has run under the control-plane
    /// lock (QEMU's `deferred_to_main_loop`; QEMU sets it when the body
    /// returns, but no one holding the lock can tell the difference, as
    /// `job_exit` needs the lock).
    pub(crate) deferred: bool,
    /// A cancel was requested (QEMU's `job_cancel_requested`).
    pub(crate) cancelled: bool,
    /// The cancel is forced (QEMU's `job_is_cancelled`).
    pub(crate) force_cancel: bool,
    /// Counts cancel requests, which wake a paused body (QEMU enters the
    /// job coroutine on every cancel).
    pub(crate) cancel_wakeups: u64,
    /// Counts kicks; [`crate::JobCtx::park`] consumes them.
    pub(crate) kick_epoch: u64,
    pub(crate) kick_seen: u64,
    /// `job-complete` was accepted.
    pub(crate) completion_requested: bool,
    /// The failure: QEMU's `ret != 0` together with `err`.
    pub(crate) ret: Option<String>,
    pub(crate) progress_current: u64,
    pub(crate) progress_total: u64,
    pub(crate) speed: i64,
    pub(crate) iostatus: IoStatus,
}

/// An attempted status change that [`crate::JOB_STATUS_TRANSITIONS`] forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IllegalTransition {
    pub(crate) from: JobStatus,
    pub(crate) to: JobStatus,
}

impl JobRecord {
    /// A job in status `undefined`, as QEMU's `job_create` builds it before
    /// its first transition: paused once (until started).
    pub(crate) fn new(
        key: JobKey,
        id: &str,
        job_type: JobType,
        options: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Self {
        JobRecord {
            key,
            id: id.to_owned(),
            job_type,
            driver,
            shared: Arc::new(JobShared {
                kick: Notify::new(),
                token: CancellationToken::new(),
                status: watch::channel(JobStatus::Undefined).0,
                outcome: Mutex::new(None),
            }),
            status: JobStatus::Undefined,
            auto_finalize: options.auto_finalize,
            auto_dismiss: options.auto_dismiss,
            pause_count: 1,
            user_paused: false,
            paused: true,
            busy: false,
            sleeping: false,
            started: false,
            deferred: false,
            cancelled: false,
            force_cancel: false,
            cancel_wakeups: 0,
            kick_epoch: 0,
            kick_seen: 0,
            completion_requested: false,
            ret: None,
            progress_current: 0,
            progress_total: 0,
            speed: 0,
            iostatus: IoStatus::Ok,
        }
    }

    /// The verb table check (QEMU's `job_apply_verb`).
    pub(crate) fn check_verb(&self, verb: JobVerb) -> Result<(), JobError> {
        if self.status.accepts(verb) {
            tracing::trace!(job = %self.id, status = %self.status, %verb, "verb allowed");
            Ok(())
        } else {
            tracing::debug!(job = %self.id, status = %self.status, %verb, "verb prohibited");
            Err(JobError::verb_refused(&self.id, self.status, verb))
        }
    }

    /// Wakes the body if it waits for a kick (QEMU's `job_enter`).
    pub(crate) fn kick(&mut self) {
        self.kick_epoch = self.kick_epoch.wrapping_add(1);
        self.shared.kick.notify_waiters();
    }

    /// QEMU's `job_pause`: one more pause request; a running body is kicked
    /// so that it reaches its next pause point soon.
    pub(crate) fn pause(&mut self) {
        self.pause_count += 1;
        if !self.paused {
            self.kick();
        }
    }

    /// QEMU's `job_resume`: one pause request less; the last one wakes the
    /// body unless it is sleeping (it will pass a pause point when it wakes).
    pub(crate) fn resume(&mut self) {
        debug_assert!(self.pause_count > 0, "job '{}': unbalanced resume", self.id);
        self.pause_count = self.pause_count.saturating_sub(1);
        if self.pause_count == 0 && !self.sleeping {
            self.kick();
        }
    }

    /// QEMU's `.user_resume` for block jobs: a user resume clears the I/O
    /// error status.
    pub(crate) fn user_resume_hook(&mut self) {
        if self.job_type.is_block_job() {
            self.iostatus = IoStatus::Ok;
        }
    }

    /// The message `query-jobs` reports in `error`.
    pub(crate) fn error(&self) -> Option<String> {
        self.ret.clone()
    }

    pub(crate) fn info(&self) -> JobInfo {
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: self.status,
            current_progress: self.progress_current,
            total_progress: self.progress_total,
            error: self.error(),
        }
    }

    /// The `query-block-jobs` entry, without the driver's extra members.
    pub(crate) fn block_info(&self) -> BlockJobInfo {
        BlockJobInfo {
            job_type: self.job_type,
            device: self.id.clone(),
            len: self.progress_total,
            offset: self.progress_current,
            busy: self.busy,
            paused: self.pause_count > 0,
            speed: self.speed,
            io_status: self.iostatus,
            ready: self.status.is_ready(),
            status: self.status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: self.error(),
            extra: serde_json::Map::new(),
        }
    }

    /// Data of `BLOCK_JOB_READY` and `BLOCK_JOB_CANCELLED`.
    pub(crate) fn progress_event(&self) -> BlockJobProgress {
        BlockJobProgress {
            job_type: self.job_type,
            device: self.id.clone(),
            len: self.progress_total,
            offset: self.progress_current,
            speed: self.speed,
        }
    }

    /// `BLOCK_JOB_COMPLETED`: the progress, plus `error` on failure.
    pub(crate) fn completed_event(&self) -> BlockJobCompleted {
        BlockJobCompleted {
            progress: self.progress_event(),
            error: self.ret.clone(),
        }
    }

    /// Records the final result for [`crate::JobHandle::wait`].
    pub(crate) fn record_outcome(&self) {
        let outcome = match &self.ret {
            None => Ok(()),
            Some(msg) => Err(msg.clone()),
        };
        *self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
    }
}

/// Changes the status if [`crate::JOB_STATUS_TRANSITIONS`] allows it, queueing
/// `JOB_STATUS_CHANGE` unless the status stays the same. Refuses (and
/// changes nothing) otherwise.
pub(crate) fn try_transition(
    rec: &mut JobRecord,
    to: JobStatus,
    events: &mut EventQueue,
) -> Result<(), IllegalTransition> {
    let from = rec.status;
    if !from.can_transition_to(to) {
        return Err(IllegalTransition { from, to });
    }
    tracing::debug!(job = %rec.id, %from, %to, "job status transition");
    rec.status = to;
    rec.shared.status.send_replace(to);
    if from != to {
        events.push(JobStatusChange {
            id: rec.id.clone(),
            status: to,
        });
    }
    Ok(())
}

/// The one way a job's status changes. An illegal transition is a bug in
/// this crate: it is logged, asserted in debug builds, and otherwise
/// ignored (the status stays). Returns whether the status changed.
pub(crate) fn transition(rec: &mut JobRecord, to: JobStatus, events: &mut EventQueue) -> bool {
    match try_transition(rec, to, events) {
        Ok(()) => true,
        Err(IllegalTransition { from, to }) => {
            tracing::error!(job = %rec.id, %from, %to, "illegal job status transition refused");
            debug_assert!(
                false,
                "job '{}': illegal status transition {from} -> {to}",
                rec.id
            );
            false
        }
    }
}

/// QEMU's `job_update_rc`: a forced cancel without an error of its own
/// becomes `Operation canceled`; any failure moves the job to `aborting`.
pub(crate) fn update_rc(rec: &mut JobRecord, events: &mut EventQueue) {
    if rec.ret.is_none() && rec.force_cancel {
        rec.ret = Some(CANCELED_MESSAGE.to_owned());
    }
    if rec.ret.is_some() {
        transition(rec, JobStatus::Aborting, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::JobCtx;
    use crate::driver::JobFuture;
    use crate::events::JOB_STATUS_CHANGE;
    use serde_json::json;

    struct Nop;
    impl JobDriver for Nop {
        fn run(&self, _ctx: JobCtx) -> JobFuture<'_> {
            Box::pin(async { Ok(()) })
        }
    }

    fn record(status: JobStatus) -> JobRecord {
        let mut rec = JobRecord::new(
            1,
            "j",
            JobType::Stream,
            JobOptions::default(),
            Arc::new(Nop),
        );
        rec.status = status;
        rec
    }

    fn drain(q: &mut EventQueue) -> Vec<(&'static str, Value)> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn every_pair_follows_the_table() {
        for &from in JobStatus::ALL {
            for &to in JobStatus::ALL {
                let mut rec = record(from);
                let mut q = EventQueue::default();
                let r = try_transition(&mut rec, to, &mut q);
                let events = drain(&mut q);
                if from.can_transition_to(to) {
                    assert_eq!(r, Ok(()), "{from} -> {to}");
                    assert_eq!(rec.status, to);
                    assert_eq!(*rec.shared.status.borrow(), to);
                    if from == to {
                        assert!(events.is_empty(), "{from} -> {to} emitted");
                    } else {
                        assert_eq!(
                            events,
                            [(JOB_STATUS_CHANGE, json!({"id": "j", "status": to.as_str()}))]
                        );
                    }
                } else {
                    assert_eq!(r, Err(IllegalTransition { from, to }));
                    assert_eq!(rec.status, from, "{from} -> {to} changed status");
                    assert!(events.is_empty(), "{from} -> {to} emitted");
                }
            }
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "illegal status transition concluded -> running")]
    fn illegal_transition_asserts_in_debug() {
        let mut rec = record(JobStatus::Concluded);
        transition(&mut rec, JobStatus::Running, &mut EventQueue::default());
    }

    #[test]
    fn update_rc_sets_cancel_message() {
        let mut rec = record(JobStatus::Running);
        rec.force_cancel = true;
        rec.cancelled = true;
        let mut q = EventQueue::default();
        update_rc(&mut rec, &mut q);
        assert_eq!(rec.ret.as_deref(), Some("Operation canceled"));
        assert_eq!(rec.status, JobStatus::Aborting);

        // A soft cancel (not forced) does not fail the job.
        let mut rec = record(JobStatus::Running);
        rec.cancelled = true;
        update_rc(&mut rec, &mut q);
        assert_eq!(rec.ret, None);
        assert_eq!(rec.status, JobStatus::Running);
    }

    #[test]
    fn completed_event_carries_error() {
        let mut rec = record(JobStatus::Aborting);
        rec.progress_total = 10;
        rec.progress_current = 4;
        rec.speed = 7;
        let data = |rec: &JobRecord| serde_json::to_value(rec.completed_event()).unwrap();
        assert_eq!(
            data(&rec),
            json!({"type": "stream", "device": "j", "len": 10, "offset": 4, "speed": 7})
        );
        rec.ret = Some("boom".into());
        // The wire order: the progress, then `error`.
        assert_eq!(
            serde_json::to_string(&rec.completed_event()).unwrap(),
            r#"{"type":"stream","device":"j","len":10,"offset":4,"speed":7,"error":"boom"}"#
        );
        assert_eq!(data(&rec)["error"], "boom");
    }
}
