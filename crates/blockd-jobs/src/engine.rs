//! The lifecycle engine of QEMU's `job.c`: creation, start, completion,
//! the transaction steps, finalization, cancellation and dismissal, and the
//! queue through which status changes become events. The commands that
//! drive it from outside are in [`crate::manager`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::json;

use crate::ctx::JobCtx;
use crate::driver::{JobDriver, JobOptions};
use crate::error::{JobError, CANCELED_MESSAGE};
use crate::events::{JobEvents, BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_PENDING};
use crate::oplock::OpLock;
use crate::record::{transition, update_rc, EventQueue, JobKey, JobRecord, JobShared};
use crate::status::{id_wellformed, JobStatus, JobType};

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
    pub(crate) jobs: Vec<JobRecord>,
    pub(crate) events: EventQueue,
    next_key: JobKey,
}

impl State {
    pub(crate) fn job_mut(&mut self, key: JobKey) -> Option<(&mut JobRecord, &mut EventQueue)> {
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
    pub(crate) fn dismiss(&mut self, key: JobKey) {
        if let Some((rec, events)) = self.job_mut(key) {
            rec.busy = false;
            rec.paused = false;
            rec.deferred = true;
            transition(rec, JobStatus::Null, events);
        }
        self.jobs.retain(|r| r.key != key);
    }
}

/// Shared core of a [`crate::JobManager`] and its jobs' contexts.
pub(crate) struct Inner {
    pub(crate) sink: Arc<dyn JobEvents>,
    pub(crate) op: OpLock,
    pub(crate) state: Mutex<State>,
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

    // ---- creation and start -------------------------------------------

    pub(crate) fn create(
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
    pub(crate) fn start(self: &Arc<Self>, key: JobKey) {
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
    pub(crate) fn early_fail(&self, key: JobKey) {
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
    pub(crate) fn job_completed(&self, key: JobKey) {
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
    pub(crate) fn do_finalize(&self, key: JobKey) {
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
    pub(crate) fn job_cancel(&self, key: JobKey, force: bool) {
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
}
