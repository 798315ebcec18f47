//! blockd's block jobs (QEMU's `blockjob.c`, `block/commit.c`,
//! `block/mirror.c`, `block/stream.c`, `block/backup.c`): background jobs that copy data
//! within a backing chain or to another node while clients keep using the
//! nodes, and change the graph when they finish.
//!
//! * [`commit`] — intermediate commit: a range of the chain into its base.
//! * [`mirror`] — mirror (to another node) and active commit (the active
//!   layer into its base): READY once converged, then a pivot.
//! * [`stream`] — backing data copied up into the top, the chain cut.
//! * [`backup`] — a point-in-time copy to another node, kept by the
//!   [`cbw`] (`copy-before-write`) filter while clients write.
//! * [`filters`] — the filter nodes they put in the graph (`commit_top`,
//!   `mirror_top`, `copy-on-read`).
//! * [`common`] — the nodes a job holds, its pace, its error policy.
//!
//! The jobs run on the lifecycle of `blockd-jobs` (statuses, verbs,
//! events). Starting one and finishing one change the graph, so both run
//! under the control-plane lock: the caller holds it for `start`, and the
//! job's finalization callbacks get it from the lifecycle. Every graph
//! change goes through the core's all-or-nothing operations (`append`,
//! `replace_node`, `reopen`) inside drained sections; a start that fails
//! halfway undoes what it did.
//!
//! The QMP side (argument resolution, error classes) is in the `blockd`
//! crate; this crate takes resolved nodes.

pub mod backup;
pub mod cbw;
pub mod commit;
pub mod common;
pub mod filters;
pub mod mirror;
pub mod stream;

use std::sync::Arc;

use blockd_core::graph::check_node_name;
use blockd_core::{BlockError, BlockGraph, BlockNode, ControlGuard};
use blockd_jobs::{JobDriver, JobError, JobHandle, JobManager, JobOptions, JobType};

/// Why a job did not start.
#[derive(Debug)]
pub enum StartError {
    /// The job layer refused (its id, its speed).
    Job(JobError),
    /// The graph refused (permissions, names, reopen).
    Block(BlockError),
}

impl From<BlockError> for StartError {
    fn from(e: BlockError) -> Self {
        StartError::Block(e)
    }
}

impl From<JobError> for StartError {
    fn from(e: JobError) -> Self {
        StartError::Job(e)
    }
}

/// Closes nodes that left the graph.
pub(crate) async fn close(nodes: Vec<Arc<BlockNode>>) {
    for n in nodes {
        if let Err(e) = n.close().await {
            tracing::warn!(node = n.name(), error = %e, "closing a node a job released");
        }
    }
}

/// QEMU's `bdrv_set_backing_hd`: `node`'s backing child becomes
/// `backing` (none: cut) through a reopen, which tells the driver; what
/// lost its last user is closed.
pub(crate) async fn set_backing(
    graph: &BlockGraph,
    control: &ControlGuard,
    node: &Arc<BlockNode>,
    backing: Option<Arc<BlockNode>>,
) -> Result<(), String> {
    let spec = blockd_core::ReopenSpec {
        node: node.clone(),
        options: node.options(),
        children: vec![("backing".to_string(), blockd_core::ChildRole::COW, backing)],
        driver_opts: None,
    };
    let released = graph.reopen(control, vec![spec]).await.map_err(|e| e.msg)?;
    close(released).await;
    Ok(())
}

/// The name of a job's filter node: the one given (checked as a
/// node-name, and free) or a generated one.
pub(crate) fn filter_name(
    graph: &BlockGraph,
    given: Option<String>,
) -> Result<(String, bool), BlockError> {
    match given {
        Some(n) => {
            check_node_name(&n)?;
            if graph.contains(&n) {
                return Err(BlockError::invalid(format!(
                    "Duplicate nodes with node-name='{n}'"
                )));
            }
            Ok((n, false))
        }
        None => Ok((graph.auto_name(), true)),
    }
}

/// A job shared between the lifecycle (which owns its driver) and the
/// code that started it (which undoes a failed start).
struct Shared<T>(Arc<T>);

