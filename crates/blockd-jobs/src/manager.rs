//! The command facade: [`JobManager`], the registry through which the
//! `job-*` and `block-job-*` commands (`job-qmp.c`, the job parts of
//! `blockdev.c`/`blockjob.c`) and the queries reach the lifecycle engine
//! ([`crate::engine`]). It finds the job a command names, checks the verb
//! table and answers with QEMU's error wording.

use std::fmt;
use std::sync::Arc;

use blockd_core::{ControlGuard, ControlLock};
use serde_json::Value;

use crate::driver::{JobDriver, JobOptions};
use crate::engine::{Inner, State};
use crate::error::JobError;
use crate::events::JobEvents;
use crate::handle::JobHandle;
use crate::info::{BlockJobInfo, JobInfo};
use crate::record::{EventQueue, JobKey, JobRecord};
use crate::status::{JobType, JobVerb};

/// How a command names its job, which decides the error for an unknown ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// `job-*` commands: any job; unknown → `Job not found` (GenericError).
    Job,
    /// `block-job-*` commands: block jobs only; unknown →
    /// `Block job 'ID' not found` (DeviceNotActive).
    BlockJob,
}

impl Lookup {
    fn matches(self, job_type: JobType) -> bool {
        match self {
            Lookup::Job => true,
            Lookup::BlockJob => job_type.is_block_job(),
        }
    }

    fn not_found(self, id: &str) -> JobError {
        match self {
            Lookup::Job => JobError::job_not_found(),
            Lookup::BlockJob => JobError::block_job_not_found(id),
        }
    }
}

impl Inner {
    /// Finds the job a command names and runs `f` on it under the state
    /// lock; returns its key with `f`'s result.
    fn with_named<R>(
        &self,
        lookup: Lookup,
        id: &str,
        f: impl FnOnce(&mut JobRecord, &mut EventQueue) -> Result<R, JobError>,
    ) -> Result<(JobKey, R), JobError> {
        let mut state = self.state();
        let State { jobs, events, .. } = &mut *state;
        let rec = jobs
            .iter_mut()
            .find(|r| r.id == id && lookup.matches(r.job_type))
            .ok_or_else(|| lookup.not_found(id))?;
        let key = rec.key;
        f(rec, events).map(|r| (key, r))
    }

    async fn cmd_cancel(
        &self,
        guard: &ControlGuard,
        lookup: Lookup,
        id: &str,
        force: bool,
        refuse_paused: bool,
    ) -> Result<(), JobError> {
        self.check_guard(guard);
        let (key, ()) = self.with_named(lookup, id, |rec, _| {
            if refuse_paused && rec.user_paused && !force {
                return Err(JobError::generic(format!(
                    "The block job for device '{id}' is currently paused"
                )));
            }
            rec.check_verb(JobVerb::Cancel)
        })?;
        self.job_cancel(guard, key, force).await;
        Ok(())
    }

    fn cmd_pause(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.with_named(lookup, id, |rec, _| {
            rec.check_verb(JobVerb::Pause)?;
            if rec.user_paused {
                return Err(JobError::generic("Job is already paused"));
            }
            rec.user_paused = true;
            rec.pause();
            Ok(())
        })
        .map(|_| ())
    }

    fn cmd_resume(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.with_named(lookup, id, |rec, _| {
            if !rec.user_paused || rec.pause_count == 0 {
                return Err(JobError::generic("Can't resume a job that was not paused"));
            }
            rec.check_verb(JobVerb::Resume)?;
            rec.user_resume_hook();
            rec.user_paused = false;
            rec.resume();
            Ok(())
        })
        .map(|_| ())
    }

    fn cmd_complete(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        let (key, (driver, cancelled)) = self.with_named(lookup, id, |rec, _| {
            rec.check_verb(JobVerb::Complete)?;
            Ok((rec.driver.clone(), rec.cancelled))
        })?;
        if cancelled || !driver.can_complete() {
            return Err(JobError::generic(format!(
                "The active block job '{id}' cannot be completed"
            )));
        }
        driver.complete().map_err(JobError::generic)?;
        self.with_job(key, |rec, _| {
            rec.completion_requested = true;
            // A paused job sees the request when it is resumed.
            if !rec.paused {
                rec.kick();
            }
        });
        Ok(())
    }

