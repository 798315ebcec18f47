//! What every block job shares (QEMU's `blockjob.c`): the nodes it holds
//! through edges of its own, its pace (`speed`), its error policy, and
//! the final clean-up.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockd_core::qapi::{BlockErrorAction, BlockdevOnError, IoOperationType};
use blockd_core::throttle::LeakyBucket;
use blockd_core::{BlockError, BlockGraph, BlockNode, Perm, PermPair, Root};
use blockd_jobs::JobCtx;

/// The nodes a job holds (QEMU's `block_job_add_bdrv`): each through a
/// root of its own, which permission errors name after the job (`commit
/// job 'c0'`) and whose edge is named for its role (`intermediate node`,
/// `base`, `main node`).
pub struct JobNodes {
    job_type: &'static str,
    job_id: String,
    roots: Mutex<Vec<Arc<Root>>>,
}

impl JobNodes {
    /// No nodes yet, for the job `job_id` of `job_type`.
    pub fn new(job_type: &'static str, job_id: &str) -> JobNodes {
        JobNodes {
            job_type,
            job_id: job_id.to_string(),
            roots: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Root>>> {
        self.roots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `node` as `role` with `perm`, sharing `shared`; returns the
    /// root (the job may do I/O through it).
    pub fn add(
        &self,
        graph: &BlockGraph,
        role: &str,
        node: &Arc<BlockNode>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Arc<Root>, BlockError> {
        let r = Root::for_job(self.job_type, &self.job_id, role, PermPair { perm, shared });
        graph.attach_root(&r, node)?;
        self.lock().push(r.clone());
        Ok(r)
    }

    /// Lets go of one root.
    pub fn remove(&self, graph: &BlockGraph, root: &Root) {
        let mut v = self.lock();
        if let Some(i) = v.iter().position(|r| r.id() == root.id()) {
            let r = v.remove(i);
            drop(v);
            graph.detach_root(&r);
        }
    }

    /// Lets go of every node (QEMU's `block_job_remove_all_bdrv`).
    pub fn remove_all(&self, graph: &BlockGraph) {
        let all = std::mem::take(&mut *self.lock());
        for r in all.iter().rev() {
            graph.detach_root(r);
        }
    }
}

/// A job's pace: at most `speed` bytes per second of copied data (QEMU's
/// `block_job_ratelimit_*`), measured by a leaky bucket with a tenth of a
/// second of burst, so the average over any stretch of the job is the
/// configured rate (within that burst).
pub struct Pace {
    bucket: Mutex<LeakyBucket>,
    epoch: Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            bucket: Mutex::new(LeakyBucket::new(0, 0)),
            epoch: Instant::now(),
        }
    }
}

impl Pace {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn bucket(&self) -> MutexGuard<'_, LeakyBucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits as long as the rate asks (a pause point either way; returns
    /// early if the job is cancelled, paused or its speed raised, and
    /// then waits again for what is left).
    pub async fn wait(&self, ctx: &JobCtx) {
        loop {
            let speed = ctx.speed().max(0) as u64;
            let now = self.now();
            let wait = {
                let mut b = self.bucket();
                if b.avg() != speed {
                    // A tenth of a second of burst: a late wake-up (a busy
                    // machine) is made up for, so the rate holds on
                    // average; the bucket never lets more through.
                    if b.avg() == 0 || speed == 0 {
                        *b = LeakyBucket::new(speed, speed / 10);
                    } else {
                        // A new rate: what was copied still counts (QEMU's
                        // ratelimit_set_speed keeps what the slice
                        // dispatched), so lowering or raising the speed
                        // does not let a burst through.
                        b.set_avg(speed, now);
                        b.set_size(speed / 10);
                    }
                }
                b.wait_ns(now)
            };
            if wait == 0 || ctx.is_cancelled() {
                ctx.pause_point().await;
                return;
            }
            ctx.sleep(Duration::from_nanos(wait)).await;
        }
    }

    /// Records `bytes` copied.
    pub fn account(&self, bytes: u64) {
        let now = self.now();
        self.bucket().account(bytes, now);
    }
}

/// What an I/O error of a job's copy loop leads to (QEMU's
/// `block_job_error_action`, then the job's reaction).
pub enum OnIoError {
    /// Fail the job with this message.
    Fail(String),
    /// Try the same range again after the pause (`stop`).
    Retry,
    /// Skip it (`ignore`).
    Skip,
}

/// Applies `policy` to an error of a read (`source`) or write.
pub fn io_error(
    ctx: &JobCtx,
    policy: BlockdevOnError,
    read: bool,
    e: &std::io::Error,
) -> OnIoError {
    let op = if read {
        IoOperationType::Read
    } else {
        IoOperationType::Write
    };
    let enospc = e.raw_os_error() == Some(libc::ENOSPC);
    match ctx.error_action(policy, op, enospc) {
        BlockErrorAction::Report => Fail(blockd_core::error::strerror(e)),
        BlockErrorAction::Stop => OnIoError::Retry,
        BlockErrorAction::Ignore => OnIoError::Skip,
    }
}

use OnIoError::Fail;

/// Copied bytes between two background flushes of a job's target. 16 MiB
/// keeps the disk busy from early on and leaves little for the final
/// flush: a 1 GiB mirror, half allocated, took 0.309 s with 16 MiB and
/// 0.336 s with 64 MiB (medians of 8 alternating rounds).
const WRITEBACK_BYTES: u64 = 16 << 20;

type FlushFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Flushes a job's target in the background while the copy goes on, one
/// flush at a time, every [`WRITEBACK_BYTES`] copied: the page cache the
/// copy fills is written back meanwhile instead of all at the job's final
/// flush (or the base's reopen read-only), which otherwise waits for all
/// of it at once. Errors are not reported here: the final flush reports
/// them. QEMU has no equivalent; its jobs leave writeback to the kernel.
#[derive(Default)]
pub struct Writeback<'a> {
    flush: Option<FlushFuture<'a>>,
    unflushed: u64,
}

impl<'a> Writeback<'a> {
    /// Runs `work` while the flush in flight (if any) goes on.
    pub async fn alongside<F: std::future::Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            match self.flush.as_mut() {
                Some(f) => tokio::select! {
                    r = &mut work => return r,
                    () = f => self.flush = None,
                },
                None => return work.await,
            }
        }
    }

    /// Counts `n` copied bytes; past the threshold, with no flush in
    /// flight, starts a flush of `root` (entering `gate` first, where the
    /// root forwards for a node and holds nothing back itself).
    pub fn copied(&mut self, n: u64, root: &'a Arc<Root>, gate: Option<&'a Arc<Root>>) {
        self.unflushed += n;
        if self.unflushed >= WRITEBACK_BYTES && self.flush.is_none() {
            self.unflushed = 0;
            self.flush = Some(Box::pin(async move {
                let _g = match gate {
                    Some(g) => Some(g.gate().enter().await),
                    None => None,
                };
                let _ = root.start_writeback().await;
            }));
        }
    }

    /// Waits for the flush in flight, if any.
    pub async fn finish(&mut self) {
        if let Some(f) = self.flush.take() {
            f.await;
        }
    }
}
