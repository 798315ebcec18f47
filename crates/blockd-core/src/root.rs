//! Roots: the users of the graph from outside it (QEMU's `BlockBackend`
//! without the device parts, `block/block-backend.c`).
//!
//! ```text
//!   device backend ─┐
//!   NBD export ─────┼─► Root ──edge "root" (perm, shared)──► node ─► ...
//!   job ────────────┘    │
//!                        gate: quiesce count, requests in flight, FIFO of
//!                        requests waiting for a drained section to end
//! ```
//!
//! A root holds one edge to its root node (or none: an empty drive), with
//! the permissions it needs and shares, and is the one way requests enter
//! the graph from outside. Every request passes the root's **gate**: while
//! a drained section covers the root's node (see [`crate::drain`]), new
//! requests wait at the gate in arrival order; requests already in flight
//! finish; when the last section ends, the waiting requests are released
//! in order. Nothing is failed or lost.
//!
//! The node behind a root can be swapped ([`crate::BlockGraph::replace_node`],
//! inserting or removing a medium): a request already past the gate keeps
//! the node it started on, later ones see the new node.
//!
//! I/O limits are a property of the root too (QEMU's BlockBackend
//! throttling, `blk_io_limits_enable`): a root that is a member of a
//! throttle group ([`crate::throttle::group`]) passes its reads, writes and
//! write-zeroes through the group after the gate (discards and flushes are
//! not limited, as in QEMU). A drained section covering the root lifts the
//! limits while it lasts, so it never waits out the throttle.
//!
//! A root may **forward** for a node (QEMU's
//! `blk_set_disable_request_queuing` on a mirror job's target): requests
//! that the node issues through the root while serving its own parents'
//! requests (a mirror's write-blocking writes to its target). Those must
//! be able to finish for a drained section to begin, so the root does not
//! hold them at its gate; in exchange, a drained section that covers the
//! root also covers the forwarding node and everything above it (see
//! [`crate::drain`]), so none arrive while the section lasts.
//!
//! Write caching is a property of the root (QEMU's
//! `blk_set_enable_write_cache`): with the cache off, every write and
//! write-zeroes is sent with FUA, which drivers without native FUA turn
//! into a write followed by a flush. Device backends set it from
//! `write-cache`/`cache=`; exports from `writethrough`.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::driver::{BlockStatus, ReqFlags};
use crate::edge::ChildRef;
use crate::node::BlockNode;
use crate::perm::PermPair;
use crate::throttle::{Direction, ThrottleMember};

/// What kind of user a root serves (queries and `blockdev-del` tell them
/// apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKind {
    /// A block backend: a named drive or a device's backend.
    Backend,
    /// A block export.
    Export,
    /// A block job (or a job-like operation such as image creation).
    Job,
}

/// How permission errors name the root when it has no name of its own.
#[derive(Debug, Default)]
struct Desc {
    name: String,
    dev_id: Option<String>,
    /// A fixed description (a job's: `commit job 'c0'`).
    fixed: Option<String>,
}

/// The job a root belongs to, for the op-blocker message of nodes it holds.
#[derive(Debug, Clone)]
struct JobUse {
    job_type: String,
    job_id: String,
}

static NEXT_ROOT_ID: AtomicU64 = AtomicU64::new(1);

/// A root of the graph. See the [module docs](self).
pub struct Root {
    id: u64,
    kind: RootKind,
    desc: Mutex<Desc>,
    /// The name of the root's edge (`root`; a job's: `main node`,
    /// `intermediate node`, `base`, ...).
    edge_name: String,
    job: Option<JobUse>,
    edge: RwLock<Option<ChildRef>>,
    /// The permissions wanted on the root node (also kept without one).
    perm: Mutex<PermPair>,
    write_cache: AtomicBool,
    gate: Gate,
    /// Whether `throttle` is set (the request path's cheap check).
    throttled: AtomicBool,
    throttle: RwLock<Option<Arc<ThrottleMember>>>,
    /// The node this root forwards requests for (see the module docs).
    forwarder: RwLock<Option<Weak<BlockNode>>>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root")
            .field("kind", &self.kind)
            .field("desc", &self.describe())
            .field("node", &self.node().map(|n| n.name().to_string()))
            .finish()
    }
}