    async fn cmd_finalize(
        &self,
        guard: &ControlGuard,
        lookup: Lookup,
        id: &str,
    ) -> Result<(), JobError> {
        self.check_guard(guard);
        let (key, ()) = self.with_named(lookup, id, |rec, _| rec.check_verb(JobVerb::Finalize))?;
        self.do_finalize(guard, key).await;
        Ok(())
    }

    fn cmd_dismiss(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        // Checked and dismissed in one critical section, so that two
        // concurrent dismissals cannot both succeed.
        let mut state = self.state();
        let rec = state
            .jobs
            .iter()
            .find(|r| r.id == id && lookup.matches(r.job_type))
            .ok_or_else(|| lookup.not_found(id))?;
        rec.check_verb(JobVerb::Dismiss)?;
        let key = rec.key;
        state.dismiss(key);
        Ok(())
    }

    fn cmd_set_speed(&self, lookup: Lookup, id: &str, speed: i64) -> Result<(), JobError> {
        let (key, (driver, old)) = self.with_named(lookup, id, |rec, _| {
            rec.check_verb(JobVerb::SetSpeed)?;
            if speed < 0 {
                return Err(JobError::generic(
                    "Parameter 'speed' expects a non-negative value",
                ));
            }
            let old = rec.speed;
            rec.speed = speed;
            Ok((rec.driver.clone(), old))
        })?;
        driver.set_speed(speed);
        if speed != 0 && speed <= old {
            return Ok(());
        }
        // Faster (or unlimited): cut a rate-limiting sleep short.
        self.with_job(key, |rec, _| {
            if rec.sleeping {
                rec.kick();
            }
        });
        Ok(())
    }

    fn cmd_change(&self, lookup: Lookup, id: &str, options: &Value) -> Result<(), JobError> {
        let (_, driver) = self.with_named(lookup, id, |rec, _| {
            rec.check_verb(JobVerb::Change)?;
            Ok(rec.driver.clone())
        })?;
        driver.change(options).map_err(JobError::generic)
    }
}

/// The registry of jobs and the engine of their lifecycle.
///
/// Cheap to clone (an `Arc` inside). No method holds a lock across an
/// `.await` or blocks on another task; [`JobHandle::start`] must be called
/// from within a Tokio runtime, as it spawns the job's body.
///
/// # The control-plane lock
///
/// The manager shares the server's [`ControlLock`] (QEMU's BQL): a job is
/// finalized under it. Commands fall in two groups:
///
/// * those that may finalize or abort a job on the spot, and so run the
///   driver's async finalization callbacks: [`finalize`](Self::finalize),
///   [`cancel`](Self::cancel) (a job that never started completes at once;
///   a pending one is aborted at once) and their `block_job_*` twins. They
///   are `async` and take a [`ControlGuard`] as proof that the caller holds
///   the lock, which they do not take again (it is not re-entrant). The
///   caller must hold it for the whole call and poll the future to the
///   end: a future dropped half-way leaves the job between two
///   finalization steps;
/// * all the others (creation, start, pause, resume, complete, dismiss,
///   set-speed, change and the queries) are synchronous and need not hold
///   the lock: they change the job's state only, never the graph. They
///   may be called with or without it.
///
/// Holding the lock stops jobs from finalizing (a body that returns waits
/// for it), so a holder must not wait for a job to complete
/// ([`JobHandle::wait`]); [`cancel_sync_all`](Self::cancel_sync_all) takes
/// the lock only around each cancel for that reason.
///
/// # Two command families
///
/// Commands come in two families that differ only in how they find their
/// job: the `job-*` family (`cancel`, `pause`, ...) finds any job and
/// reports an unknown ID as `Job not found` (GenericError); the
/// `block-job-*` family (`block_job_cancel`, ...) finds only block jobs
/// ([`JobType::is_block_job`]) and reports anything else as
/// `Block job 'ID' not found` (DeviceNotActive).
#[derive(Clone)]
pub struct JobManager {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for JobManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .inner
            .state()
            .jobs
            .iter()
            .map(|r| r.id.clone())
            .collect();
        f.debug_struct("JobManager").field("jobs", &ids).finish()
    }
}

impl JobManager {
    /// A manager without jobs that reports events to `events` and finalizes
    /// jobs under `control`, the server's control-plane lock.
    pub fn new(events: Arc<dyn JobEvents>, control: ControlLock) -> Self {
        JobManager {
            inner: Arc::new(Inner::new(events, control)),
        }
    }

