//! The job registry ([`JobManager`]) and the lifecycle engine: QEMU's
//! `job.c` (creation, start, cancel, completion, finalization, dismissal),
//! `job-qmp.c` (the `job-*` commands and `query-jobs`) and the job parts of
//! `blockdev.c`/`blockjob.c` (the `block-job-*` commands and
//! `query-block-jobs`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::ctx::JobCtx;
use crate::driver::{JobDriver, JobOptions};
use crate::error::{JobError, CANCELED_MESSAGE};
use crate::events::{JobEvents, BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_PENDING};
use crate::info::{BlockJobInfo, JobInfo};
use crate::oplock::OpLock;
use crate::record::{transition, update_rc, EventQueue, JobKey, JobRecord, JobShared};
use crate::status::{id_wellformed, JobStatus, JobType, JobVerb};

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

/// What `job_cancel` does after marking the job cancelled.
enum AfterCancel {
    Nothing,
    /// Not started: complete it now (it aborts).
    Complete,
    /// Already completed (waiting/pending) and force-cancelled: abort now.
    Abort,
}

/// The registry: jobs in creation order (queries list them newest first,
/// as QEMU's job list is built by inserting at its head), plus the events
/// produced and not yet emitted.
#[derive(Default)]
pub(crate) struct State {
    jobs: Vec<JobRecord>,
    events: EventQueue,
    next_key: JobKey,
}

impl State {
    fn job_mut(&mut self, key: JobKey) -> Option<(&mut JobRecord, &mut EventQueue)> {
        let State { jobs, events, .. } = self;
        jobs.iter_mut().find(|r| r.key == key).map(|r| (r, events))
    }

    /// QEMU's `job_conclude`: concluded, and dismissed at once with
    /// auto-dismiss or if the job never started.
    fn conclude(&mut self, key: JobKey) {
        let Some((rec, events)) = self.job_mut(key) else {
            return;
        };
        transition(rec, JobStatus::Concluded, events);
        let dismiss = rec.auto_dismiss || !rec.started;
        if dismiss {
            self.dismiss(key);
        }
    }

    /// QEMU's `job_do_dismiss`: status null, and gone from the registry.
    fn dismiss(&mut self, key: JobKey) {
        if let Some((rec, events)) = self.job_mut(key) {
            rec.busy = false;
            rec.paused = false;
            rec.deferred = true;
            transition(rec, JobStatus::Null, events);
        }
        self.jobs.retain(|r| r.key != key);
    }
}

/// Shared core of a [`JobManager`] and its jobs' contexts.
pub(crate) struct Inner {
    sink: Arc<dyn JobEvents>,
    op: OpLock,
    state: Mutex<State>,
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a lifecycle operation under the operation lock; the outermost
    /// operation emits the queued events (in order) before releasing it.
    pub(crate) fn op<R>(&self, f: impl FnOnce() -> R) -> R {
        let guard = self.op.lock();
        let result = f();
        if guard.is_outermost() {
            self.flush_events();
        }
        drop(guard);
        result
    }

    fn flush_events(&self) {
        loop {
            // Bound to a local so the state lock is released before emitting.
            let next = self.state().events.pop();
            let Some((name, data)) = next else {
                break;
            };
            self.sink.emit(name, data);
        }
    }

    /// Runs `f` on job `key` under the state lock; `None` if it is gone.
    pub(crate) fn with_job<R>(
        &self,
        key: JobKey,
        f: impl FnOnce(&mut JobRecord, &mut EventQueue) -> R,
    ) -> Option<R> {
        let mut state = self.state();
        state.job_mut(key).map(|(rec, events)| f(rec, events))
    }

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

    // ---- creation and start -------------------------------------------