impl Root {
    /// A root without a node. `name` is a backend's name (empty otherwise).
    pub fn new(kind: RootKind, name: &str, perm: PermPair) -> Arc<Root> {
        Arc::new(Root {
            id: NEXT_ROOT_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            desc: Mutex::new(Desc {
                name: name.to_string(),
                ..Desc::default()
            }),
            edge_name: "root".to_string(),
            job: None,
            edge: RwLock::new(None),
            perm: Mutex::new(perm),
            write_cache: AtomicBool::new(true),
            gate: Gate::default(),
            throttled: AtomicBool::new(false),
            throttle: RwLock::new(None),
            forwarder: RwLock::new(None),
        })
    }

    /// A job's use of a node (QEMU's `block_job_add_bdrv`): permission
    /// errors name it after the job (`commit job 'c0'`), its edge is named
    /// `edge_name` (`main node`, `intermediate node`, `base`), and
    /// `blockdev-del` of the node is refused as busy with a job of
    /// `job_type`.
    pub fn for_job(job_type: &str, job_id: &str, edge_name: &str, perm: PermPair) -> Arc<Root> {
        let r = Root::new(RootKind::Job, "", perm);
        // Freshly made: nobody else holds it yet.
        let mut r = Arc::try_unwrap(r).unwrap_or_else(|_| unreachable!("fresh root"));
        r.edge_name = edge_name.to_string();
        r.job = Some(JobUse {
            job_type: job_type.to_string(),
            job_id: job_id.to_string(),
        });
        r.desc.get_mut().unwrap_or_else(|e| e.into_inner()).fixed =
            Some(format!("{job_type} job '{job_id}'"));
        Arc::new(r)
    }

    /// The type of the block job holding a node through this root (`None`
    /// for backends, exports and job-like users such as image creation).
    pub fn job_type(&self) -> Option<&str> {
        self.job.as_ref().map(|j| j.job_type.as_str())
    }

    /// The id of the block job holding a node through this root.
    pub fn job_id(&self) -> Option<&str> {
        self.job.as_ref().map(|j| j.job_id.as_str())
    }

    /// Unique id within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name of the root's edge (`root` unless a job's).
    pub fn edge_name(&self) -> &str {
        &self.edge_name
    }

    /// What the root serves.
    pub fn kind(&self) -> &RootKind {
        &self.kind
    }

    /// The backend name (empty for anonymous roots).
    pub fn name(&self) -> String {
        self.desc_lock().name.clone()
    }

    fn desc_lock(&self) -> MutexGuard<'_, Desc> {
        self.desc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the attached device's id (or path), which names an
    /// anonymous backend in permission errors.
    pub fn set_dev_id(&self, dev: Option<String>) {
        self.desc_lock().dev_id = dev;
    }

    /// How permission errors name the root (QEMU's
    /// `blk_root_get_parent_desc`).
    pub fn describe(&self) -> String {
        let d = self.desc_lock();
        if let Some(f) = &d.fixed {
            return f.clone();
        }
        if !d.name.is_empty() {
            return format!("block device '{}'", d.name);
        }
        match d.dev_id.as_deref() {
            Some(id) if !id.is_empty() => format!("block device '{id}'"),
            _ => "an unnamed block device".to_string(),
        }
    }

    /// The edge to the root node, if there is one.
    pub fn edge(&self) -> Option<ChildRef> {
        self.edge.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_edge(&self, e: Option<ChildRef>) -> Option<ChildRef> {
        std::mem::replace(
            &mut *self.edge.write().unwrap_or_else(|e| e.into_inner()),
            e,
        )
    }

    /// The root node, if any.
    pub fn node(&self) -> Option<Arc<BlockNode>> {
        self.edge
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.node())
    }

