//! Intermediate commit (QEMU's `block/commit.c`): the data of the chain
//! from `top` down to (not including) `base` is copied into `base`; then
//! the overlay of `top` is pointed at `base` (graph and image header,
//! QEMU's `bdrv_drop_intermediate`) and the intermediate nodes fall out
//! of the chain.
//!
//! ```text
//!   before:  overlay ─backing─► top ─► ... ─► base
//!   running: overlay ─backing─► commit_top ─backing─► top ─► ... ─► base
//!                                                      job: read ─┘   └─ write
//!   after:   overlay ─backing─► base    (header names base's file)
//! ```
//!
//! `commit_top` reads through and needs no permission on the chain, so
//! the job may hold every intermediate node without letting others write
//! it and write into `base` (reopened read-write if needed, and back to
//! read-only afterwards). Only what some layer above `base` allocates is
//! copied (QEMU's `commit_iteration`): ranges allocated as zeroes become
//! zero writes (with unmap) so the base stays sparse, and what nothing
//! above the base allocates is left alone. A few chunks are in flight at
//! once.

use std::sync::{Arc, Mutex};

use blockd_core::qapi::BlockdevOnError;
use blockd_core::{
    chain, BlockError, BlockGraph, BlockNode, ControlGuard, Perm, PermPair, Root, RootKind,
};
use blockd_jobs::{FinalizeFuture, JobCtx, JobDriver, JobFuture, JobManager, JobOptions, JobType};

use crate::common::{io_error, JobNodes, OnIoError, Pace};
use crate::filters::{filter_node, CommitTop};
use crate::{close, StartError, Started};

/// Bytes copied per step (QEMU's `COMMIT_BUFFER_SIZE`).
pub const CHUNK: u64 = 512 * 1024;

/// Chunks copied at once. QEMU copies one at a time; a few in flight keep
/// both the reading and the writing side busy.
const IN_FLIGHT: usize = 4;

/// What a chunk of the committed range needs.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Nothing above the base allocates it.
    Skip,
    /// Allocated as zeroes above the base.
    Zero,
    /// Data.
    Data,
}

/// What an intermediate commit needs, resolved by the caller.
pub struct CommitParams {
    /// The job id.
    pub job_id: String,
    /// The active layer the chain belongs to (`device`).
    pub bs: Arc<BlockNode>,
    /// The top of the committed range (not `bs`).
    pub top: Arc<BlockNode>,
    /// Where the data goes.
    pub base: Arc<BlockNode>,
    /// What the overlay's header names as its new backing file.
    pub backing_file: Option<String>,
    /// Leave the protocol prefix out of a generated name.
    pub backing_mask_protocol: bool,
    /// Bytes per second (0: unlimited).
    pub speed: i64,
    /// Error policy.
    pub on_error: BlockdevOnError,
    /// The name of the `commit_top` node.
    pub filter_node_name: Option<String>,
    /// auto-finalize / auto-dismiss.
    pub options: JobOptions,
}

struct CommitJob {
    graph: Arc<BlockGraph>,
    nodes: JobNodes,
    top: Arc<BlockNode>,
    base: Arc<BlockNode>,
    commit_top: Arc<BlockNode>,
    top_root: Arc<Root>,
    base_root: Mutex<Option<Arc<Root>>>,
    base_read_only: bool,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    pace: Pace,
}

