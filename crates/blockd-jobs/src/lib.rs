//! The background-job lifecycle of blockd, as QEMU 10.x implements it in
//! `job.c`, `job-qmp.c` and the job parts of `blockjob.c`/`blockdev.c`: the
//! base on which `blockdev-create`, `block-commit`, `block-stream` and the
//! mirror jobs run.
//!
//! A kind of job implements [`JobDriver`] (an async body plus optional async
//! finalization callbacks). [`JobManager::create`] registers a job and
//! [`JobHandle::start`] runs its body on a Tokio task; the manager moves the
//! job through its statuses, answers the `job-*` and `block-job-*` commands
//! with QEMU's error wording, and reports every change to a [`JobEvents`]
//! sink. Jobs finalize under the server's control-plane lock
//! ([`ControlLock`]); see [Locking](#locking).
//!
//! Modules: `engine` (the lifecycle engine and the event queue), `manager`
//! (the command facade: lookup, verb checks, QEMU's errors), `handle`,
//! `ctx` (what a body sees), `record` (per-job state and the one status
//! transition function), `driver`, `events`, `status`, `info`, `error`,
//! `unwind` (panics in driver code as job errors).
//!
//! # Statuses
//!
//! Every status change goes through one function, which checks it against
//! [`JOB_STATUS_TRANSITIONS`] (QEMU's `JobSTT`) and emits
//! `JOB_STATUS_CHANGE {"id", "status"}`. Commands are checked against
//! [`JOB_VERB_TABLE`] (QEMU's `JobVerbTable`); a refused verb fails with
//! `Job 'ID' in state 'STATUS' cannot accept command verb 'VERB'`.
//!
//! ```text
//!   undefined
//!       │ JobManager::create
//!       ▼
//!    created ──────────────── cancel (never started) ───────────────┐
//!       │ JobHandle::start                                          │
//!       ▼                     pause point                           │
//!    running ◄──────────────────────────────────► paused            │
//!       │  ╲ JobCtx::ready                                          │
//!       │   ▼                 pause point                           │
//!       │  ready ◄──────────────────────────────► standby           │
//!       │   │                                                       ▼
//!       │   │ body returns Ok        running, ready: body fails  aborting
//!       ▼   ▼ (job-complete; soft    or forced cancel ──────────►  │ ▲
//!    waiting   cancel of a mirror)                                 │ │
//!       │ whole transaction done     waiting: cancel ─────────────►│ │
//!       ▼                                                          │ │
//!    pending ── prepare fails, or cancel ────────────────────────────┘
//!       │ auto-finalize or job-finalize:                           │
//!       │ prepare, commit, clean                      abort, clean │
//!       ▼                                                          │
//!    concluded ◄───────────────────────────────────────────────────┘
//!       │ auto-dismiss, job-dismiss, or never started
//!       ▼
//!     null        (gone; an unstarted job can also go created → null:
//!                  JobHandle::early_fail)
//! ```
//!
//! # Events, in QEMU's order
//!
//! Measured against qemu-storage-daemon 10.0.2 (`JOB_STATUS_CHANGE` written
//! by its status):
//!
//! | case | events |
//! | --- | --- |
//! | `blockdev-create` (auto-finalize, manual dismiss) | created, running, waiting, pending, concluded; `job-dismiss`: null |
//! | block job succeeds (defaults) | created, running, waiting, pending, `BLOCK_JOB_COMPLETED`, concluded, null |
//! | block job, manual finalize | …, waiting, pending, `BLOCK_JOB_PENDING`; `job-finalize`: `BLOCK_JOB_COMPLETED`, concluded |
//! | body fails | created, running, aborting, `BLOCK_JOB_COMPLETED` (with `error`), concluded, null |
//! | forced cancel | …, aborting, `BLOCK_JOB_CANCELLED`, concluded, null |
//! | cancel while paused | …, paused, running, aborting, `BLOCK_JOB_CANCELLED`, concluded, null |
//! | ready job | …, running, ready, `BLOCK_JOB_READY`; `job-complete`: waiting, pending, `BLOCK_JOB_COMPLETED`, concluded, null |
//! | soft cancel of a ready mirror | …, ready, `BLOCK_JOB_READY`, waiting, pending, `BLOCK_JOB_COMPLETED`, concluded, null |
//!
//! `created` and `running` are emitted before [`JobManager::create`] and
//! [`JobHandle::start`] return; everything later is emitted as the body
//! progresses, from whichever thread drives the change. Events are emitted
//! strictly in the order of the changes that cause them (see
//! [Locking](#locking)).
//!
//! # Pausing
//!
//! Pause requests are counted (QEMU's `pause_count`): a job is created with
//! one (withdrawn by start), `job-pause` adds the user's (at most one: `Job is
//! already paused`), an I/O error with action `stop` adds the user's too.
//! The body notices at its next pause point ([`JobCtx::pause_point`],
//! [`JobCtx::sleep`], [`JobCtx::park`]), goes `paused` (`standby` if ready)
//! and stays there until the count drops to zero or a cancel arrives.
//! Cancelling a paused job withdraws the user's pause.
//!
//! # Locking
//!
//! Nothing in this crate holds a lock across an `.await`, and nothing
//! blocks a Tokio worker for longer than another thread takes to hand a few
//! events to the sink. Three locks are involved:
//!
//! * **The state lock**, a `std::sync::Mutex` over the registry and its
//!   event queue, held for short synchronous sections only, never while
//!   calling the driver or the event sink. Every status change happens
//!   under it through one function, which queues the change's events in
//!   the same critical section: the queue order is the order of the
//!   changes.
//! * **The flush lock**, a `std::sync::Mutex` held only while popping and
//!   emitting queued events. Whoever queued events emits them when it
//!   releases the state lock: it takes the flush lock, then pops and emits
//!   until the queue is empty. One thread emits at a time, always the
//!   oldest event first, so events of concurrent operations on different
//!   threads come out in queue order; a thread that finds another one
//!   emitting waits for it (the sink must not block), and by the time it
//!   has the flush lock its own events have been or are about to be
//!   emitted, so `created` and `running` are out before `create` and
//!   `start` return. An event sink that calls the manager (a query, a
//!   dismiss) is not blocked: a flush requested on the thread that is
//!   emitting returns at once, and the emitting loop sends the new events
//!   after the current one (so a job created from inside the sink has its
//!   `created` emitted just after `emit` returns, not before `create`
//!   does).
//! * **The control-plane lock**, [`ControlLock`] (the role of QEMU's BQL),
//!   async, FIFO and not re-entrant, shared with the rest of the server.
//!   A job is finalized under it: when its body returns, the job's own task
//!   takes it and runs `job_exit`, the transaction steps and the driver's
//!   async finalization callbacks ([`JobDriver::prepare`],
//!   [`JobDriver::commit`], [`JobDriver::abort`], [`JobDriver::clean`]),
//!   which receive the guard and may await I/O and graph changes. The
//!   commands that finalize or abort a job on the spot
//!   ([`JobManager::finalize`], [`JobManager::cancel`] and their
//!   `block_job_*` twins) are `async fn`s that take a [`ControlGuard`] from
//!   a caller already holding the lock. The other commands and the
//!   queries are synchronous and do not need it: they change a job's
//!   state, never the graph.
//!
//! Why this cannot deadlock: the state and flush locks are never held
//! across an `.await` or while waiting for anything but each other, and
//! are always taken in the order flush, then state. The control-plane lock
//! is held across awaits, but nothing that holds it waits for something
//! that needs it: a finalization callback awaits I/O (the data path never
//! takes the lock); a command holding it finalizes or aborts a job itself
//! rather than waiting for the job's task; a body that returns while a
//! command holds the lock simply waits for its turn (the job stays in its
//! running status until then); [`JobHandle::wait`] and the status
//! watchers need no lock; [`JobManager::cancel_sync_all`] takes the lock
//! only around each cancel, never while waiting for a job. What callers
//! must not do is lock the control-plane lock again while holding it,
//! including from a finalization callback or an event sink, or await a
//! job's completion while holding it.
//!
//! A finalization callback that fails or panics does not wedge anything:
//! the job concludes, the lock is released (see [`JobDriver`] for what
//! each failure means). The async commands must be polled to completion
//! (the QMP dispatcher does): dropping one half-way through a finalization
//! leaves that job between two steps until a later cancel (such as
//! [`JobManager::cancel_sync_all`]) aborts it.
//!
//! # Not implemented
//!
//! Job transactions (several jobs that finalize or abort together) are not
//! implemented; every job is its own transaction, and the manager keeps the
//! transaction steps (`waiting`, the prepare-all-then-finalize-all order) so
//! that real ones can be added where it enumerates the members of a job's
//! transaction. Internal (ID-less) jobs and QEMU's driver `pause`/`resume`/
//! `drain` callbacks are not modelled.

mod ctx;
mod driver;
mod engine;
mod error;
mod events;
mod handle;
mod info;
mod manager;
mod record;
mod status;
mod unwind;

pub use blockd_core::{ControlGuard, ControlLock};
pub use ctx::JobCtx;
pub use driver::{FinalizeFuture, JobDriver, JobFuture, JobOptions};
pub use error::{JobError, JobErrorClass, CANCELED_MESSAGE};
pub use events::{
    BlockErrorAction, BlockJobCancelled, BlockJobCompleted, BlockJobError, BlockJobPending,
    BlockJobProgress, BlockJobReady, BlockdevOnError, IoOperationType, IoStatus, JobEvent,
    JobEvents, JobStatusChange, NoEvents, BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED,
    BLOCK_JOB_ERROR, BLOCK_JOB_PENDING, BLOCK_JOB_READY, JOB_STATUS_CHANGE,
};
pub use handle::JobHandle;
pub use info::{BlockJobInfo, JobInfo};
pub use manager::JobManager;
pub use status::{
    id_wellformed, JobStatus, JobType, JobVerb, ParseWireNameError, JOB_STATUS_TRANSITIONS,
    JOB_VERB_TABLE,
};
pub use tokio_util::sync::CancellationToken;
