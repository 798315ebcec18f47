//! A node of the block graph and its request path (QEMU's `block/io.c`).
//!
//! [`BlockNode`] wraps a driver with what every driver relies on: bounds,
//! alignment padding with read-modify-write, serialisation of overlapping
//! requests that need it, `detect-zeroes`, read-only enforcement and
//! statistics. Drivers see only aligned requests within their length.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::{Bytes, BytesMut};

use crate::dirty::NodeBitmaps;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, ReqFlags};
use crate::edge::{Child, ChildRef, Children, Parent};
use crate::perm::PermPair;
use crate::tracked::Tracker;

/// `detect-zeroes`: how writes of all-zero buffers are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u16)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// Turned into write-zeroes.
    On,
    /// Turned into write-zeroes that may unmap (if `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Options every node has (`BlockdevOptions` base members).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// Writes are refused.
    pub read_only: bool,
    /// Opened read-only because it could not be opened read-write.
    pub auto_read_only: bool,
    /// Zero detection for writes.
    pub detect_zeroes: DetectZeroes,
    /// Discard requests are passed down (`discard=unmap`) rather than ignored.
    pub discard_unmap: bool,
    /// O_DIRECT (`cache.direct`).
    pub cache_direct: bool,
    /// Flushes are ignored (`cache.no-flush`).
    pub cache_no_flush: bool,
    /// Other processes' locks are not checked (`force-share`, read-only only).
    pub force_share: bool,
}

/// Bits of the packed [`NodeOptions`] that the request path tests
/// directly (one load, no unpacking).
mod bits {
    pub const READ_ONLY: u16 = 1;
    pub const AUTO_READ_ONLY: u16 = 1 << 1;
    pub const DZ_SHIFT: u16 = 2;
    pub const DZ_MASK: u16 = 3 << DZ_SHIFT;
    pub const DZ_UNMAP: u16 = 2 << DZ_SHIFT;
    pub const DISCARD_UNMAP: u16 = 1 << 4;
    pub const CACHE_DIRECT: u16 = 1 << 5;
    pub const NO_FLUSH: u16 = 1 << 6;
    pub const FORCE_SHARE: u16 = 1 << 7;
}

impl NodeOptions {
    fn pack(self) -> u16 {
        let flag = |on: bool, b: u16| if on { b } else { 0 };
        flag(self.read_only, bits::READ_ONLY)
            | flag(self.auto_read_only, bits::AUTO_READ_ONLY)
            | (self.detect_zeroes as u16) << bits::DZ_SHIFT
            | flag(self.discard_unmap, bits::DISCARD_UNMAP)
            | flag(self.cache_direct, bits::CACHE_DIRECT)
            | flag(self.cache_no_flush, bits::NO_FLUSH)
            | flag(self.force_share, bits::FORCE_SHARE)
    }

    fn unpack(b: u16) -> NodeOptions {
        NodeOptions {
            read_only: b & bits::READ_ONLY != 0,
            auto_read_only: b & bits::AUTO_READ_ONLY != 0,
            detect_zeroes: match (b & bits::DZ_MASK) >> bits::DZ_SHIFT {
                0 => DetectZeroes::Off,
                1 => DetectZeroes::On,
                _ => DetectZeroes::Unmap,
            },
            discard_unmap: b & bits::DISCARD_UNMAP != 0,
            cache_direct: b & bits::CACHE_DIRECT != 0,
            cache_no_flush: b & bits::NO_FLUSH != 0,
            force_share: b & bits::FORCE_SHARE != 0,
        }
    }
}

/// Which of a node's [`NodeOptions`] were given for it rather than taken
/// from its parent (QEMU's `explicit_options`): a reopen of the parent
/// changes only the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExplicitOptions {
    /// `read-only` was given.
    pub read_only: bool,
    /// `auto-read-only` was given.
    pub auto_read_only: bool,
    /// `cache.direct` was given.
    pub cache_direct: bool,
    /// `cache.no-flush` was given.
    pub cache_no_flush: bool,
    /// `force-share` was given.
    pub force_share: bool,
    /// `discard` was given.
    pub discard: bool,
}

