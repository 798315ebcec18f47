//! The background-job lifecycle of blockd, as QEMU 10.x implements it in
//! `job.c`, `job-qmp.c` and the job parts of `blockjob.c`/`blockdev.c`: the
//! base on which `blockdev-create`, `block-commit`, `block-stream` and the
//! mirror jobs run.
//!
//! A kind of job implements [`JobDriver`] (an async body plus optional
//! finalization callbacks). [`JobManager::create`] registers a job and
//! [`JobHandle::start`] runs its body on a Tokio task; the manager moves the
//! job through its statuses, answers the `job-*` and `block-job-*` commands
//! with QEMU's error wording, and reports every change to a [`JobEvents`]
//! sink.
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
//! strictly in the order of the changes that cause them.
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
//! State lives behind a `std::sync::Mutex` that is never held across an
//! `.await` or while calling driver callbacks or the event sink. Lifecycle
//! operations are additionally serialised by a re-entrant operation lock
//! (the role of QEMU's BQL), under which driver callbacks run and events are
//! emitted.
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
mod oplock;
mod record;
mod status;

pub use ctx::JobCtx;
pub use driver::{JobDriver, JobFuture, JobOptions};
pub use error::{JobError, JobErrorClass, CANCELED_MESSAGE};
pub use events::{
    BlockErrorAction, BlockdevOnError, IoOperationType, IoStatus, JobEvents, NoEvents,
    BLOCK_JOB_CANCELLED, BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR, BLOCK_JOB_PENDING, BLOCK_JOB_READY,
    JOB_STATUS_CHANGE,
};
pub use handle::JobHandle;
pub use info::{BlockJobInfo, JobInfo};
pub use manager::JobManager;
pub use status::{
    id_wellformed, JobStatus, JobType, JobVerb, ParseWireNameError, JOB_STATUS_TRANSITIONS,
    JOB_VERB_TABLE,
};
pub use tokio_util::sync::CancellationToken;