/// Starts an intermediate commit (QEMU's `commit_start`).
pub async fn start(
    jobs: &JobManager,
    graph: &Arc<BlockGraph>,
    control: &ControlGuard,
    p: CommitParams,
) -> Result<(), StartError> {
    if p.top.id() == p.base.id() {
        return Err(
            BlockError::invalid("Invalid files for merge: top and base are the same").into(),
        );
    }
    chain::overlay(&p.bs, &p.top).ok_or_else(|| BlockError::invalid("Could not find overlay"))?;
    // QEMU creates the job before it changes the graph: a bad ID fails
    // first.
    jobs.check_new_id(&p.job_id)?;
    let (top_len, base_len) = (p.top.length(), p.base.length());
    let mut started = Started::new(graph.clone());
    // The filter goes in first: it needs nothing below, so the job's own
    // edges can then keep everybody else from the intermediate nodes.
    let (name, auto) = crate::filter_name(graph, p.filter_node_name)?;
    let commit_top = filter_node(name, auto, &p.top, "backing", |child| {
        Box::new(CommitTop { child })
    });
    let base_read_only = p.base.read_only();
    if base_read_only {
        blockd_drivers::reopen::set_read_only(graph, control, &p.base, false).await?;
        started.base_was_read_only(p.base.clone());
    }
    graph.append(control, &commit_top, &p.top).await?;
    started.filter(commit_top.clone());
    let nodes = JobNodes::new("commit", &p.job_id);
    let r = (|| {
        nodes.add(graph, "main node", &p.bs, Perm::NONE, Perm::ALL)?;
        let mut shared = Perm::WRITE_UNCHANGED | Perm::WRITE;
        for n in chain::nodes(&p.top) {
            if n.id() == p.base.id() {
                break;
            }
            if chain::next(&n).is_some_and(|b| b.id() == p.base.id()) && n.driver().is_filter() {
                shared = shared | Perm::CONSISTENT_READ;
            }
            nodes.add(graph, "intermediate node", &n, Perm::NONE, shared)?;
        }
        nodes.add(graph, "base", &p.base, Perm::NONE, Perm::ALL)?;
        Ok::<_, BlockError>(())
    })();
    if let Err(e) = r {
        nodes.remove_all(graph);
        started.undo(control).await;
        return Err(e.into());
    }
    let mut base_perm = Perm::CONSISTENT_READ | Perm::WRITE;
    if base_len < top_len {
        base_perm = base_perm | Perm::RESIZE;
    }
    let base_root = Root::new(
        RootKind::Job,
        "",
        PermPair {
            perm: base_perm,
            shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        },
    );
    let top_root = Root::new(
        RootKind::Job,
        "",
        PermPair {
            perm: Perm::NONE,
            shared: Perm::ALL,
        },
    );
    let attach = graph
        .attach_root(&base_root, &p.base)
        .and_then(|()| graph.attach_root(&top_root, &p.top));
    if let Err(e) = attach {
        graph.detach_root(&base_root);
        nodes.remove_all(graph);
        started.undo(control).await;
        return Err(e.into());
    }
    let job = CommitJob {
        graph: graph.clone(),
        nodes,
        top: p.top.clone(),
        base: p.base.clone(),
        commit_top,
        top_root,
        base_root: Mutex::new(Some(base_root)),
        base_read_only,
        backing_file: p.backing_file,
        on_error: p.on_error,
        pace: Pace::default(),
    };
    let handle = match crate::create_job(jobs, &p.job_id, JobType::Commit, p.options, p.speed, job)
    {
        Ok(h) => h,
        Err((e, job)) => {
            job.release_all();
            started.undo(control).await;
            return Err(e);
        }
    };
    started.keep();
    handle.start();
    Ok(())
}