impl<T: JobDriver> JobDriver for Shared<T> {
    fn run(&self, ctx: blockd_jobs::JobCtx) -> blockd_jobs::JobFuture<'_> {
        self.0.run(ctx)
    }
    fn can_complete(&self) -> bool {
        self.0.can_complete()
    }
    fn complete(&self) -> Result<(), String> {
        self.0.complete()
    }
    fn cancel(&self, force: bool, status: blockd_jobs::JobStatus) -> bool {
        self.0.cancel(force, status)
    }
    fn prepare<'a>(
        &'a self,
        control: &'a ControlGuard,
    ) -> blockd_jobs::FinalizeFuture<'a, Result<(), String>> {
        self.0.prepare(control)
    }
    fn commit<'a>(&'a self, control: &'a ControlGuard) -> blockd_jobs::FinalizeFuture<'a> {
        self.0.commit(control)
    }
    fn abort<'a>(&'a self, control: &'a ControlGuard) -> blockd_jobs::FinalizeFuture<'a> {
        self.0.abort(control)
    }
    fn clean<'a>(&'a self, control: &'a ControlGuard) -> blockd_jobs::FinalizeFuture<'a> {
        self.0.clean(control)
    }
    fn set_speed(&self, speed: i64) {
        self.0.set_speed(speed)
    }
    fn change(&self, options: &serde_json::Value) -> Result<(), String> {
        self.0.change(options)
    }
    fn query_block_job(&self) -> serde_json::Map<String, serde_json::Value> {
        self.0.query_block_job()
    }
}

/// Registers a job with the lifecycle and sets its initial speed. On error
/// the job is handed back, for the caller to undo what it holds.
pub(crate) fn create_job<T: JobDriver>(
    jobs: &JobManager,
    id: &str,
    ty: JobType,
    options: JobOptions,
    speed: i64,
    job: T,
) -> Result<JobHandle, (StartError, Arc<T>)> {
    create_job_shared(jobs, id, ty, options, speed, job).map(|(h, _)| h)
}

/// [`create_job`], keeping a reference to the job for a caller that still
/// sets it up before starting it.
pub(crate) fn create_job_shared<T: JobDriver>(
    jobs: &JobManager,
    id: &str,
    ty: JobType,
    options: JobOptions,
    speed: i64,
    job: T,
) -> Result<(JobHandle, Arc<T>), (StartError, Arc<T>)> {
    let job = Arc::new(job);
    let handle = jobs
        .create(id, ty, options, Box::new(Shared(job.clone())))
        .map_err(|e| (StartError::Job(e), job.clone()))?;
    if speed != 0 {
        // Dropping the unstarted handle removes the job again.
        jobs.block_job_set_speed(id, speed)
            .map_err(|e| (StartError::Job(e), job.clone()))?;
    }
    Ok((handle, job))
}

/// What a job start did to the graph before the job existed, undone if the
/// start fails (QEMU's `fail:` paths).
pub(crate) struct Started {
    graph: Arc<BlockGraph>,
    reopened: Option<Arc<BlockNode>>,
    filter: Option<Arc<BlockNode>>,
    armed: bool,
}

impl Started {
    pub(crate) fn new(graph: Arc<BlockGraph>) -> Started {
        Started {
            graph,
            reopened: None,
            filter: None,
            armed: true,
        }
    }

    /// `node` was read-only and has been reopened read-write.
    pub(crate) fn base_was_read_only(&mut self, node: Arc<BlockNode>) {
        self.reopened = Some(node);
    }

    /// `filter` was put into the graph.
    pub(crate) fn filter(&mut self, filter: Arc<BlockNode>) {
        self.filter = Some(filter);
    }

    /// The job took over: nothing to undo.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }

    /// Undoes what was done, in reverse order.
    pub(crate) async fn undo(mut self, control: &ControlGuard) {
        self.armed = false;
        if let Some(f) = self.filter.take() {
            match self.graph.remove_filter(control, &f).await {
                Ok(nodes) => close(nodes).await,
                Err(e) => {
                    tracing::error!(error = %e, "removing a job's filter after a failed start")
                }
            }
        }
        if let Some(n) = self.reopened.take() {
            if let Err(e) =
                blockd_drivers::reopen::set_read_only(&self.graph, control, &n, true).await
            {
                tracing::warn!(node = n.name(), error = %e, "back to read-only after a failed start");
            }
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.armed {
            tracing::error!("a job start was abandoned without undoing its graph changes");
        }
    }
}