    /// The permissions the root wants on its node.
    pub fn perm(&self) -> PermPair {
        *self.perm.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn store_perm(&self, p: PermPair) {
        *self.perm.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Whether the write cache is on (else writes carry FUA).
    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    /// Turns the write cache on or off.
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::Relaxed);
    }

    /// The root node's length (0 without one).
    pub fn length(&self) -> u64 {
        self.node().map(|n| n.length()).unwrap_or(0)
    }

    /// The root's throttle group membership, if its I/O is limited.
    pub fn throttle(&self) -> Option<Arc<ThrottleMember>> {
        if !self.throttled.load(Ordering::Acquire) {
            return None;
        }
        self.throttle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes the root a member of a throttle group (or of none); returns
    /// the old membership, which has left its group (requests queued there
    /// go at once). A drained section already covering the root
    /// covers the new membership too.
    pub fn set_throttle(&self, m: Option<ThrottleMember>) -> Option<Arc<ThrottleMember>> {
        let m = m.map(Arc::new);
        let mut t = self.throttle.write().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = &m {
            for _ in 0..self.gate.quiesce.load(Ordering::SeqCst) {
                m.disable();
            }
        }
        self.throttled.store(m.is_some(), Ordering::Release);
        let old = std::mem::replace(&mut *t, m);
        if let Some(o) = &old {
            o.leave();
        }
        old
    }

    /// A drained section begins over the root: the gate closes and the
    /// limits stop applying (QEMU's `blk_root_drained_begin`).
    pub(crate) fn drained_begin(&self) {
        let t = self.throttle.read().unwrap_or_else(|e| e.into_inner());
        self.gate.quiesce_begin();
        if let Some(m) = &*t {
            m.disable();
        }
    }

    /// A drained section over the root ends: the limits apply again, then
    /// the requests held at the gate go.
    pub(crate) fn drained_end(&self) {
        {
            let t = self.throttle.read().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = &*t {
                m.enable();
            }
        }
        self.gate.quiesce_end();
    }

    async fn limit(&self, dir: Direction, bytes: u64) {
        if let Some(m) = self.throttle() {
            m.intercept(dir, bytes).await;
        }
    }

    /// The gate every request from this root passes.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Makes the root forward requests for `node` (or stop, with `None`):
    /// its requests no longer wait at the gate, and drained sections over
    /// the root also cover `node` and what is above it. See the
    /// [module docs](self).
    pub fn set_forwarder(&self, node: Option<&Arc<BlockNode>>) {
        *self.forwarder.write().unwrap_or_else(|e| e.into_inner()) = node.map(Arc::downgrade);
    }

    /// The node the root forwards requests for, if any.
    pub fn forwarder(&self) -> Option<Arc<BlockNode>> {
        self.forwarder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// Enters the gate and returns the node to issue the request to, or
    /// `ENOMEDIUM` without one. A forwarding root's requests are counted
    /// but never held.
    async fn enter(&self) -> io::Result<(InFlight<'_>, Arc<BlockNode>)> {
        let forwarding = self
            .forwarder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let g = if forwarding {
            self.gate.enter_unqueued()
        } else {
            self.gate.enter().await
        };
        match self.node() {
            Some(n) => Ok((g, n)),
            None => Err(io::Error::from_raw_os_error(libc::ENOMEDIUM)),
        }
    }

    fn flags(&self, flags: ReqFlags) -> ReqFlags {
        ReqFlags {
            fua: flags.fua || !self.write_cache(),
            ..flags
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let (_g, n) = self.enter().await?;
        self.limit(Direction::Read, len as u64).await;
        n.read(offset, len).await
    }

    /// Writes `data` at `offset` (with FUA if the write cache is off).
    pub async fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> io::Result<()> {
        let (_g, n) = self.enter().await?;
        self.limit(Direction::Write, data.len() as u64).await;
        n.write(offset, data, self.flags(flags)).await
    }

    /// Makes a range read as zeroes (with FUA if the write cache is off).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        let (_g, n) = self.enter().await?;
        self.limit(Direction::Write, len).await;
        n.write_zeroes(offset, len, self.flags(flags)).await
    }

    /// Discards a range.
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let (_g, n) = self.enter().await?;
        n.discard(offset, len).await
    }

    /// Flushes the root node.
    pub async fn flush(&self) -> io::Result<()> {
        let (_g, n) = self.enter().await?;
        n.flush().await
    }

    /// See [`crate::BlockDriver::start_writeback`].
    pub async fn start_writeback(&self) -> io::Result<()> {
        let (_g, n) = self.enter().await?;
        n.start_writeback().await
    }

    /// What a range holds.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let (_g, n) = self.enter().await?;
        n.block_status(offset, len).await
    }

