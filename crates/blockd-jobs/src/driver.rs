//! What a kind of job implements: the body ([`JobDriver::run`]) and the
//! optional callbacks of QEMU's `JobDriver` (`include/qemu/job.h`).

use std::future::Future;
use std::pin::Pin;

use blockd_core::ControlGuard;
use serde_json::{Map, Value};

use crate::ctx::JobCtx;
use crate::status::JobStatus;

/// The future returned by [`JobDriver::run`]: `Ok(())` on success, or the
/// error message that `query-jobs` reports (and `BLOCK_JOB_COMPLETED`
/// carries) on failure.
pub type JobFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The future returned by the finalization callbacks
/// ([`JobDriver::prepare`], [`JobDriver::commit`], [`JobDriver::abort`],
/// [`JobDriver::clean`]); `T` is `Result<(), String>` for `prepare` and
/// `()` for the others.
pub type FinalizeFuture<'a, T = ()> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Creation flags of a job (QEMU's `JOB_MANUAL_FINALIZE` and
/// `JOB_MANUAL_DISMISS`, inverted). The default is QEMU's `JOB_DEFAULT`:
/// both automatic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// Finalize as soon as the job is pending (otherwise `job-finalize` is
    /// needed, and block jobs emit `BLOCK_JOB_PENDING`).
    pub auto_finalize: bool,
    /// Dismiss as soon as the job is concluded (otherwise `job-dismiss` is
    /// needed).
    pub auto_dismiss: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

/// One kind of job: its body and lifecycle callbacks.
///
/// Only [`run`](Self::run) is required.
///
/// # Finalization callbacks
///
/// Finalization calls, in order: [`prepare`](Self::prepare) (unless the job
/// has already failed), then [`commit`](Self::commit) on success or
/// [`abort`](Self::abort) on failure or cancellation, then
/// [`clean`](Self::clean). They are async, so that a block job can drain
/// I/O, reopen and replace nodes, and they run while the server's
/// control-plane lock ([`blockd_core::ControlLock`]) is held, as QEMU runs
/// them under the BQL: by the job's own task once its body has returned, or
/// by the `job-finalize`/`job-cancel` command that finalizes or aborts it.
/// The guard is passed in as proof, for graph operations that require it;
/// the lock is not re-entrant, so a callback must never lock it again (it
/// would wait for itself). Each callback's future is awaited to completion
/// before the next is called, and no lock of the manager's own is held
/// meanwhile: a callback may await I/O for as long as it takes (commands
/// that need the control-plane lock wait; queries, pause/resume and the
/// data path do not), and may query the [`crate::JobManager`], but must not
/// await a job's completion ([`crate::JobHandle::wait`]): jobs finalize
/// under the lock it holds.
///
/// Errors and panics: an `Err` from `prepare` makes the job abort with that
/// message (`abort`, then `clean`), as in QEMU. A panic in `prepare` is
/// treated the same way, with the message `Job prepare panicked: MSG`. A
/// panic in `commit` fails the job (`Job commit panicked: MSG`, reported
/// like an error of the body) without calling `abort`, since the commit may
/// be partly done; a panic in `abort` or `clean` is logged and the job
/// keeps its result. In every case the remaining steps run, the job
/// concludes, its waiters wake, the lock is released and the manager
/// carries on.
///
/// The other callbacks are synchronous, called on whatever thread runs the
/// command (with the control-plane lock held for [`cancel`](Self::cancel),
/// without it for the others) and with none of the manager's locks held;
/// they must not block.
pub trait JobDriver: Send + Sync + 'static {
    /// The body. It runs on its own Tokio task once the job is started,
    /// after an initial pause point. It should pass pause points
    /// ([`JobCtx::pause_point`], [`JobCtx::sleep`], [`JobCtx::park`])
    /// regularly and return soon after [`JobCtx::is_cancelled`] becomes
    /// true; a cancelled job that returns `Ok(())` fails with
    /// `Operation canceled`. It runs without the control-plane lock; its
    /// job is finalized after it returns, once the job's task gets the lock.
    fn run(&self, ctx: JobCtx) -> JobFuture<'_>;

    /// Whether the job can become ready and accept `job-complete` (QEMU: the
    /// driver has a `.complete` callback; mirror and active commit). Without
    /// it `job-complete` fails with
    /// `The active block job 'ID' cannot be completed`.
    fn can_complete(&self) -> bool {
        false
    }

    /// `job-complete` on a ready job (only if [`can_complete`](Self::can_complete)).
    /// On `Ok` the manager sets [`JobCtx::completion_requested`] and wakes
    /// the body; an `Err` is returned to the caller as a `GenericError`.
    fn complete(&self) -> Result<(), String> {
        Ok(())
    }

    /// A cancel request; returns whether it is to be treated as forced
    /// (QEMU's `.cancel`). The default forces every cancel (jobs without a
    /// soft-cancel mode). Mirror returns `force || !status.is_ready()`: a
    /// soft cancel of a ready mirror ends it successfully without pivoting.
    fn cancel(&self, force: bool, status: JobStatus) -> bool {
        let _ = (force, status);
        true
    }

    /// First finalization step of a job that has not failed; an error makes
    /// the job abort with that message. Runs under the control-plane lock
    /// (`control`); see [Finalization callbacks](Self#finalization-callbacks).
    fn prepare<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a, Result<(), String>> {
        let _ = control;
        Box::pin(async { Ok(()) })
    }

    /// Finalization of a successful job, under the control-plane lock.
    fn commit<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        let _ = control;
        Box::pin(async {})
    }

    /// Finalization of a failed or cancelled job, under the control-plane
    /// lock.
    fn abort<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        let _ = control;
        Box::pin(async {})
    }

    /// Last finalization step, after `commit` or `abort`, under the
    /// control-plane lock.
    fn clean<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        let _ = control;
        Box::pin(async {})
    }

    /// The rate limit changed (`block-job-set-speed`); `speed` is in bytes
    /// per second, 0 for unlimited. The current value is also available as
    /// [`JobCtx::speed`].
    fn set_speed(&self, speed: i64) {
        let _ = speed;
    }

    /// `block-job-change`: apply the type-specific options `options` (the
    /// command's arguments). The default refuses, as QEMU does for job types
    /// without a `.change` callback.
    fn change(&self, options: &Value) -> Result<(), String> {
        let _ = options;
        Err("Job type does not support change".to_owned())
    }

    /// Type-specific members added to this job's `query-block-jobs` entry
    /// (QEMU's `.query`; mirror's `actively-synced`).
    fn query_block_job(&self) -> Map<String, Value> {
        Map::new()
    }
}
