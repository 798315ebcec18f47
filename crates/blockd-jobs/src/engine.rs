//! The lifecycle engine of QEMU's `job.c`: creation, start, completion,
//! the transaction steps, finalization, cancellation and dismissal, and the
//! queue through which status changes become events. The commands that
//! drive it from outside are in [`crate::manager`].
//!
//! Two locks, never nested the wrong way round:
//!
//! * the state lock (`std::sync::Mutex<State>`) guards the registry and
//!   the event queue. It is held only for short synchronous sections, never
//!   across an `.await`, never while calling the driver or the sink;
//! * the flush lock (`std::sync::Mutex<()>`) is held only while popping and
//!   emitting queued events, so that one thread at a time emits, in queue
//!   order. It is taken with the state lock released; the state lock is
//!   then taken (briefly) inside it for each pop.
//!
//! The control-plane lock ([`ControlLock`]) is the third, async one: the
//! finalization steps (`job_exit` and everything it leads to, `job-finalize`,
//! a cancel that completes or aborts at once) run while its guard is held,
//! and take it as a `&ControlGuard` argument.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};

use blockd_core::{ControlGuard, ControlLock};

use crate::ctx::JobCtx;
use crate::driver::{JobDriver, JobOptions};
use crate::error::{JobError, CANCELED_MESSAGE};
use crate::events::{BlockJobCancelled, BlockJobPending, JobEvents};
use crate::record::{transition, update_rc, EventQueue, JobKey, JobRecord, JobShared};
use crate::status::{id_wellformed, JobStatus, JobType};
use crate::unwind::{catch_panic, panic_message};

/// What `job_cancel` does after marking the job cancelled.
enum AfterCancel {
    Nothing,
    /// Not started: it has completed at once (`failed` tells which way).
    Completed {
        failed: bool,
    },
    /// Already completed (pending) and force-cancelled: abort now.
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
    /// The thread emitting events right now, if any: a flush requested on
    /// that thread comes from inside the sink and must not wait for itself.
    flushing_on: Option<ThreadId>,
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

/// The state lock, held. Dropping it releases the lock and then, if events
/// were queued, emits them ([`Inner::flush_events`]): whoever changes a
/// status emits its events before going on, so `created` and `running` are
/// out before `create` and `start` return, and no event waits in the queue
/// for an unrelated later operation.
pub(crate) struct StateGuard<'a> {
    inner: &'a Inner,
    /// Always `Some` until dropped.
    guard: Option<MutexGuard<'a, State>>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        self.guard
            .as_deref()
            .expect("state guard used after release")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard
            .as_deref_mut()
            .expect("state guard used after release")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let queued = !guard.events.is_empty();
        drop(guard);
        // While unwinding, leave the events to the next flush rather than
        // risk a second panic in the sink.
        if queued && !thread::panicking() {
            self.inner.flush_events();
        }
    }
}

/// Shared core of a [`crate::JobManager`] and its jobs' contexts.
pub(crate) struct Inner {
    sink: Arc<dyn JobEvents>,
    /// The server's control-plane lock: finalization runs under it.
    pub(crate) control: ControlLock,
    state: Mutex<State>,
    /// Serialises emission (see the module docs).
    flush: Mutex<()>,
}

/// Clears [`State::flushing_on`] when a flush ends, even by a panicking
/// sink.
struct FlushingOn<'a>(&'a Inner);

impl Drop for FlushingOn<'_> {
    fn drop(&mut self) {
        self.0.raw_state().flushing_on = None;
    }
}

impl Inner {
    pub(crate) fn new(sink: Arc<dyn JobEvents>, control: ControlLock) -> Self {
        Inner {
            sink,
            control,
            state: Mutex::new(State::default()),
            flush: Mutex::new(()),
        }
    }

