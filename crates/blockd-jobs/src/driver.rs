//! What a kind of job implements: the body ([`JobDriver::run`]) and the
//! optional callbacks of QEMU's `JobDriver` (`include/qemu/job.h`).

use std::future::Future;
use std::pin::Pin;

use serde_json::{Map, Value};

use crate::ctx::JobCtx;
use crate::status::JobStatus;

/// The future returned by [`JobDriver::run`]: `Ok(())` on success, or the
/// error message that `query-jobs` reports (and `BLOCK_JOB_COMPLETED`
/// carries) on failure.
pub type JobFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

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
/// Only [`run`](Self::run) is required. The callbacks are synchronous, run
/// without the manager's state lock but under its operation lock (QEMU
/// runs them under the BQL), so they may query the [`crate::JobManager`]
/// but must not block on the job's body.
///
/// Finalization calls, in order: [`prepare`](Self::prepare) (unless the job
/// has already failed), then [`commit`](Self::commit) on success or
/// [`abort`](Self::abort) on failure or cancellation, then
/// [`clean`](Self::clean).
pub trait JobDriver: Send + Sync + 'static {
    /// The body. It runs on its own Tokio task once the job is started,
    /// after an initial pause point. It should pass pause points
    /// ([`JobCtx::pause_point`], [`JobCtx::sleep`], [`JobCtx::park`])
    /// regularly and return soon after [`JobCtx::is_cancelled`] becomes
    /// true; a cancelled job that returns `Ok(())` fails with
    /// `Operation canceled`.
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
    /// the job abort with that message.
    fn prepare(&self) -> Result<(), String> {
        Ok(())
    }

    /// Finalization of a successful job.
    fn commit(&self) {}

    /// Finalization of a failed or cancelled job.
    fn abort(&self) {}

    /// Last finalization step, after `commit` or `abort`.
    fn clean(&self) {}

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