    /// The control-plane lock this manager finalizes jobs under.
    pub fn control_lock(&self) -> &ControlLock {
        &self.inner.control
    }

    /// Creates a job (QEMU's `job_create`): checks the ID (`Invalid job ID
    /// 'ID'`, `Job ID 'ID' already in use`), registers the job and emits
    /// `JOB_STATUS_CHANGE created` before returning. The job does nothing
    /// until [`JobHandle::start`]; dropping the handle unstarted removes the
    /// job again (`null`), as QEMU's `job_early_fail`.
    ///
    /// Settings that QEMU applies between creation and start (a block job's
    /// initial speed, for example) can be applied to the created job with
    /// the usual commands, such as [`JobManager::block_job_set_speed`].
    pub fn create(
        &self,
        id: &str,
        job_type: JobType,
        options: JobOptions,
        driver: Box<dyn JobDriver>,
    ) -> Result<JobHandle, JobError> {
        let (key, shared) = self
            .inner
            .create(id, job_type, options, Arc::from(driver))?;
        Ok(JobHandle::new(self.clone(), key, id, shared))
    }

    /// The checks [`create`](Self::create) makes of a new job's ID, for
    /// callers that must refuse a bad ID before they change anything.
    pub fn check_new_id(&self, id: &str) -> Result<(), JobError> {
        self.inner.check_new_id(id)
    }

    /// `query-jobs`: every job, newest first (QEMU's list order).
    pub fn query(&self) -> Vec<JobInfo> {
        self.inner
            .state()
            .jobs
            .iter()
            .rev()
            .map(JobRecord::info)
            .collect()
    }