    fn create(
        &self,
        id: &str,
        job_type: JobType,
        options: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Result<(JobKey, Arc<JobShared>), JobError> {
        self.op(|| {
            if !id_wellformed(id) {
                return Err(JobError::invalid_id(id));
            }
            let mut state = self.state();
            if state.jobs.iter().any(|r| r.id == id) {
                return Err(JobError::id_in_use(id));
            }
            let key = state.next_key;
            state.next_key += 1;
            let rec = JobRecord::new(key, id, job_type, options, driver);
            let shared = rec.shared.clone();
            state.jobs.push(rec);
            if let Some((rec, events)) = state.job_mut(key) {
                transition(rec, JobStatus::Created, events);
            }
            Ok((key, shared))
        })
    }

    /// QEMU's `job_start`: running now, body on a new task.
    fn start(self: &Arc<Self>, key: JobKey) {
        // Checked before the job changes status, so that misuse cannot leave
        // a running job without a body.
        let runtime = tokio::runtime::Handle::try_current()
            .expect("JobHandle::start must be called within a Tokio runtime");
        let launch = self.op(|| {
            self.with_job(key, |rec, events| {
                if rec.started || rec.status != JobStatus::Created {
                    debug_assert!(!rec.started, "job '{}' started twice", rec.id);
                    return None;
                }
                rec.started = true;
                rec.pause_count = rec.pause_count.saturating_sub(1);
                rec.busy = true;
                rec.paused = false;
                transition(rec, JobStatus::Running, events);
                let ctx = JobCtx::new(
                    self.clone(),
                    key,
                    rec.id.as_str().into(),
                    rec.job_type,
                    rec.shared.clone(),
                );
                Some((rec.driver.clone(), ctx))
            })
            .flatten()
        });
        let Some((driver, ctx)) = launch else {
            return;
        };
        let inner = self.clone();
        let body_runtime = runtime.clone();
        runtime.spawn(async move {
            // The body runs on a task of its own so that a panic in it fails
            // the job instead of leaving it running forever.
            let body = body_runtime.spawn(async move {
                // All jobs pass a pause point before their body proper, so a
                // job paused before start parks here.
                ctx.pause_point().await;
                driver.run(ctx).await
            });
            let result = match body.await {
                Ok(result) => result,
                Err(e) if e.is_panic() => {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    tracing::error!(job = key, panic = %msg, "job body panicked");
                    Err(format!("Job body panicked: {msg}"))
                }
                Err(_) => Err(CANCELED_MESSAGE.to_owned()),
            };
            inner.job_exit(key, result);
        });
    }

    /// QEMU's `job_early_fail`: a job that will never start goes from
    /// created straight to null.
    fn early_fail(&self, key: JobKey) {
        self.op(|| {
            let mut state = self.state();
            let unstarted = state
                .job_mut(key)
                .is_some_and(|(rec, _)| !rec.started && rec.status == JobStatus::Created);
            if unstarted {
                state.dismiss(key);
            }
        });
    }

    // ---- completion and finalization ----------------------------------

    /// QEMU's `job_exit`: the body returned.
    pub(crate) fn job_exit(&self, key: JobKey, result: Result<(), String>) {
        self.op(|| {
            let known = self.with_job(key, |rec, _| {
                rec.deferred = true;
                rec.busy = false;
                rec.sleeping = false;
                if let Err(msg) = result {
                    rec.ret = Some(msg);
                }
            });
            if known.is_some() {
                self.job_completed(key);
            }
        });
    }

    /// QEMU's `job_completed`.
    fn job_completed(&self, key: JobKey) {
        let failed = self.with_job(key, |rec, events| {
            debug_assert!(
                !rec.status.is_completed(),
                "job '{}' completed twice",
                rec.id
            );
            update_rc(rec, events);
            rec.ret.is_some()
        });
        match failed {
            Some(true) => self.txn_abort(key),
            Some(false) => self.txn_success(key),
            None => {}
        }
    }

    /// The jobs finalized together with `key`.
    ///
    /// Extension point for job transactions (QEMU's `JobTxn`): every job is
    /// currently a transaction of its own, as QEMU models jobs created
    /// without one. A real transaction returns all its members here; then
    /// [`Self::txn_abort`] must also force-cancel the other members and
    /// wait for their bodies (QEMU's `job_finish_sync`) before finalizing
    /// them, and `job-finalize` of one member finalizes all.
    fn txn_members(&self, key: JobKey) -> Vec<JobKey> {
        vec![key]
    }

    /// QEMU's `job_completed_txn_abort`.
    fn txn_abort(&self, key: JobKey) {
        for member in self.txn_members(key) {
            self.finalize_single(member);
        }
    }

    /// QEMU's `job_completed_txn_success`: waiting, then (once every member
    /// has completed) pending, then finalization unless one member needs
    /// `job-finalize`.
    fn txn_success(&self, key: JobKey) {
        self.with_job(key, |rec, events| {
            transition(rec, JobStatus::Waiting, events);
        });
        let members = self.txn_members(key);
        let all_completed = {
            let state = self.state();
            members.iter().all(|m| {
                state
                    .jobs
                    .iter()
                    .find(|r| r.key == *m)
                    .is_none_or(|r| r.status.is_completed())
            })
        };
        if !all_completed {
            return;
        }
        let mut needs_finalize = false;
        for member in &members {
            self.with_job(*member, |rec, events| {
                transition(rec, JobStatus::Pending, events);
                if !rec.auto_finalize {
                    needs_finalize = true;
                    if rec.job_type.is_block_job() {
                        events.push(
                            BLOCK_JOB_PENDING,
                            json!({"type": rec.job_type.as_str(), "id": rec.id}),
                        );
                    }
                }
            });
        }
        if !needs_finalize {
            self.do_finalize(key);
        }
    }

    /// QEMU's `job_do_finalize`: prepare every member; if one fails, abort
    /// the transaction, else finalize every member.
    fn do_finalize(&self, key: JobKey) {
        let members = self.txn_members(key);
        let failed = members.iter().any(|m| self.prepare(*m));
        if failed {
            self.txn_abort(key);
        } else {
            for member in members {
                self.finalize_single(member);
            }
        }
    }

    /// QEMU's `job_prepare`; returns whether the job has failed.
    fn prepare(&self, key: JobKey) -> bool {
        let Some((driver, ok)) =
            self.with_job(key, |rec, _| (rec.driver.clone(), rec.ret.is_none()))
        else {
            return false;
        };
        if ok {
            let result = driver.prepare();
            self.with_job(key, |rec, events| {
                if let Err(msg) = result {
                    rec.ret = Some(msg);
                }
                update_rc(rec, events);
            });
        }
        self.with_job(key, |rec, _| rec.ret.is_some())
            .unwrap_or(false)
    }

    /// QEMU's `job_finalize_single`: commit or abort, clean, the legacy
    /// completion event, then concluded (and null with auto-dismiss).
    fn finalize_single(&self, key: JobKey) {
        let Some((driver, failed)) = self.with_job(key, |rec, events| {
            debug_assert!(rec.status.is_completed(), "job '{}' not completed", rec.id);
            update_rc(rec, events);
            (rec.driver.clone(), rec.ret.is_some())
        }) else {
            return;
        };
        if failed {
            driver.abort();
        } else {
            driver.commit();
        }
        driver.clean();
        let mut state = self.state();
        if let Some((rec, events)) = state.job_mut(key) {
            // Legacy events only for started block jobs.
            if rec.started && rec.job_type.is_block_job() {
                if rec.force_cancel {
                    events.push(BLOCK_JOB_CANCELLED, rec.progress_event());
                } else {
                    events.push(BLOCK_JOB_COMPLETED, rec.completed_event());
                }
            }
            rec.record_outcome();
        }
        state.conclude(key);
    }

    // ---- commands -------------------------------------------------------

    /// QEMU's `job_cancel` (no verb check).
    fn job_cancel(&self, key: JobKey, force: bool) {
        let Some((status, driver)) = self.with_job(key, |rec, _| (rec.status, rec.driver.clone()))
        else {
            return;
        };
        if status == JobStatus::Concluded {
            self.state().dismiss(key);
            return;
        }
        // QEMU's job_cancel_async.
        let force = driver.cancel(force, status);
        let next = self.with_job(key, |rec, _| {
            if rec.user_paused {
                rec.user_resume_hook();
                rec.user_paused = false;
                debug_assert!(rec.pause_count > 0);
                rec.pause_count = rec.pause_count.saturating_sub(1);
            }
            // A soft cancel of a job whose body has returned is ignored.
            if force || !rec.deferred {
                rec.cancelled = true;
                rec.force_cancel |= force;
                if rec.force_cancel {
                    rec.shared.token.cancel();
                }
            }
            if !rec.started {
                AfterCancel::Complete
            } else if rec.deferred {
                if rec.force_cancel {
                    AfterCancel::Abort
                } else {
                    AfterCancel::Nothing
                }
            } else {
                rec.cancel_wakeups += 1;
                rec.kick();
                AfterCancel::Nothing
            }
        });
        match next {
            Some(AfterCancel::Complete) => self.job_completed(key),
            Some(AfterCancel::Abort) => self.txn_abort(key),
            Some(AfterCancel::Nothing) | None => {}
        }
    }

    fn cmd_cancel(
        &self,
        lookup: Lookup,
        id: &str,
        force: bool,
        refuse_paused: bool,
    ) -> Result<(), JobError> {
        self.op(|| {
            let (key, ()) = self.with_named(lookup, id, |rec, _| {
                if refuse_paused && rec.user_paused && !force {
                    return Err(JobError::generic(format!(
                        "The block job for device '{id}' is currently paused"
                    )));
                }
                rec.check_verb(JobVerb::Cancel)
            })?;
            self.job_cancel(key, force);
            Ok(())
        })
    }

    fn cmd_pause(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.op(|| {
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
        })
    }

    fn cmd_resume(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.op(|| {
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
        })
    }

    fn cmd_complete(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.op(|| {
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
        })
    }

    fn cmd_finalize(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.op(|| {
            let (key, ()) =
                self.with_named(lookup, id, |rec, _| rec.check_verb(JobVerb::Finalize))?;
            self.do_finalize(key);
            Ok(())
        })
    }

    fn cmd_dismiss(&self, lookup: Lookup, id: &str) -> Result<(), JobError> {
        self.op(|| {
            let (key, ()) =
                self.with_named(lookup, id, |rec, _| rec.check_verb(JobVerb::Dismiss))?;
            self.state().dismiss(key);
            Ok(())
        })
    }

    fn cmd_set_speed(&self, lookup: Lookup, id: &str, speed: i64) -> Result<(), JobError> {
        self.op(|| {
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
        })
    }

    fn cmd_change(&self, lookup: Lookup, id: &str, options: &Value) -> Result<(), JobError> {
        self.op(|| {
            let (_, driver) = self.with_named(lookup, id, |rec, _| {
                rec.check_verb(JobVerb::Change)?;
                Ok(rec.driver.clone())
            })?;
            driver.change(options).map_err(JobError::generic)
        })
    }
}

/// The registry of jobs and the engine of their lifecycle.
///
/// Cheap to clone (an `Arc` inside). All methods are synchronous and never
/// hold a lock across an `.await`; [`JobHandle::start`] must be called from
/// within a Tokio runtime, as it spawns the job's body.
///
/// Commands come in two families that differ only in how they find their
/// job: the `job-*` family (`cancel`, `pause`, ...) finds any job and
/// reports an unknown ID as `Job not found` (GenericError); the
/// `block-job-*` family (`block_job_cancel`, ...) finds only block jobs
/// ([`JobType::is_block_job`]) and reports anything else as
/// `Block job 'ID' not found` (DeviceNotActive).
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
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
    /// A manager without jobs that reports events to `events`.
    pub fn new(events: Arc<dyn JobEvents>) -> Self {
        JobManager {
            inner: Arc::new(Inner {
                sink: events,
                op: OpLock::default(),
                state: Mutex::new(State::default()),
            }),
        }
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
        Ok(JobHandle {
            manager: self.clone(),
            key,
            id: id.to_owned(),
            shared,
            unstarted: AtomicBool::new(true),
        })
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
    pub fn cancel(&self, id: &str, force: bool) -> Result<(), JobError> {
        self.inner.cmd_cancel(Lookup::Job, id, force, false)
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

    /// `job-finalize`.
    pub fn finalize(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_finalize(Lookup::Job, id)
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
    /// completes instead of being cancelled.
    pub fn block_job_cancel(&self, device: &str, force: bool) -> Result<(), JobError> {
        self.inner.cmd_cancel(Lookup::BlockJob, device, force, true)
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

    /// `block-job-finalize`.
    pub fn block_job_finalize(&self, id: &str) -> Result<(), JobError> {
        self.inner.cmd_finalize(Lookup::BlockJob, id)
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
            self.inner.op(|| self.inner.job_cancel(key, true));
            // The sender lives as long as `status`' job record or handle.
            let _ = status.wait_for(|s| s.is_completed()).await;
        }
    }
}

/// A job just created by [`JobManager::create`]: start it with
/// [`start`](Self::start). Dropping an unstarted handle removes the job
/// (QEMU's `job_early_fail`: `created → null`); dropping it after start
/// only drops the handle.
pub struct JobHandle {
    manager: JobManager,
    key: JobKey,
    id: String,
    shared: Arc<JobShared>,
    unstarted: AtomicBool,
}

impl fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle")
            .field("id", &self.id)
            .field("status", &self.status())
            .finish()
    }
}

impl JobHandle {
    /// The job ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts the job (QEMU's `job_start`): emits `JOB_STATUS_CHANGE running`
    /// before returning and spawns the body on a Tokio task. Does nothing the
    /// second time, or if the job was cancelled before being started.
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub fn start(&self) {
        if self.unstarted.swap(false, Ordering::SeqCst) {
            self.manager.inner.start(self.key);
        }
    }

    /// Gives up on an unstarted job: `created → null` (QEMU's
    /// `job_early_fail`). Same as dropping the handle.
    pub fn early_fail(self) {
        drop(self);
    }

    /// The current status (`null` once the job is gone).
    pub fn status(&self) -> JobStatus {
        *self.shared.status.borrow()
    }

    /// A receiver of the job's status; it sees the latest status, not
    /// necessarily every intermediate one.
    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        self.shared.status.subscribe()
    }

    /// Waits until the job has concluded (or is gone) and returns its
    /// result: `Ok(())`, or the error message `query-jobs` reports
    /// (`Operation canceled` for a job removed before it ever ran). With
    /// manual finalization this waits for `job-finalize`.
    pub async fn wait(&self) -> Result<(), String> {
        let mut status = self.shared.status.subscribe();
        let _ = status
            .wait_for(|s| matches!(s, JobStatus::Concluded | JobStatus::Null))
            .await;
        self.shared
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| Err(CANCELED_MESSAGE.to_owned()))
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if self.unstarted.swap(false, Ordering::SeqCst) {
            self.manager.inner.early_fail(self.key);
        }
    }
}
