//! What a job's body sees of its job: [`JobCtx`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::Inner;
use crate::events::{
    BlockErrorAction, BlockJobError, BlockJobReady, BlockdevOnError, IoOperationType, IoStatus,
};
use crate::record::{transition, JobKey, JobShared};
use crate::status::{JobStatus, JobType};

/// The body's view of its job, passed to [`crate::JobDriver::run`]
/// (cheap to clone).
///
/// Pause points are where the job can be paused:
/// [`pause_point`](Self::pause_point), and the waits [`sleep`](Self::sleep)
/// and [`park`](Self::park), which pass one when they return. A body should
/// pass one regularly (QEMU's jobs do between chunks of work).
#[derive(Clone)]
pub struct JobCtx {
    inner: Arc<Inner>,
    key: JobKey,
    id: Arc<str>,
    job_type: JobType,
    shared: Arc<JobShared>,
}

impl fmt::Debug for JobCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobCtx")
            .field("id", &self.id)
            .field("type", &self.job_type)
            .finish()
    }
}

/// What [`JobCtx::park`] decided under the lock.
enum Park {
    /// Force-cancelled: return at once, without a pause point.
    Cancelled,
    /// Kicked (or a pause is requested): pass a pause point and return.
    Go,
    /// Wait for a kick.
    Wait,
}

impl JobCtx {
    pub(crate) fn new(
        inner: Arc<Inner>,
        key: JobKey,
        id: Arc<str>,
        job_type: JobType,
        shared: Arc<JobShared>,
    ) -> Self {
        JobCtx {
            inner,
            key,
            id,
            job_type,
            shared,
        }
    }