    /// `query-block-jobs`: every block job, newest first.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        let entries: Vec<(BlockJobInfo, Arc<dyn JobDriver>)> = self
            .inner
            .state()
            .jobs
            .iter()
            .rev()
            .filter(|r| r.job_type.is_block_job())
            .map(|r| (r.block_info(), r.driver.clone()))
            .collect();
        entries
            .into_iter()
            .map(|(mut info, driver)| {
                info.extra = driver.query_block_job();
                info
            })
            .collect()
    }

    /// The job `id`, or `Job not found` (GenericError).
    pub fn job(&self, id: &str) -> Result<JobInfo, JobError> {
        self.inner
            .state()
            .jobs
            .iter()
            .find(|r| r.id == id)
            .map(JobRecord::info)
            .ok_or_else(|| Lookup::Job.not_found(id))
    }

    /// The block job `id`, or `Block job 'ID' not found` (DeviceNotActive)
    /// if there is none or the job is not a block job.
    pub fn block_job(&self, id: &str) -> Result<BlockJobInfo, JobError> {
        let found = self
            .inner
            .state()
            .jobs
            .iter()
            .find(|r| r.id == id && r.job_type.is_block_job())
            .map(|r| (r.block_info(), r.driver.clone()));
        let (mut info, driver) = found.ok_or_else(|| Lookup::BlockJob.not_found(id))?;
        info.extra = driver.query_block_job();
        Ok(info)
    }

    /// Whether a job (of any type, in any status) has ID `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.inner.state().jobs.iter().any(|r| r.id == id)
    }

    /// `job-cancel` when `force` (QEMU's `job-cancel` always forces), or a
    /// cancel request on any job. Unknown ID: `Job not found`.
    ///
    /// A running job is only told (it completes when its body returns); a
    /// job that was never started, or a pending one that is force-cancelled,
    /// is aborted before this returns (`abort`, `clean`, `concluded`).
    /// `guard` must be a guard of [`Self::control_lock`] (asserted in debug
    /// builds).
    pub async fn cancel(
        &self,
        guard: &ControlGuard,
        id: &str,
        force: bool,
    ) -> Result<(), JobError> {
        self.inner
            .cmd_cancel(guard, Lookup::Job, id, force, false)
            .await
    }

    /// `job-pause`.
    pub fn pause(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_pause(Lookup::Job, id)
    }

    /// `job-resume`.
    pub fn resume(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_resume(Lookup::Job, id)
    }

    /// `job-complete`.
    pub fn complete(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_complete(Lookup::Job, id)
    }

    /// `job-finalize`: finalizes a pending job before returning (`prepare`,
    /// then `commit`, or `abort` if `prepare` fails, then `clean`). A
    /// failing `prepare` does not fail the command, as in QEMU: the job
    /// concludes with the error. `guard` must be a guard of
    /// [`Self::control_lock`] (asserted in debug builds).
    pub async fn finalize(&self, guard: &ControlGuard, id: &str) -> Result<(), JobError> {
        self.inner.cmd_finalize(guard, Lookup::Job, id).await
    }

    /// `job-dismiss`.
    pub fn dismiss(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_dismiss(Lookup::Job, id)
    }

    /// Sets the rate limit of any job (bytes per second, 0 = unlimited);
    /// QMP only has [`block_job_set_speed`](Self::block_job_set_speed).
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), JobError> {
        self.inner.cmd_set_speed(Lookup::Job, id, speed)
    }

    /// `job-change`: type-specific options, see [`JobDriver::change`].
    pub fn change(&self, id: &str, options: &Value) -> Result<(), JobError> {
        self.inner.cmd_change(Lookup::Job, id, options)
    }

    /// `block-job-cancel`: refused for a user-paused job unless `force`
    /// (`The block job for device 'ID' is currently paused`). Without
    /// `force`, a job whose driver supports soft cancel (a ready mirror)
    /// completes instead of being cancelled. Otherwise as
    /// [`cancel`](Self::cancel).
    pub async fn block_job_cancel(
        &self,
        guard: &ControlGuard,
        device: &str,
        force: bool,
    ) -> Result<(), JobError> {
        self.inner
            .cmd_cancel(guard, Lookup::BlockJob, device, force, true)
            .await
    }

    /// `block-job-pause`.
    pub fn block_job_pause(&self, device: &str) -> Result<(), JobError> {
        self.inner.cmd_pause(Lookup::BlockJob, device)
    }

    /// `block-job-resume`.
    pub fn block_job_resume(&self, device: &str) -> Result<(), JobError> {
        self.inner.cmd_resume(Lookup::BlockJob, device)
    }

    /// `block-job-complete`.
    pub fn block_job_complete(&self, device: &str) -> Result<(), JobError> {
        self.inner.cmd_complete(Lookup::BlockJob, device)
    }

    /// `block-job-finalize`, as [`finalize`](Self::finalize).
    pub async fn block_job_finalize(&self, guard: &ControlGuard, id: &str) -> Result<(), JobError> {
        self.inner.cmd_finalize(guard, Lookup::BlockJob, id).await
    }

    /// `block-job-dismiss`.
    pub fn block_job_dismiss(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_dismiss(Lookup::BlockJob, id)
    }

    /// `block-job-set-speed`: negative speeds are refused with
    /// `Parameter 'speed' expects a non-negative value`.
    pub fn block_job_set_speed(&self, device: &str, speed: i64) -> Result<(), JobError> {
        self.inner.cmd_set_speed(Lookup::BlockJob, device, speed)
    }

    /// `block-job-change`.
    pub fn block_job_change(&self, id: &str, options: &Value) -> Result<(), JobError> {
        self.inner.cmd_change(Lookup::BlockJob, id, options)
    }

    /// Force-cancels every job and waits until each has completed, then
    /// dismisses concluded ones, until no job is left (QEMU's
    /// `job_cancel_sync_all`, used at shutdown). Waits for bodies to
    /// return, so it only finishes if they honour cancellation.
    ///
    /// Takes the control-plane lock around each cancel, and never holds it
    /// while waiting: a cancelled job's own task needs it to finalize. The
    /// caller must therefore not hold it either.
    pub async fn cancel_sync_all(&self) {
        loop {
            let newest = self
                .inner
                .state()
                .jobs
                .last()
                .map(|r| (r.key, r.shared.status.subscribe()));
            let Some((key, mut status)) = newest else {
                break;
            };
            {
                let guard = self.inner.control.lock().await;
                self.inner.job_cancel(&guard, key, true).await;
            }
            // Completed: the job's task has run job_exit (under the lock),
            // or the cancel completed it. A concluded job that stays (manual
            // dismiss) is dismissed by the next round's cancel. The sender
            // lives as long as `status`' job record or handle.
            let _ = status.wait_for(|s| s.is_completed()).await;
        }
    }
}
