//! [`JobHandle`]: what the creator of a job holds to start it and to wait
//! for its result.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use tokio::sync::watch;

use crate::error::CANCELED_MESSAGE;
use crate::manager::JobManager;
use crate::record::{JobKey, JobShared};
use crate::status::JobStatus;

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
    pub(crate) fn new(manager: JobManager, key: JobKey, id: &str, shared: Arc<JobShared>) -> Self {
        JobHandle {
            manager,
            key,
            id: id.to_owned(),
            shared,
            unstarted: AtomicBool::new(true),
        }
    }

    /// The job ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts the job (QEMU's `job_start`): emits `JOB_STATUS_CHANGE running`
    /// before returning and spawns the body on a Tokio task. Does nothing the
    /// second time, or if the job was cancelled before being started.
    ///
    /// Needs no lock. When the body returns, the job's task takes the
    /// control-plane lock and finalizes the job under it.
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
    ///
    /// Needs no lock. It must not be awaited while holding the control-plane
    /// lock: the job is finalized under that lock, so it would never
    /// conclude.
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