impl CommitJob {
    fn base_root(&self) -> Option<Arc<Root>> {
        self.base_root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn drop_base_root(&self) {
        let r = self
            .base_root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(r) = r {
            self.graph.detach_root(&r);
        }
    }

    /// Lets go of everything the job holds (a start that failed after the
    /// job's edges were made).
    fn release_all(&self) {
        self.drop_base_root();
        self.graph.detach_root(&self.top_root);
        self.nodes.remove_all(&self.graph);
    }

    async fn body(&self, ctx: &JobCtx) -> Result<(), String> {
        let len = self.top.length();
        ctx.set_remaining(len);
        let base = self.base_root().ok_or("the base is gone")?;
        if base.length() < len {
            let b = base.node().ok_or("the base is gone")?;
            b.truncate(len)
                .await
                .map_err(|e| blockd_core::error::strerror(&e))?;
        }
        let mut offset = 0;
        while offset < len {
            self.pace.wait(ctx).await;
            if ctx.is_cancelled() {
                break;
            }
            // Plan a few chunks ahead, then copy them concurrently.
            // Rate-limited, no more than a tenth of a second's worth (at
            // least one chunk) between two waits: at a low speed one chunk
            // per wait, as QEMU's commit_run copies.
            let speed = ctx.speed().max(0) as u64;
            let mut budget = if speed > 0 {
                (speed / 10).max(CHUNK)
            } else {
                u64::MAX
            };
            let mut plan = Vec::with_capacity(IN_FLIGHT);
            let mut o = offset;
            let mut planned = Ok(());
            while plan.len() < IN_FLIGHT && o < len && budget > 0 {
                match self.plan_chunk(o, CHUNK.min(len - o)).await {
                    Ok(seg) => {
                        o += seg.1;
                        if !matches!(seg.2, Chunk::Skip) {
                            budget = budget.saturating_sub(seg.1);
                        }
                        plan.push(seg);
                    }
                    Err(e) => {
                        planned = Err(e);
                        break;
                    }
                }
            }
            // Counted before it is copied: the bucket drains while the copy
            // runs, so the rate is the configured one.
            self.pace.account(
                plan.iter()
                    .filter(|s| !matches!(s.2, Chunk::Skip))
                    .map(|s| s.1)
                    .sum(),
            );
            let results =
                futures::future::join_all(plan.iter().map(|&seg| self.copy_chunk(&base, seg)))
                    .await;
            let mut retry = false;
            for (&(off, n, _), r) in plan.iter().zip(results) {
                match r {
                    Ok(_) => ctx.add_progress(n),
                    Err((read, e)) => match io_error(ctx, self.on_error, read, &e) {
                        OnIoError::Fail(m) => return Err(m),
                        OnIoError::Retry => {
                            offset = off;
                            retry = true;
                            break;
                        }
                        OnIoError::Skip => ctx.add_progress(n),
                    },
                }
                offset = off + n;
            }
            if retry {
                continue;
            }
            if let Err(e) = planned {
                // The allocation query itself failed at `offset`.
                match io_error(ctx, self.on_error, true, &e) {
                    OnIoError::Fail(m) => return Err(m),
                    OnIoError::Retry => {}
                    OnIoError::Skip => {
                        let n = CHUNK.min(len - offset);
                        ctx.add_progress(n);
                        offset += n;
                    }
                }
            }
        }
        Ok(())
    }

    /// What to do with the chunk at `offset` (at most `want` bytes): skip
    /// it (not allocated above the base), write zeroes (allocated as
    /// zeroes: the base stays sparse, QEMU's `commit_iteration`), or copy
    /// data. Returns the chunk's offset, length and kind.
    async fn plan_chunk(&self, offset: u64, want: u64) -> std::io::Result<(u64, u64, Chunk)> {
        let (alloc, n) =
            chain::is_allocated_above(&self.top, Some(&self.base), false, offset, want).await?;
        let n = n.clamp(1, want);
        if !alloc {
            return Ok((offset, n, Chunk::Skip));
        }
        let st = self.top_root.block_status(offset, n).await?;
        let n = st.len.clamp(1, n);
        let kind = if st.zero && !st.data {
            Chunk::Zero
        } else {
            Chunk::Data
        };
        Ok((offset, n, kind))
    }

    /// Copies one planned chunk; `Ok(true)` if it moved data, the error
    /// with whether it came from reading otherwise.
    async fn copy_chunk(
        &self,
        base: &Root,
        (offset, n, kind): (u64, u64, Chunk),
    ) -> Result<bool, (bool, std::io::Error)> {
        match kind {
            Chunk::Skip => Ok(false),
            Chunk::Zero => {
                let flags = blockd_core::ReqFlags {
                    may_unmap: true,
                    ..Default::default()
                };
                base.write_zeroes(offset, n, flags)
                    .await
                    .map(|()| true)
                    .map_err(|e| (false, e))
            }
            Chunk::Data => {
                let data = self
                    .top_root
                    .read(offset, n as usize)
                    .await
                    .map_err(|e| (true, e))?;
                base.write(offset, data, Default::default())
                    .await
                    .map(|()| true)
                    .map_err(|e| (false, e))
            }
        }
    }

    /// QEMU's `commit_prepare`: `bdrv_drop_intermediate`.
    async fn drop_intermediate(&self, control: &ControlGuard) -> Result<(), String> {
        self.drop_base_root();
        // The overlays whose backing file is the committed top.
        let overlays: Vec<Arc<BlockNode>> = self
            .commit_top
            .parents()
            .iter()
            .filter(|e| e.name() == "backing")
            .filter_map(|e| e.parent().and_then(|p| p.node()))
            .collect();
        self.graph
            .replace_node(control, &self.commit_top, &self.base)
            .await
            .map_err(|e| e.msg)?;
        let name = self
            .backing_file
            .clone()
            .unwrap_or_else(|| self.base.filename());
        let format = self.base.driver().format_name();
        for o in overlays {
            o.driver()
                .change_backing_file(Some(&name), Some(format))
                .await
                .map_err(|e| {
                    format!(
                        "Could not update backing file link for '{}': {}",
                        o.name(),
                        blockd_core::error::strerror(&e)
                    )
                })?;
        }
        close(self.graph.release(&self.commit_top)).await;
        Ok(())
    }

    /// QEMU's `commit_abort`: the filter leaves, the chain is as it was.
    async fn remove_filter(&self, control: &ControlGuard) {
        self.drop_base_root();
        self.nodes.remove_all(&self.graph);
        if self.graph.holds(&self.commit_top) {
            match self.graph.remove_filter(control, &self.commit_top).await {
                Ok(nodes) => close(nodes).await,
                Err(e) => tracing::error!(error = %e, "commit: removing commit_top"),
            }
        }
    }
}

impl JobDriver for CommitJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move { self.body(&ctx).await })
    }

    fn prepare<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a, Result<(), String>> {
        Box::pin(self.drop_intermediate(control))
    }

    fn abort<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(self.remove_filter(control))
    }

    fn clean<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(async move {
            self.graph.detach_root(&self.top_root);
            self.nodes.remove_all(&self.graph);
            if self.base_read_only {
                if let Err(e) =
                    blockd_drivers::reopen::set_read_only(&self.graph, control, &self.base, true)
                        .await
                {
                    tracing::warn!(error = %e, "commit: base back to read-only");
                }
            }
        })
    }
}