    /// The allocation depth of a range (see [`BlockNode::allocation_depth`]).
    pub async fn allocation_depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let (_g, n) = self.enter().await?;
        n.allocation_depth(offset, len).await
    }
}

/// The quiesce gate of a root: counts requests in flight, and holds new
/// ones back while a drained section covers the root.
///
/// The fast path is two atomic operations and a load: a request counts
/// itself in flight, then checks that no section began; a section counts
/// itself, then waits for the in-flight count to drop to zero. Both use
/// sequentially consistent operations, so one of the two always sees the
/// other (a request that lost the race uncounts itself and queues).
#[derive(Default)]
pub struct Gate {
    quiesce: AtomicUsize,
    in_flight: AtomicUsize,
    /// Wakes a drained section waiting for the in-flight count to drop.
    idle: Notify,
    /// Requests waiting for the sections to end, in arrival order.
    waiting: Mutex<VecDeque<oneshot::Sender<()>>>,
}

/// A request counted in flight; leaving scope uncounts it.
pub struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Gate {
    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether a drained section covers the root.
    pub fn is_quiesced(&self) -> bool {
        self.quiesce.load(Ordering::SeqCst) > 0
    }

    /// Requests waiting at the gate.
    pub fn waiting(&self) -> usize {
        self.waiting_lock().len()
    }

    fn waiting_lock(&self) -> MutexGuard<'_, VecDeque<oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_enter(&self) -> Option<InFlight<'_>> {
        if self.quiesce.load(Ordering::SeqCst) == 0 {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.quiesce.load(Ordering::SeqCst) == 0 {
                return Some(InFlight(self));
            }
            // A section began meanwhile: step back out (and wake it).
            self.leave();
        }
        None
    }

    /// Enters: at once unless a drained section covers the root; then
    /// after it ends, in arrival order.
    pub async fn enter(&self) -> InFlight<'_> {
        loop {
            if let Some(g) = self.try_enter() {
                return g;
            }
            let rx = {
                let mut w = self.waiting_lock();
                // Checked under the queue lock: a section that ends takes
                // this lock after uncounting itself, so it either sees this
                // waiter or this check sees it gone.
                if self.quiesce.load(Ordering::SeqCst) == 0 {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                w.push_back(tx);
                rx
            };
            let _ = rx.await;
        }
    }

    /// Enters without waiting for drained sections to end (counted in
    /// flight all the same, so a section waits for the request).
    pub fn enter_unqueued(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.quiesce.load(Ordering::SeqCst) > 0
        {
            self.idle.notify_waiters();
        }
    }

    /// Begins a (possibly nested) drained section: no request enters
    /// until every section has ended.
    pub(crate) fn quiesce_begin(&self) {
        self.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until no request of this root is in flight.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends a drained section; the last one releases the waiting requests
    /// in the order they arrived.
    pub(crate) fn quiesce_end(&self) {
        if self.quiesce.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiting_lock());
        for w in waiters {
            let _ = w.send(());
        }
    }
}
