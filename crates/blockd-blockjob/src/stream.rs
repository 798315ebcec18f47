//! Stream (QEMU's `block/stream.c`): what the backing chain of `bs` holds
//! above `base` is copied up into `bs`, then `bs`'s backing child becomes
//! `base` (or none) and its header names `base`'s file (or none).
//!
//! A `copy-on-read` filter sits above `bs` while the job runs, so clients'
//! reads copy too; the job's own copies are copy-on-read requests on `bs`,
//! each a serialising request over whole clusters, so a client's write to
//! the same clusters never races with a copy. The intermediate nodes are
//! held without letting anyone else write them: the job reads every block
//! once and counts on it not changing.

use std::sync::Arc;

use blockd_core::qapi::BlockdevOnError;
use blockd_core::{chain, BlockError, BlockGraph, BlockNode, ControlGuard, Perm, Root};
use blockd_jobs::{FinalizeFuture, JobCtx, JobDriver, JobFuture, JobManager, JobOptions, JobType};

use crate::common::{io_error, JobNodes, OnIoError, Pace};
use crate::filters::{filter_node, CopyOnRead};
use crate::{close, StartError, Started};

/// Bytes copied per step (QEMU's `STREAM_CHUNK`).
pub const CHUNK: u64 = 512 * 1024;

/// What a stream needs, resolved by the caller.
pub struct StreamParams {
    /// The job id.
    pub job_id: String,
    /// The node the data is copied into (`device`).
    pub bs: Arc<BlockNode>,
    /// The node that stays as the new backing file (`None`: the whole
    /// chain is copied and `bs` ends up without one).
    pub base: Option<Arc<BlockNode>>,
    /// What `bs`'s header names as its new backing file.
    pub backing_file: Option<String>,
    /// Bytes per second (0: unlimited).
    pub speed: i64,
    /// Error policy.
    pub on_error: BlockdevOnError,
    /// The name of the `copy-on-read` node.
    pub filter_node_name: Option<String>,
    /// auto-finalize / auto-dismiss.
    pub options: JobOptions,
}

struct StreamJob {
    graph: Arc<BlockGraph>,
    nodes: JobNodes,
    bs: Arc<BlockNode>,
    base: Option<Arc<BlockNode>>,
    cor: Arc<BlockNode>,
    main: Arc<Root>,
    bs_read_only: bool,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    pace: Pace,
}

/// Starts a stream (QEMU's `stream_start`).
pub async fn start(
    jobs: &JobManager,
    graph: &Arc<BlockGraph>,
    control: &ControlGuard,
    p: StreamParams,
) -> Result<(), StartError> {
    let mut started = Started::new(graph.clone());
    let bs_read_only = p.bs.read_only();
    if bs_read_only {
        blockd_drivers::reopen::set_read_only(graph, control, &p.bs, false).await?;
        started.base_was_read_only(p.bs.clone());
    }
    let (name, auto) = match crate::filter_name(graph, p.filter_node_name) {
        Ok(n) => n,
        Err(e) => {
            started.undo(control).await;
            return Err(e.into());
        }
    };
    let cor = filter_node(name, auto, &p.bs, "file", |child| {
        Box::new(CopyOnRead { child })
    });
    if let Err(e) = graph.append(control, &cor, &p.bs).await {
        started.undo(control).await;
        return Err(e.into());
    }
    started.filter(cor.clone());
    let nodes = JobNodes::new("stream", &p.job_id);
    let basic = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
    let r = (|| {
        let main = nodes.add(graph, "main node", &cor, basic, basic | Perm::WRITE)?;
        // No other job may change the graph here, nor anyone resize `bs`
        // (QEMU's "active node").
        nodes.add(graph, "active node", &p.bs, Perm::NONE, basic | Perm::WRITE)?;
        for n in chain::nodes(&p.bs).into_iter().skip(1) {
            if p.base.as_ref().is_some_and(|b| b.id() == n.id()) {
                break;
            }
            nodes.add(graph, "intermediate node", &n, Perm::NONE, basic)?;
        }
        Ok::<_, BlockError>(main)
    })();
    let main = match r {
        Ok(m) => m,
        Err(e) => {
            nodes.remove_all(graph);
            started.undo(control).await;
            return Err(e.into());
        }
    };
    let job = StreamJob {
        graph: graph.clone(),
        nodes,
        bs: p.bs.clone(),
        base: p.base,
        cor,
        main,
        bs_read_only,
        backing_file: p.backing_file,
        on_error: p.on_error,
        pace: Pace::default(),
    };
    let handle = match crate::create_job(jobs, &p.job_id, JobType::Stream, p.options, p.speed, job)
    {
        Ok(h) => h,
        Err((e, job)) => {
            job.nodes.remove_all(&job.graph);
            started.undo(control).await;
            return Err(e);
        }
    };
    started.keep();
    handle.start();
    Ok(())
}