    /// The state lock; events queued under it are emitted when it is
    /// released.
    pub(crate) fn state(&self) -> StateGuard<'_> {
        StateGuard {
            inner: self,
            guard: Some(self.raw_state()),
        }
    }

    fn raw_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Emits every queued event, in queue order, one thread at a time.
    ///
    /// Called with the state lock released. A caller on another thread
    /// than the current emitter waits for the flush lock (the sink must not
    /// block, so that is short) and then drains the queue, which by then
    /// holds its own events unless the previous emitter already sent them:
    /// either way they are out before this returns. A call from inside the
    /// sink (the sink used the manager) returns at once: the emitter on
    /// this thread is still looping and sends the new events after the
    /// current one. Nothing can be stranded, as a pusher always flushes
    /// after pushing and the emitter stops only when it finds the queue
    /// empty.
    pub(crate) fn flush_events(&self) {
        let me = thread::current().id();
        if self.raw_state().flushing_on == Some(me) {
            return;
        }
        let _serial = self.flush.lock().unwrap_or_else(PoisonError::into_inner);
        self.raw_state().flushing_on = Some(me);
        let _clear = FlushingOn(self);
        loop {
            // Bound to a local so the state lock is released before emitting.
            let next = self.raw_state().events.pop();
            let Some((name, data)) = next else {
                break;
            };
            self.sink.emit(name, data);
        }
    }

    /// Runs `f` on job `key` under the state lock; `None` if it is gone.
    /// Events `f` queues are emitted before this returns.
    pub(crate) fn with_job<R>(
        &self,
        key: JobKey,
        f: impl FnOnce(&mut JobRecord, &mut EventQueue) -> R,
    ) -> Option<R> {
        let mut state = self.state();
        state.job_mut(key).map(|(rec, events)| f(rec, events))
    }

    /// Debug check that a guard passed in is one of this manager's lock.
    pub(crate) fn check_guard(&self, guard: &ControlGuard) {
        debug_assert!(
            self.control.holds(guard),
            "the ControlGuard passed to the job manager is not a guard of its ControlLock"
        );
    }

    // ---- creation and start -------------------------------------------

    pub(crate) fn check_new_id(&self, id: &str) -> Result<(), JobError> {
        if !id_wellformed(id) {
            return Err(JobError::invalid_id(id));
        }
        if self.state().jobs.iter().any(|r| r.id == id) {
            return Err(JobError::id_in_use(id));
        }
        Ok(())
    }

    pub(crate) fn create(
        &self,
        id: &str,
        job_type: JobType,
        options: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Result<(JobKey, Arc<JobShared>), JobError> {
        self.check_new_id(id)?;
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
    }

    /// QEMU's `job_start`: running now, body on a new task; when the body
    /// returns, that task finalizes the job under the control-plane lock.
    pub(crate) fn start(self: &Arc<Self>, key: JobKey) {
        // Checked before the job changes status, so that misuse cannot leave
        // a running job without a body.
        let runtime = tokio::runtime::Handle::try_current()
            .expect("JobHandle::start must be called within a Tokio runtime");
        let launch = self
            .with_job(key, |rec, events| {
                // Not created any more: cancelled (or dropped) before start.
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
            .flatten();
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
                    let msg = panic_message(&*e.into_panic());
                    tracing::error!(job = key, panic = %msg, "job body panicked");
                    Err(format!("Job body panicked: {msg}"))
                }
                Err(_) => Err(CANCELED_MESSAGE.to_owned()),
            };
            // QEMU runs job_exit in the main loop, under the BQL. A command
            // holding the lock finishes first; the job stays in its running
            // status (not yet completed) until then.
            let guard = inner.control.lock().await;
            inner.job_exit(&guard, key, result).await;
        });
    }

    /// QEMU's `job_early_fail`: a job that will never start goes from
    /// created straight to null.
    pub(crate) fn early_fail(&self, key: JobKey) {
        let mut state = self.state();
        let unstarted = state
            .job_mut(key)
            .is_some_and(|(rec, _)| !rec.started && rec.status == JobStatus::Created);
        if unstarted {
            state.dismiss(key);
        }
    }

    // ---- completion and finalization ----------------------------------
    //
    // Everything from here on runs under the control-plane lock: `guard`
    // proves it and is handed to the driver's finalization callbacks.

    /// QEMU's `job_exit` and `job_completed`: the body returned.
    async fn job_exit(&self, guard: &ControlGuard, key: JobKey, result: Result<(), String>) {
        let failed = self.with_job(key, |rec, events| {
            debug_assert!(
                !rec.status.is_completed(),
                "job '{}' completed twice",
                rec.id
            );
            rec.deferred = true;
            rec.busy = false;
            rec.sleeping = false;
            if let Err(msg) = result {
                rec.ret = Some(msg);
            }
            update_rc(rec, events);
            rec.ret.is_some()
        });
        match failed {
            Some(true) => self.txn_abort(guard, key).await,
            Some(false) => self.txn_success(guard, key).await,
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
    /// them, and `job-finalize` of one member finalizes all. That wait
    /// happens under the control-plane lock, which the members' own tasks
    /// need for `job_exit`: it must therefore run their `job_exit` itself
    /// (as QEMU's `AIO_WAIT_WHILE` runs the pending bottom halves) rather
    /// than wait for their tasks.
    fn txn_members(&self, key: JobKey) -> Vec<JobKey> {
        vec![key]
    }

    /// QEMU's `job_completed_txn_abort`.
    async fn txn_abort(&self, guard: &ControlGuard, key: JobKey) {
        for member in self.txn_members(key) {
            self.finalize_single(guard, member).await;
        }
    }

    /// QEMU's `job_completed_txn_success`: waiting, then (once every member
    /// has completed) pending, then finalization unless one member needs
    /// `job-finalize`.
    async fn txn_success(&self, guard: &ControlGuard, key: JobKey) {
        let members = self.txn_members(key);
        let needs_finalize = {
            let mut state = self.state();
            if let Some((rec, events)) = state.job_mut(key) {
                transition(rec, JobStatus::Waiting, events);
            }
            let all_completed = members.iter().all(|m| {
                state
                    .jobs
                    .iter()
                    .find(|r| r.key == *m)
                    .is_none_or(|r| r.status.is_completed())
            });
            if !all_completed {
                return;
            }
            let mut needs_finalize = false;
            for member in &members {
                if let Some((rec, events)) = state.job_mut(*member) {
                    transition(rec, JobStatus::Pending, events);
                    if !rec.auto_finalize {
                        needs_finalize = true;
                        if rec.job_type.is_block_job() {
                            events.push(BlockJobPending {
                                job_type: rec.job_type,
                                id: rec.id.clone(),
                            });
                        }
                    }
                }
            }
            needs_finalize
        };
        if !needs_finalize {
            self.do_finalize(guard, key).await;
        }
    }

    /// QEMU's `job_do_finalize`: prepare every member, stopping at the
    /// first failure; if one failed, abort the transaction, else finalize
    /// every member.
    pub(crate) async fn do_finalize(&self, guard: &ControlGuard, key: JobKey) {
        let members = self.txn_members(key);
        let mut failed = false;
        for member in &members {
            if self.prepare(guard, *member).await {
                failed = true;
                break;
            }
        }
        if failed {
            self.txn_abort(guard, key).await;
        } else {
            for member in members {
                self.finalize_single(guard, member).await;
            }
        }
    }

    /// QEMU's `job_prepare`; returns whether the job has failed. A panic in
    /// `prepare` counts as its error.
    async fn prepare(&self, guard: &ControlGuard, key: JobKey) -> bool {
        let Some((driver, ok)) =
            self.with_job(key, |rec, _| (rec.driver.clone(), rec.ret.is_none()))
        else {
            return false;
        };
        if ok {
            let result = match catch_panic(|| driver.prepare(guard)).await {
                Ok(result) => result,
                Err(msg) => {
                    tracing::error!(job = key, panic = %msg, "job prepare panicked");
                    Err(format!("Job prepare panicked: {msg}"))
                }
            };
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
    ///
    /// A panic in `commit` fails the job (`abort` is not called: the commit
    /// may be partly done); a panic in `abort` or `clean` is logged. Either
    /// way the job concludes.
    async fn finalize_single(&self, guard: &ControlGuard, key: JobKey) {
        let Some((driver, failed)) = self.with_job(key, |rec, events| {
            debug_assert!(rec.status.is_completed(), "job '{}' not completed", rec.id);
            update_rc(rec, events);
            (rec.driver.clone(), rec.ret.is_some())
        }) else {
            return;
        };
        if failed {
            if let Err(msg) = catch_panic(|| driver.abort(guard)).await {
                tracing::error!(job = key, panic = %msg, "job abort panicked");
            }
        } else if let Err(msg) = catch_panic(|| driver.commit(guard)).await {
            tracing::error!(job = key, panic = %msg, "job commit panicked");
            self.with_job(key, |rec, events| {
                rec.ret = Some(format!("Job commit panicked: {msg}"));
                update_rc(rec, events);
            });
        }
        if let Err(msg) = catch_panic(|| driver.clean(guard)).await {
            tracing::error!(job = key, panic = %msg, "job clean panicked");
        }
        let mut state = self.state();
        if let Some((rec, events)) = state.job_mut(key) {
            // Legacy events only for started block jobs.
            if rec.started && rec.job_type.is_block_job() {
                if rec.force_cancel {
                    events.push(BlockJobCancelled(rec.progress_event()));
                } else {
                    events.push(rec.completed_event());
                }
            }
            rec.record_outcome();
        }
        state.conclude(key);
    }

    /// QEMU's `job_cancel` (no verb check). A running job is only told;
    /// a job that never started completes (aborting) here, and a completed
    /// (pending) job that is force-cancelled is aborted here.
    pub(crate) async fn job_cancel(&self, guard: &ControlGuard, key: JobKey, force: bool) {
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
        let next = self.with_job(key, |rec, events| {
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
            if !rec.started && rec.status == JobStatus::Created {
                // QEMU's job_completed, in the same critical section as the
                // check: JobHandle::start (which does not take the
                // control-plane lock) then finds the job no longer created.
                update_rc(rec, events);
                AfterCancel::Completed {
                    failed: rec.ret.is_some(),
                }
            } else if rec.deferred || !rec.started {
                // Completed. Under the control-plane lock nobody else is
                // finalizing it: it is pending (or was left aborting by a
                // finalization that was dropped half-way).
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
            Some(AfterCancel::Completed { failed: true } | AfterCancel::Abort) => {
                self.txn_abort(guard, key).await;
            }
            Some(AfterCancel::Completed { failed: false }) => self.txn_success(guard, key).await,
            Some(AfterCancel::Nothing) | None => {}
        }
    }
}