    /// The job ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.job_type
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        *self.shared.status.borrow()
    }

    // ---- progress -------------------------------------------------------

    /// Sets the estimated total (`total-progress`, a block job's `len`).
    pub fn set_total(&self, total: u64) {
        self.inner
            .with_job(self.key, |rec, _| rec.progress_total = total);
    }

    /// Sets the total to the work done plus `remaining` (QEMU's
    /// `job_progress_set_remaining`).
    pub fn set_remaining(&self, remaining: u64) {
        self.inner.with_job(self.key, |rec, _| {
            rec.progress_total = rec.progress_current.saturating_add(remaining);
        });
    }

    /// Adds `delta` to the estimated total (QEMU's
    /// `job_progress_increase_remaining`).
    pub fn increase_remaining(&self, delta: u64) {
        self.inner.with_job(self.key, |rec, _| {
            rec.progress_total = rec.progress_total.saturating_add(delta);
        });
    }

    /// Adds `done` to the work done (`current-progress`, a block job's
    /// `offset`; QEMU's `job_progress_update`).
    pub fn add_progress(&self, done: u64) {
        self.inner.with_job(self.key, |rec, _| {
            rec.progress_current = rec.progress_current.saturating_add(done);
        });
    }

    /// `(current, total)` progress.
    pub fn progress(&self) -> (u64, u64) {
        self.inner
            .with_job(self.key, |rec, _| {
                (rec.progress_current, rec.progress_total)
            })
            .unwrap_or_default()
    }

    /// The rate limit in bytes per second (0: unlimited).
    pub fn speed(&self) -> i64 {
        self.inner
            .with_job(self.key, |rec, _| rec.speed)
            .unwrap_or_default()
    }

    // ---- cancellation and completion ------------------------------------

    /// Whether the job has been force-cancelled (QEMU's `job_is_cancelled`):
    /// the body should stop as soon as possible. A soft cancel (see
    /// [`cancel_requested`](Self::cancel_requested)) does not count.
    pub fn is_cancelled(&self) -> bool {
        self.inner
            .with_job(self.key, |rec, _| rec.force_cancel)
            .unwrap_or(true)
    }

    /// Whether any cancel was requested, forced or not (QEMU's
    /// `job_cancel_requested`). A ready mirror ends without pivoting when
    /// this is true but [`is_cancelled`](Self::is_cancelled) is not.
    pub fn cancel_requested(&self) -> bool {
        self.inner
            .with_job(self.key, |rec, _| rec.cancelled)
            .unwrap_or(true)
    }

    /// A token cancelled when the job is force-cancelled, for racing
    /// long operations against cancellation.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.shared.token.clone()
    }

    /// Whether a pause is requested (QEMU's `job_should_pause`): the next
    /// pause point parks. A body that keeps requests in flight across
    /// pause points stops starting new ones when this is true, so that it
    /// parks with none in flight.
    pub fn pause_requested(&self) -> bool {
        self.inner
            .with_job(self.key, |rec, _| rec.pause_count > 0)
            .unwrap_or(false)
    }

    /// Whether `job-complete` was accepted for this job.
    pub fn completion_requested(&self) -> bool {
        self.inner
            .with_job(self.key, |rec, _| rec.completion_requested)
            .unwrap_or(false)
    }

    /// Whether the job is ready (or on standby).
    pub fn is_ready(&self) -> bool {
        self.status().is_ready()
    }

    /// Moves the running job to `ready` (QEMU's `job_transition_to_ready`):
    /// `JOB_STATUS_CHANGE ready`, then for block jobs `BLOCK_JOB_READY`.
    /// Does nothing if the job is already ready.
    pub fn ready(&self) {
        self.inner.with_job(self.key, |rec, events| {
            if rec.status.is_ready() {
                return;
            }
            if transition(rec, JobStatus::Ready, events) && rec.job_type.is_block_job() {
                events.push(BlockJobReady(rec.progress_event()));
            }
        });
    }

    /// Reports an I/O error of a block job and applies `on_error` (QEMU's
    /// `block_job_error_action`): emits `BLOCK_JOB_ERROR`; with action
    /// `stop` the job is paused as if by the user (resumed by `job-resume`)
    /// and its I/O status records the error. The caller retries the request
    /// after its next pause point when the action is `stop`, fails on
    /// `report` and carries on on `ignore`.
    pub fn error_action(
        &self,
        on_error: BlockdevOnError,
        operation: IoOperationType,
        is_enospc: bool,
    ) -> BlockErrorAction {
        let action = BlockErrorAction::for_error(on_error, is_enospc);
        self.inner.with_job(self.key, |rec, events| {
            events.push(BlockJobError {
                device: rec.id.clone(),
                operation,
                action,
            });
            if action == BlockErrorAction::Stop {
                if !rec.user_paused {
                    rec.pause();
                    rec.user_paused = true;
                }
                if rec.iostatus == IoStatus::Ok {
                    rec.iostatus = if is_enospc {
                        IoStatus::Nospace
                    } else {
                        IoStatus::Failed
                    };
                }
            }
        });
        action
    }

    // ---- pause points and waits ------------------------------------------

    /// A pause point (QEMU's `job_pause_point`). If a pause is requested and
    /// the job is not force-cancelled, the job goes `paused` (or `standby`
    /// when ready) and this waits until the last pause request is withdrawn
    /// or a cancel arrives, then restores the status. Otherwise returns at
    /// once.
    pub async fn pause_point(&self) {
        let parked = self
            .inner
            .with_job(self.key, |rec, events| {
                if rec.pause_count == 0 || rec.force_cancel {
                    return None;
                }
                let resume_to = rec.status;
                let to = if resume_to == JobStatus::Ready {
                    JobStatus::Standby
                } else {
                    JobStatus::Paused
                };
                transition(rec, to, events);
                rec.paused = true;
                rec.busy = false;
                Some((resume_to, rec.cancel_wakeups))
            })
            .flatten();
        let Some((resume_to, wakeups)) = parked else {
            return;
        };
        loop {
            let notified = self.shared.kick.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake = self
                .inner
                .with_job(self.key, |rec, _| {
                    rec.pause_count == 0 || rec.cancel_wakeups != wakeups
                })
                .unwrap_or(true);
            if wake {
                break;
            }
            notified.await;
        }
        self.inner.with_job(self.key, |rec, events| {
            rec.paused = false;
            rec.busy = true;
            transition(rec, resume_to, events);
        });
    }

    /// Sleeps for `duration`, then passes a pause point (QEMU's
    /// `job_sleep_ns`). Returns at once if the job is force-cancelled; goes
    /// straight to the pause point if a pause is requested. The sleep is cut
    /// short by a pause or cancel request and by a speed increase, so a
    /// rate-limiting body recomputes its delay in a loop.
    pub async fn sleep(&self, duration: Duration) {
        let notified = self.shared.kick.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let sleep_now = self.inner.with_job(self.key, |rec, _| {
            if rec.force_cancel {
                return None;
            }
            if rec.pause_count > 0 {
                return Some(false);
            }
            rec.busy = false;
            rec.sleeping = true;
            Some(true)
        });
        match sleep_now {
            None | Some(None) => return,
            Some(Some(false)) => {}
            Some(Some(true)) => {
                tokio::select! {
                    () = tokio::time::sleep(duration) => {}
                    () = notified.as_mut() => {}
                }
                self.inner.with_job(self.key, |rec, _| {
                    rec.busy = true;
                    rec.sleeping = false;
                });
            }
        }
        self.pause_point().await;
    }

    /// Waits until the job is kicked, then passes a pause point (QEMU's
    /// `job_yield`). Kicks are: a cancel, a pause or resume request, an
    /// accepted `job-complete`, a speed increase. A kick that arrived since
    /// the previous `park` makes it return at once, so a body can check its
    /// conditions and then park without missing a wake-up; it may therefore
    /// return spuriously. Returns at once if the job is force-cancelled.
    pub async fn park(&self) {
        loop {
            let notified = self.shared.kick.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let park = self
                .inner
                .with_job(self.key, |rec, _| {
                    if rec.force_cancel {
                        return Park::Cancelled;
                    }
                    if rec.kick_epoch != rec.kick_seen {
                        rec.kick_seen = rec.kick_epoch;
                        rec.busy = true;
                        return Park::Go;
                    }
                    if rec.pause_count > 0 {
                        rec.busy = true;
                        return Park::Go;
                    }
                    rec.busy = false;
                    Park::Wait
                })
                .unwrap_or(Park::Cancelled);
            match park {
                Park::Cancelled => return,
                Park::Go => break,
                Park::Wait => notified.await,
            }
        }
        self.pause_point().await;
    }
}