impl StreamJob {
    async fn body(&self, ctx: &JobCtx) -> Result<(), String> {
        let Some(below) = self.bs.backing() else {
            return Ok(());
        };
        if self.base.as_ref().is_some_and(|b| b.id() == below.id()) {
            // Nothing between bs and base.
            return Ok(());
        }
        let len = self.bs.length();
        ctx.set_remaining(len);
        let mut first_error = None;
        let mut offset = 0;
        while offset < len {
            self.pace.wait(ctx).await;
            if ctx.is_cancelled() {
                break;
            }
            let want = CHUNK.min(len - offset);
            // Allocated in bs itself: nothing to copy. Else, whatever the
            // chain above base allocates there.
            let r = async {
                let st = self.bs.block_status(offset, want).await?;
                if st.allocated {
                    return Ok((false, st.len));
                }
                chain::is_allocated_above(&below, self.base.as_deref(), false, offset, st.len).await
            }
            .await;
            let (copy, n) = match r {
                Ok((c, n)) => (c, n.clamp(1, want)),
                Err(e) => match io_error(ctx, self.on_error, true, &e) {
                    OnIoError::Fail(m) => return Err(m),
                    OnIoError::Retry => continue,
                    OnIoError::Skip => (false, want),
                },
            };
            if copy {
                // Counted before it is copied: the bucket drains while the
                // copy runs, so the rate is the configured one.
                self.pace.account(n);
                // Through the job's root: drained sections hold the job too.
                let gate = self.main.gate().enter().await;
                let r = self.bs.copy_on_read(offset, n).await;
                drop(gate);
                match r {
                    Ok(_) => {}
                    Err(e) => match io_error(ctx, self.on_error, true, &e) {
                        OnIoError::Fail(m) => {
                            first_error.get_or_insert(m);
                            break;
                        }
                        OnIoError::Retry => continue,
                        OnIoError::Skip => {
                            // Do not cut the chain over an error left behind.
                            first_error.get_or_insert(blockd_core::error::strerror(&e));
                        }
                    },
                }
            }
            ctx.add_progress(n);
            offset += n;
        }
        match first_error {
            Some(m) => Err(m),
            None => Ok(()),
        }
    }

    /// QEMU's `stream_prepare`: the new backing child, and the header.
    async fn cut(&self, control: &ControlGuard) -> Result<(), String> {
        if self.bs.backing().is_none() {
            return Ok(());
        }
        self.nodes.remove_all(&self.graph);
        crate::set_backing(&self.graph, control, &self.bs, self.base.clone()).await?;
        let (name, fmt) = match &self.base {
            Some(b) => (
                Some(self.backing_file.clone().unwrap_or_else(|| b.filename())),
                Some(b.driver().format_name()),
            ),
            None => (None, None),
        };
        self.bs
            .driver()
            .change_backing_file(name.as_deref(), fmt)
            .await
            .map_err(|e| {
                format!(
                    "Could not update backing file link: {}",
                    blockd_core::error::strerror(&e)
                )
            })
    }
}

impl JobDriver for StreamJob {
    fn run(&self, ctx: JobCtx) -> JobFuture<'_> {
        Box::pin(async move { self.body(&ctx).await })
    }

    fn prepare<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a, Result<(), String>> {
        Box::pin(self.cut(control))
    }

    fn clean<'a>(&'a self, control: &'a ControlGuard) -> FinalizeFuture<'a> {
        Box::pin(async move {
            self.nodes.remove_all(&self.graph);
            let _ = &self.main;
            if self.graph.holds(&self.cor) {
                match self.graph.remove_filter(control, &self.cor).await {
                    Ok(nodes) => close(nodes).await,
                    Err(e) => tracing::error!(error = %e, "stream: removing copy-on-read"),
                }
            }
            if self.bs_read_only {
                if let Err(e) =
                    blockd_drivers::reopen::set_read_only(&self.graph, control, &self.bs, true)
                        .await
                {
                    tracing::warn!(error = %e, "stream: back to read-only");
                }
            }
        })
    }
}