/// I/O statistics of a node (`BlockDeviceStats`): request counts only.
/// Latency is timed at the device (BlockBackend) level, where QEMU keeps
/// all of its accounting; timing every layer would cost two clock reads
/// per node per request.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read.
    pub rd_bytes: AtomicU64,
    /// Bytes written.
    pub wr_bytes: AtomicU64,
    /// Bytes zeroed.
    pub zone_bytes: AtomicU64,
    /// Read requests.
    pub rd_operations: AtomicU64,
    /// Write requests (including write-zeroes).
    pub wr_operations: AtomicU64,
    /// Flushes.
    pub flush_operations: AtomicU64,
    /// Discards.
    pub unmap_operations: AtomicU64,
    /// Bytes discarded.
    pub unmap_bytes: AtomicU64,
    /// Failed reads.
    pub failed_rd_operations: AtomicU64,
    /// Failed writes.
    pub failed_wr_operations: AtomicU64,
    /// Failed flushes.
    pub failed_flush_operations: AtomicU64,
    /// Failed discards.
    pub failed_unmap_operations: AtomicU64,
    /// End of the highest write.
    pub wr_highest_offset: AtomicU64,
}

static NEXT_NODE_ID: AtomicU64 = AtomicU64::new(1);

/// A node of the block graph: a driver, its children, its users (parents)
/// and the request path around the driver. Ownership is described in
/// [`crate::edge`].
pub struct BlockNode {
    id: u64,
    name: String,
    auto_named: bool,
    /// [`NodeOptions`], packed: read on every request, changed by reopen.
    opts: AtomicU16,
    explicit: ExplicitOptions,
    driver: Box<dyn BlockDriver>,
    children: Arc<Children>,
    tracker: Tracker,
    /// Back-edges: the edges of the node's parents (nodes and roots).
    parents: Mutex<Vec<Weak<Child>>>,
    cumulative: Mutex<PermPair>,
    /// The options the node was opened (or last reopened) with, as the
    /// layer that parses options keeps them (QEMU's `bs->options`); the
    /// core does not interpret them.
    open_options: Mutex<serde_json::Value>,
    /// Named dirty bitmaps, marked by every write that reaches the node.
    dirty: Arc<NodeBitmaps>,
    /// Statistics.
    pub stats: Stats,
    pub(crate) threshold: crate::threshold::WriteThreshold,
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver.format_name())
            .finish()
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Largest request the layer accepts (QEMU's `BDRV_REQUEST_MAX_BYTES`).
pub const MAX_REQUEST: u64 = i32::MAX as u64 & !511;

impl BlockNode {
    /// A node without children around an opened driver.
    pub fn new(
        name: String,
        auto_named: bool,
        opts: NodeOptions,
        driver: Box<dyn BlockDriver>,
    ) -> Self {
        Self::build(
            name,
            auto_named,
            opts,
            ExplicitOptions::default(),
            driver,
            Children::new(),
        )
    }

    fn build(
        name: String,
        auto_named: bool,
        opts: NodeOptions,
        explicit: ExplicitOptions,
        driver: Box<dyn BlockDriver>,
        children: Arc<Children>,
    ) -> Self {
        BlockNode {
            id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
            name,
            auto_named,
            opts: AtomicU16::new(opts.pack()),
            explicit,
            driver,
            children,
            tracker: Tracker::default(),
            parents: Mutex::new(Vec::new()),
            cumulative: Mutex::new(PermPair::FREE),
            open_options: Mutex::new(serde_json::Value::Null),
            dirty: Arc::new(NodeBitmaps::default()),
            stats: Stats::default(),
            threshold: Default::default(),
        }
    }

    /// A node around an opened driver and the children it was opened with
    /// (the list the driver shares); each child edge gets this node as its
    /// parent. The edges are linked into their child nodes when the graph
    /// inserts the node.
    pub fn with_children(
        name: String,
        auto_named: bool,
        opts: NodeOptions,
        explicit: ExplicitOptions,
        driver: Box<dyn BlockDriver>,
        children: Arc<Children>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<BlockNode>| {
            for c in children.all() {
                c.set_parent(Parent::Node(me.clone()));
            }
            Self::build(name, auto_named, opts, explicit, driver, children)
        })
    }

    /// Unique id within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node-name (`#blockN` when generated).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated.
    pub fn auto_named(&self) -> bool {
        self.auto_named
    }

    /// The node options (as they are now; reopen changes them).
    pub fn options(&self) -> NodeOptions {
        NodeOptions::unpack(self.opts.load(Ordering::Acquire))
    }

    /// Changes the node options (reopen commits, inside a drained section).
    pub(crate) fn set_options(&self, o: NodeOptions) {
        self.opts.store(o.pack(), Ordering::Release);
    }

    /// The options the node was opened or last reopened with (see the
    /// field).
    pub fn open_options(&self) -> serde_json::Value {
        self.open_options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the options the node was opened or reopened with.
    pub fn set_open_options(&self, v: serde_json::Value) {
        *self.open_options.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Which options were given for the node rather than inherited.
    pub fn explicit_options(&self) -> ExplicitOptions {
        self.explicit
    }

    /// Whether writes are refused.
    #[inline]
    pub fn read_only(&self) -> bool {
        self.bits() & bits::READ_ONLY != 0
    }

    /// The packed options, for the request path's tests.
    #[inline]
    fn bits(&self) -> u16 {
        self.opts.load(Ordering::Acquire)
    }

    /// The node's named dirty bitmaps.
    pub fn dirty_bitmaps(&self) -> &NodeBitmaps {
        &self.dirty
    }

    /// Takes the persistent bitmaps the driver read at open into the
    /// node's named bitmaps, and lets the driver store them at close
    /// (QEMU's `qcow2_load_dirty_bitmaps` at open and
    /// `qcow2_store_persistent_dirty_bitmaps` at close). Once, after the
    /// node is made; see [`crate::dirty::attach_persistent`].
    pub fn attach_persistent_bitmaps(&self) {
        crate::dirty::attach_persistent(self, &self.dirty);
    }

    /// Marks a finished write of `[offset, offset + len)` in the dirty
    /// bitmaps, padded to the request alignment as the driver saw it
    /// (QEMU's `bdrv_co_write_req_finish`, which marks even when the
    /// request failed).
    #[inline]
    fn mark_written(&self, offset: u64, len: u64) {
        if !self.dirty.is_empty() {
            let a = self.alignment();
            let start = align_down(offset, a);
            self.dirty.mark(start, align_up(offset + len, a) - start);
        }
    }

    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    /// The child edges, primary first.
    pub fn children(&self) -> Vec<ChildRef> {
        self.children.all()
    }

    /// The child list the core holds (and the driver shares).
    pub fn child_list(&self) -> &Arc<Children> {
        &self.children
    }

    /// The child edge with role name `name`.
    pub fn child(&self, name: &str) -> Option<ChildRef> {
        self.children.get(name)
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        self.children.node("backing")
    }

    /// The edges through which this node is used (its parents' edges),
    /// newest first, as QEMU's parent list: permission conflicts and
    /// op blockers name the newest user.
    pub fn parents(&self) -> Vec<ChildRef> {
        self.parents_lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    pub(crate) fn parents_lock(&self) -> MutexGuard<'_, Vec<Weak<Child>>> {
        self.parents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Links a parent's edge (which points at this node) as a back-edge,
    /// first among the parents (QEMU's QLIST_INSERT_HEAD).
    pub(crate) fn link_parent(&self, c: &ChildRef) {
        let mut p = self.parents_lock();
        p.retain(|w| w.strong_count() > 0);
        p.insert(0, Arc::downgrade(c));
    }

    /// Unlinks a parent's edge.
    pub(crate) fn unlink_parent(&self, c: &Child) {
        self.parents_lock()
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), c));
    }

    /// Cumulative permissions of all users.
    pub fn cumulative_perm(&self) -> PermPair {
        *self.cumulative.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_cumulative(&self, p: PermPair) {
        *self.cumulative.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Current length in bytes.
    pub fn length(&self) -> u64 {
        self.driver.length()
    }

    /// The file name queries show: the driver's own, else the primary
    /// (first) child's.
    pub fn filename(&self) -> String {
        if let Some(f) = self.driver.filename() {
            return f;
        }
        match self.children.first() {
            Some(c) => c.node().filename(),
            None => String::new(),
        }
    }

    /// Disk space used (`actual-size`): the driver's, else the primary child's.
    pub fn allocated_size(&self) -> Option<u64> {
        if let Some(s) = self.driver.allocated_size() {
            return Some(s);
        }
        self.children
            .first()
            .and_then(|c| c.node().allocated_size())
    }

    fn alignment(&self) -> u64 {
        u64::from(self.driver.limits().request_alignment.max(1))
    }

    /// Waits until no request is in flight on this node.
    pub async fn drain(&self) {
        self.tracker.drain().await
    }

    /// Reads `len` bytes at `offset`. Bytes beyond the end read as zeroes.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let r = self.read_inner(offset, len).await;
        let s = &self.stats;
        match &r {
            Ok(_) => {
                s.rd_operations.fetch_add(1, Ordering::Relaxed);
                s.rd_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(_) => {
                s.failed_rd_operations.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    async fn read_inner(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len64 = len as u64;
        if len64 > MAX_REQUEST || offset.checked_add(len64).is_none() {
            return Err(einval());
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let size = self.length();
        if offset >= size {
            return Ok(Bytes::from(vec![0u8; len]));
        }
        let in_bounds = (size - offset).min(len64);
        let data = self.read_aligned(offset, in_bounds).await?;
        if in_bounds == len64 {
            return Ok(data);
        }
        let mut b = BytesMut::with_capacity(len);
        b.extend_from_slice(&data);
        b.resize(len, 0);
        Ok(b.freeze())
    }

    /// Reads an in-bounds range, padding it to the driver's alignment.
    async fn read_aligned(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        let a = self.alignment();
        let start = align_down(offset, a);
        let end = align_up(offset + len, a);
        let _t = self.tracker.begin(start, end, false).await;
        let data = self.driver_read_split(start, end - start).await?;
        if start == offset && end - start == len {
            // Nothing padded: pass the buffer up as it is (slicing would
            // make a Vec-backed `Bytes` allocate a shared header).
            return Ok(data);
        }
        let skip = (offset - start) as usize;
        Ok(data.slice(skip..skip + len as usize))
    }

    /// Reads an aligned range from the driver, split by `max_transfer`; the
    /// part beyond the driver's length (padding) reads as zeroes. The
    /// common case (one request, all readable) is the driver's own future,
    /// adding nothing to the caller's.
    fn driver_read_split(&self, offset: u64, len: u64) -> IoFuture<'_, Bytes> {
        let size = self.driver.length();
        let a = self.alignment();
        let readable = if offset >= size {
            0
        } else {
            align_up(size.min(offset + len), a).min(offset + len) - offset
        };
        let max = match self.driver.limits().max_transfer {
            0 => u64::MAX,
            m => u64::from(m),
        };
        if readable == len && len <= max {
            return self.driver.read(offset, len as usize);
        }
        Box::pin(async move {
            let mut out = BytesMut::with_capacity(len as usize);
            let mut done = 0;
            while done < readable {
                let n = (readable - done).min(max);
                let part = self.driver.read(offset + done, n as usize).await?;
                out.extend_from_slice(&part);
                done += n;
            }
            out.resize(len as usize, 0);
            Ok(out.freeze())
        })
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if len > MAX_REQUEST || offset.checked_add(len).is_none() {
            return Err(einval());
        }
        Ok(())
    }

    fn account_write(&self, offset: u64, len: u64, ok: bool) {
        let s = &self.stats;
        if ok {
            s.wr_operations.fetch_add(1, Ordering::Relaxed);
            s.wr_bytes.fetch_add(len, Ordering::Relaxed);
            // Most writes are not the highest: a plain load spares them
            // the compare-and-swap loop of `fetch_max`.
            let end = offset + len;
            if end > s.wr_highest_offset.load(Ordering::Relaxed) {
                s.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
            }
        } else {
            s.failed_wr_operations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The write threshold check of a write or write-zeroes, on the range
    /// padded to the alignment as QEMU's aligned request has it.
    fn check_threshold(&self, offset: u64, len: u64) {
        if self.threshold.get() != 0 {
            let end = align_up(offset + len, self.alignment());
            self.threshold.check(&self.name, end);
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.check_threshold(offset, len);
        let b = self.bits();
        let r = if b & bits::DZ_MASK != 0 && is_zero(&data) {
            let unmap = b & bits::DZ_MASK == bits::DZ_UNMAP && b & bits::DISCARD_UNMAP != 0;
            let zflags = ReqFlags {
                may_unmap: unmap,
                ..flags
            };
            // Boxed: a rare path that would otherwise make every write's
            // future (moved whole through each layer) several times larger.
            Box::pin(self.zeroes_inner(offset, len, zflags)).await
        } else {
            self.write_inner(offset, data, flags).await
        };
        self.mark_written(offset, len);
        self.account_write(offset, len, r.is_ok());
        r
    }

    async fn write_inner(&self, offset: u64, data: Bytes, flags: ReqFlags) -> io::Result<()> {
        let a = self.alignment();
        let len = data.len() as u64;
        let start = align_down(offset, a);
        let end = align_up(offset + len, a);
        if start == offset && end == offset + len {
            let _t = self.tracker.begin(start, end, false).await;
            return self.driver_write_split(offset, data, flags).await;
        }
        // Boxed, as the rare path: see `write`.
        Box::pin(self.write_rmw(offset, data, flags, a, start, end)).await
    }

    /// Read-modify-write of the partial head and tail blocks of the write
    /// at `offset`, padded to `[start, end)` at alignment `a`; no other
    /// request may touch these blocks meanwhile.
    async fn write_rmw(
        &self,
        offset: u64,
        data: Bytes,
        flags: ReqFlags,
        a: u64,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let len = data.len() as u64;
        let _t = self.tracker.begin(start, end, true).await;
        let mut buf = BytesMut::with_capacity((end - start) as usize);
        let head = offset - start;
        let mut head_block = None;
        if head > 0 {
            let h = self.driver_read_split(start, a).await?;
            buf.extend_from_slice(&h[..head as usize]);
            head_block = Some(h);
        }
        buf.extend_from_slice(&data);
        let tail_start = offset + len;
        if tail_start < end {
            let block = align_down(tail_start, a);
            let t = match head_block {
                // Head and tail in the same block: it was read already.
                Some(h) if block == start => h,
                _ => self.driver_read_split(block, a).await?,
            };
            buf.extend_from_slice(&t[(tail_start - block) as usize..]);
        }
        self.driver_write_split(start, buf.freeze(), flags).await
    }

    /// Writes an aligned range to the driver, split by `max_transfer` (the
    /// common case is the driver's own future, as for reads).
    fn driver_write_split(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        let max = match self.driver.limits().max_transfer {
            0 => u64::MAX,
            m => u64::from(m),
        };
        let len = data.len() as u64;
        if len <= max {
            return self.driver.write(offset, data, flags);
        }
        Box::pin(async move {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(max);
                let part = data.slice(done as usize..(done + n) as usize);
                self.driver.write(offset + done, part, flags).await?;
                done += n;
            }
            Ok(())
        })
    }

    /// Makes a range read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let flags = ReqFlags {
            may_unmap: flags.may_unmap && self.bits() & bits::DISCARD_UNMAP != 0,
            ..flags
        };
        self.check_threshold(offset, len);
        let r = self.zeroes_inner(offset, len, flags).await;
        self.mark_written(offset, len);
        self.account_write(offset, len, r.is_ok());
        if r.is_ok() {
            self.stats.zone_bytes.fetch_add(0, Ordering::Relaxed);
        }
        r
    }

    async fn zeroes_inner(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        let a = self.alignment();
        let start = align_up(offset, a);
        let end = align_down(offset + len, a);
        if end <= start {
            // Entirely inside one block: an ordinary padded write.
            let zero = Bytes::from(vec![0u8; len as usize]);
            return self.write_inner(offset, zero, flags).await;
        }
        if start > offset {
            let zero = Bytes::from(vec![0u8; (start - offset) as usize]);
            self.write_inner(offset, zero, flags).await?;
        }
        {
            let _t = self.tracker.begin(start, end, false).await;
            let max = match self.driver.limits().max_transfer {
                0 => end - start,
                m => align_down(u64::from(m), a).max(a),
            };
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(max);
                self.driver.write_zeroes(pos, n, flags).await?;
                pos += n;
            }
        }
        if offset + len > end {
            let zero = Bytes::from(vec![0u8; (offset + len - end) as usize]);
            self.write_inner(end, zero, flags).await?;
        }
        Ok(())
    }

    /// Discards a range (ignored unless `discard=unmap`).
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)?;
        if self.bits() & bits::DISCARD_UNMAP == 0 || len == 0 {
            return Ok(());
        }
        self.threshold.check(&self.name, offset + len);
        // Only whole aligned blocks can be discarded; the rest is left alone.
        let a = self
            .alignment()
            .max(u64::from(self.driver.limits().pdiscard_alignment.max(1)));
        let start = align_up(offset, a);
        let end = align_down(offset + len, a);
        let r = if end > start {
            let _t = self.tracker.begin(start, end, false).await;
            self.driver.discard(start, end - start).await
        } else {
            Ok(())
        };
        // The whole request, as QEMU's bdrv_co_pdiscard marks it.
        self.dirty.mark(offset, len);
        let s = &self.stats;
        match &r {
            Ok(()) => {
                s.unmap_operations.fetch_add(1, Ordering::Relaxed);
                s.unmap_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(_) => {
                s.failed_unmap_operations.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// See [`BlockDriver::start_writeback`].
    pub async fn start_writeback(&self) -> io::Result<()> {
        self.driver.start_writeback().await
    }

    /// Flushes completed writes to stable storage (no-op with `cache.no-flush`).
    pub async fn flush(&self) -> io::Result<()> {
        let r = if self.bits() & bits::NO_FLUSH != 0 {
            Ok(())
        } else {
            self.driver.flush().await
        };
        let s = &self.stats;
        match &r {
            Ok(()) => {
                s.flush_operations.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                s.failed_flush_operations.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// What the range at `offset` holds, for at most `len` bytes (the
    /// answer's `len` is how far it applies; beyond the end: zero).
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let size = self.length();
        if len == 0 {
            return Err(einval());
        }
        if offset >= size {
            return Ok(BlockStatus {
                len,
                data: false,
                zero: true,
                allocated: false,
            });
        }
        let len = len.min(size - offset);
        let mut st = self.driver.block_status(offset, len).await?;
        st.len = st.len.clamp(1, len);
        Ok(st)
    }

    /// QEMU's allocation depth of the range at `offset` (at most `len`
    /// bytes): 1 if this node allocates it, n if the (n-1)-th backing node
    /// does, 0 if no layer does. Returns how many bytes the answer covers.
    pub fn allocation_depth(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::driver::IoFuture<'_, (u64, u32)> {
        Box::pin(async move {
            let st = self.block_status(offset, len).await?;
            if st.allocated {
                return Ok((st.len, 1));
            }
            match self.backing() {
                Some(backing) => {
                    let (n, d) = backing.allocation_depth(offset, st.len).await?;
                    Ok((n, if d == 0 { 0 } else { d + 1 }))
                }
                None => Ok((st.len, 0)),
            }
        })
    }

    /// Copy-on-read of `[offset, offset + len)` (QEMU's
    /// `bdrv_co_do_copy_on_readv`): the parts this node does not hold
    /// itself are read through it (from its backing chain) and written
    /// into it, as one serialising request over the range widened to
    /// whole clusters, so no other request can change the range between
    /// the read and the write. Already allocated parts are left alone.
    /// Returns the bytes copied.
    pub async fn copy_on_read(&self, offset: u64, len: u64) -> io::Result<u64> {
        let size = self.length();
        if len == 0 || offset >= size {
            return Ok(0);
        }
        if self.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let l = self.driver.limits();
        let a = self
            .alignment()
            .max(u64::from(l.pwrite_zeroes_alignment.max(1)));
        let start = align_down(offset, a);
        let end = align_up(offset.saturating_add(len).min(size), a).min(size);
        let _t = self.tracker.begin(start, end, true).await;
        let mut pos = start;
        let mut copied = 0;
        while pos < end {
            let st = self.driver.block_status(pos, end - pos).await?;
            let n = st.len.clamp(1, end - pos);
            if !st.allocated {
                let data = self.driver_read_split(pos, n).await?;
                // Bypasses the tracker: this request already serialises
                // the range.
                self.driver_write_split(pos, data, ReqFlags::default())
                    .await?;
                copied += n;
            }
            pos += n;
        }
        Ok(copied)
    }

    /// Changes the length. A serialising request over everything from the
    /// shorter of the old and new lengths to the end (QEMU's
    /// `bdrv_co_truncate` with its `BDRV_TRACKED_TRUNCATE` request): it
    /// waits for the requests in flight there and holds back new ones
    /// until the length changed, instead of draining and racing with them.
    pub async fn truncate(&self, len: u64) -> io::Result<()> {
        self.check_write(0, 0)?;
        let from = len.min(self.length());
        let _t = self.tracker.begin(from, u64::MAX, true).await;
        self.driver.truncate(len).await?;
        self.dirty.truncate(self.length());
        Ok(())
    }

    /// Flushes and releases the driver (the node is leaving the graph).
    pub async fn close(&self) -> io::Result<()> {
        self.drain().await;
        self.driver.close().await
    }
}

/// Whether a buffer is all zeroes.
pub fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}
