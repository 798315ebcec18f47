//! Named dirty bitmaps attached to a node (QEMU's `BdrvDirtyBitmap` and
//! `bs->dirty_bitmaps`, `block/dirty-bitmap.c`).
//!
//! Every write, write-zeroes and discard that reaches a node marks the
//! node's enabled bitmaps once it is done, whatever its origin (device,
//! export, job), as QEMU's `bdrv_co_write_req_finish` calls
//! `bdrv_set_dirty`. A node without bitmaps pays one relaxed atomic load
//! per request.
//!
//! The operations are split so a transaction can run them in steps
//! (QEMU's `blockdev.c` actions):
//!
//! | command | prepare | commit | abort |
//! | --- | --- | --- | --- |
//! | add | [`NodeBitmaps::create`] | — | [`NodeBitmaps::release`] |
//! | remove | check, [`NamedBitmap::set_busy`] | [`NodeBitmaps::release`] | `set_busy(false)` |
//! | clear | [`DirtyBitmap::snapshot`], [`DirtyBitmap::clear`] | drop the copy | [`DirtyBitmap::restore`] |
//! | enable/disable | remember [`NamedBitmap::enabled`], set it | — | set it back |
//! | merge | snapshot the target, merge | drop the copy | restore |

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::bitmap::DirtyBitmap;
use crate::error::BlockError;

/// The granularity of a bitmap added without one (QEMU's
/// `bdrv_get_default_bitmap_granularity`): the cluster size within
/// 4 KiB..64 KiB, else 64 KiB.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// What a use of a bitmap must not meet (QEMU's `BDRV_BITMAP_*` flags of
/// `bdrv_dirty_bitmap_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check(u8);

impl Check {
    /// In use by an operation (an export, a job).
    pub const BUSY: Check = Check(1);
    /// Read-only (loaded from a read-only image).
    pub const RO: Check = Check(2);
    /// Persistent but inconsistent on disk.
    pub const INCONSISTENT: Check = Check(4);
    /// Everything: the bitmap is to be changed.
    pub const DEFAULT: Check = Check(7);
    /// Everything but read-only: the bitmap is read or its recording
    /// state changes.
    pub const ALLOW_RO: Check = Check(5);

    /// Both sets of conditions.
    pub const fn or(self, c: Check) -> Check {
        Check(self.0 | c.0)
    }

    fn has(self, c: Check) -> bool {
        self.0 & c.0 != 0
    }
}

/// A named dirty bitmap (see the [module docs](self)).
#[derive(Debug)]
pub struct NamedBitmap {
    name: String,
    bits: DirtyBitmap,
    disabled: AtomicBool,
    busy: AtomicBool,
    persistent: AtomicBool,
    inconsistent: AtomicBool,
    readonly: AtomicBool,
    /// The anonymous bitmap recording writes while an operation holds this
    /// one frozen (a backup's sync bitmap).
    successor: Mutex<Option<Arc<NamedBitmap>>>,
}

/// Everything that describes a bitmap apart from its bits, for whoever
/// stores it (qcow2's bitmap directory) and loads it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapMeta {
    /// The name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Recording writes (QEMU's `!disabled`; qcow2's `auto` flag).
    pub enabled: bool,
    /// To be stored in the image.
    pub persistent: bool,
    /// Stored as in use and not cleanly closed (qcow2's `in_use`).
    pub inconsistent: bool,
    /// Loaded from a read-only image: not to be changed.
    pub readonly: bool,
}

impl NamedBitmap {
    fn new(name: String, bits: DirtyBitmap) -> NamedBitmap {
        NamedBitmap {
            name,
            bits,
            disabled: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            readonly: AtomicBool::new(false),
            successor: Mutex::new(None),
        }
    }

    /// The name (empty for an anonymous bitmap: a successor).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn successor(&self) -> Option<Arc<NamedBitmap>> {
        self.successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether writes are recorded here or in the successor (QEMU's
    /// `bdrv_dirty_bitmap_recording`, which queries show).
    pub fn recording(&self) -> bool {
        self.enabled() || self.successor().is_some_and(|s| s.enabled())
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap {
        &self.bits
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.bits.granularity()
    }

    /// Whether writes are recorded (QEMU's `bdrv_dirty_bitmap_recording`).
    pub fn enabled(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }

    /// Starts or stops recording writes.
    pub fn set_enabled(&self, on: bool) {
        self.disabled.store(!on, Ordering::Relaxed);
    }

    /// In use by an operation.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Marks the bitmap in use by an operation (or not).
    pub fn set_busy(&self, on: bool) {
        self.busy.store(on, Ordering::Relaxed);
    }

    /// To be stored in the image.
    pub fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Relaxed)
    }

    /// Sets whether the bitmap is to be stored in the image.
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Relaxed);
    }

    /// Persistent, but not stored cleanly: unusable except for removal.
    pub fn inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Relaxed)
    }

    /// Read-only: loaded from an image opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly.load(Ordering::Relaxed)
    }

    /// Sets the read-only flag (a persistent bitmap's image was reopened).
    pub fn set_readonly(&self, on: bool) {
        self.readonly.store(on, Ordering::Relaxed);
    }

    /// The flags and granularity, for storing the bitmap.
    pub fn meta(&self) -> BitmapMeta {
        BitmapMeta {
            name: self.name.clone(),
            granularity: self.granularity(),
            enabled: self.enabled(),
            persistent: self.persistent(),
            inconsistent: self.inconsistent(),
            readonly: self.readonly(),
        }
    }

    /// Refuses a use the bitmap's state forbids (QEMU's
    /// `bdrv_dirty_bitmap_check`, with its messages).
    pub fn check(&self, c: Check) -> Result<(), BlockError> {
        let name = &self.name;
        if c.has(Check::BUSY) && self.busy() {
            return Err(BlockError::in_use(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if c.has(Check::RO) && self.readonly() {
            return Err(BlockError::invalid(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if c.has(Check::INCONSISTENT) && self.inconsistent() {
            return Err(BlockError::invalid(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(())
    }
}

/// The bitmaps of one node, newest first (QEMU's list, to which
/// `bdrv_create_dirty_bitmap` prepends).
#[derive(Debug, Default)]
pub struct NodeBitmaps {
    /// How many bitmaps there are: the request path's fast test.
    count: AtomicUsize,
    list: RwLock<Vec<Arc<NamedBitmap>>>,
}

impl NodeBitmaps {
    fn read(&self) -> RwLockReadGuard<'_, Vec<Arc<NamedBitmap>>> {
        self.list.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Arc<NamedBitmap>>> {
        self.list.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `[offset, offset + len)` dirty in every enabled bitmap
    /// (QEMU's `bdrv_set_dirty`).
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.mark_slow(offset, len);
    }

    #[inline(never)]
    fn mark_slow(&self, offset: u64, len: u64) {
        for b in self.read().iter() {
            if b.enabled() {
                b.bits.set(offset, len);
            }
        }
    }

    /// The bitmaps, newest first.
    pub fn list(&self) -> Vec<Arc<NamedBitmap>> {
        self.read().clone()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    /// The bitmap called `name` (QEMU's `bdrv_find_dirty_bitmap`).
    pub fn find(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        if name.is_empty() {
            return None;
        }
        self.read().iter().find(|b| b.name == name).cloned()
    }

    /// Freezes `bm` for an operation (QEMU's
    /// `bdrv_dirty_bitmap_create_successor`): an anonymous successor
    /// records writes from now on, as `bm` did; `bm` stops recording and
    /// is busy until [`abdicate`](Self::abdicate) or
    /// [`reclaim`](Self::reclaim).
    pub fn create_successor(&self, bm: &Arc<NamedBitmap>) -> Result<(), BlockError> {
        if bm.busy() {
            return Err(BlockError::in_use(
                "Cannot create a successor for a bitmap that is in-use by an operation",
            ));
        }
        if bm.successor().is_some() {
            return Err(BlockError::in_use(
                "Cannot create a successor for a bitmap that already has one",
            ));
        }
        let child = NamedBitmap::new(
            String::new(),
            DirtyBitmap::new(bm.bits.len(), bm.granularity()),
        );
        child.set_enabled(bm.enabled());
        let child = Arc::new(child);
        let mut l = self.write();
        l.insert(0, child.clone());
        self.count.store(l.len(), Ordering::Relaxed);
        bm.set_enabled(false);
        *bm.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        bm.set_busy(true);
        Ok(())
    }

    /// Detaches `bm`'s successor, with the list locked against marking.
    fn take_successor(
        &self,
        l: &mut Vec<Arc<NamedBitmap>>,
        bm: &NamedBitmap,
    ) -> Option<(usize, Arc<NamedBitmap>)> {
        let s = bm
            .successor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let pos = l.iter().position(|x| Arc::ptr_eq(x, &s))?;
        l.remove(pos);
        Some((pos, s))
    }

    /// Ends an operation by keeping only what was written since it began
    /// (QEMU's `bdrv_dirty_bitmap_abdicate`): `bm` takes the successor's
    /// bits, recording state and place in the list.
    pub fn abdicate(&self, bm: &Arc<NamedBitmap>) {
        let mut l = self.write();
        let Some((pos, s)) = self.take_successor(&mut l, bm) else {
            return;
        };
        bm.bits.restore(&s.bits.snapshot());
        bm.set_enabled(s.enabled());
        bm.set_busy(false);
        if let Some(old) = l.iter().position(|x| Arc::ptr_eq(x, bm)) {
            l.remove(old);
            l.insert(pos.min(old), bm.clone());
        }
        self.count.store(l.len(), Ordering::Relaxed);
    }

    /// Ends an operation by keeping everything (QEMU's
    /// `bdrv_reclaim_dirty_bitmap`): what the successor recorded is merged
    /// back into `bm`, which records as the successor did.
    pub fn reclaim(&self, bm: &Arc<NamedBitmap>) {
        let mut l = self.write();
        let Some((_, s)) = self.take_successor(&mut l, bm) else {
            return;
        };
        bm.bits.merge_from(&s.bits);
        bm.set_enabled(s.enabled());
        bm.set_busy(false);
        self.count.store(l.len(), Ordering::Relaxed);
    }

    /// Creates a clean, enabled bitmap over `len` bytes (QEMU's
    /// `bdrv_create_dirty_bitmap`). `granularity` must be a power of two,
    /// at least 512 (the caller's check, with its own message).
    pub fn create(
        &self,
        name: &str,
        granularity: u64,
        len: u64,
    ) -> Result<Arc<NamedBitmap>, BlockError> {
        let bits = DirtyBitmap::new(len, granularity);
        self.attach(NamedBitmap::new(name.to_string(), bits))
    }

    /// Attaches a bitmap loaded from the image, with its bits and flags
    /// (for a driver that stores bitmaps).
    pub fn load(
        &self,
        meta: &BitmapMeta,
        bits: DirtyBitmap,
    ) -> Result<Arc<NamedBitmap>, BlockError> {
        let b = NamedBitmap::new(meta.name.clone(), bits);
        b.set_enabled(meta.enabled);
        b.set_persistent(meta.persistent);
        b.inconsistent.store(meta.inconsistent, Ordering::Relaxed);
        b.set_readonly(meta.readonly);
        self.attach(b)
    }

    fn attach(&self, b: NamedBitmap) -> Result<Arc<NamedBitmap>, BlockError> {
        debug_assert!(!b.name.is_empty());
        let mut l = self.write();
        if l.iter().any(|x| x.name == b.name) {
            return Err(BlockError::invalid(format!(
                "Bitmap already exists: {}",
                b.name
            )));
        }
        let b = Arc::new(b);
        l.insert(0, b.clone());
        self.count.store(l.len(), Ordering::Relaxed);
        Ok(b)
    }

    /// Detaches `b`; returns its position, to put it back with
    /// [`reinsert`](Self::reinsert) (QEMU's `bdrv_release_dirty_bitmap`).
    pub fn release(&self, b: &Arc<NamedBitmap>) -> Option<usize> {
        let mut l = self.write();
        let pos = l.iter().position(|x| Arc::ptr_eq(x, b))?;
        l.remove(pos);
        self.count.store(l.len(), Ordering::Relaxed);
        Some(pos)
    }

    /// Puts a released bitmap back where it was.
    pub fn reinsert(&self, pos: usize, b: Arc<NamedBitmap>) {
        let mut l = self.write();
        let pos = pos.min(l.len());
        l.insert(pos, b);
        self.count.store(l.len(), Ordering::Relaxed);
    }

    /// Follows a change of the node's length (QEMU's
    /// `bdrv_dirty_bitmap_truncate`).
    pub fn truncate(&self, len: u64) {
        for b in self.read().iter() {
            b.bits.truncate(len);
        }
    }
}

/// What [`crate::BlockNode::attach_persistent_bitmaps`] does: each bitmap
/// the driver loaded becomes a named, persistent bitmap (disabled unless
/// its `auto` flag was set; an inconsistent one clean and unusable but
/// for removal; read-only on a read-only node), and the driver gets a
/// source that lists the node's persistent bitmaps with their bits when
/// it stores them (inconsistent ones included: the driver leaves those as
/// they are on disk). The source holds the bitmaps, not the node, so a
/// node being closed can still be asked.
pub(crate) fn attach_persistent(node: &crate::BlockNode, bitmaps: &Arc<NodeBitmaps>) {
    let driver = node.driver();
    let len = node.length();
    for b in driver.take_loaded_bitmaps() {
        let bits = if b.inconsistent {
            DirtyBitmap::new(len, b.granularity)
        } else {
            DirtyBitmap::deserialize(len, b.granularity, &b.bits)
        };
        let meta = BitmapMeta {
            name: b.name.clone(),
            granularity: b.granularity,
            enabled: b.enabled,
            persistent: true,
            inconsistent: b.inconsistent,
            readonly: node.read_only(),
        };
        if let Err(e) = bitmaps.load(&meta, bits) {
            tracing::warn!(node = node.name(), bitmap = %b.name, error = %e, "loading a persistent bitmap");
        }
    }
    let held = Arc::clone(bitmaps);
    driver.set_bitmap_source(Some(Arc::new(move || {
        held.list()
            .iter()
            .filter(|b| b.persistent() && !b.name().is_empty())
            .map(|b| crate::stored_bitmap::StoredBitmap {
                name: b.name().to_string(),
                granularity: b.granularity(),
                enabled: b.enabled(),
                inconsistent: b.inconsistent(),
                bits: b.bits().serialize(),
            })
            .collect()
    })));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_mark_release() {
        let n = NodeBitmaps::default();
        n.mark(0, 1);
        let a = n.create("a", 65536, 1 << 20).unwrap();
        let b = n.create("b", 512, 1 << 20).unwrap();
        assert_eq!(
            n.create("a", 512, 1).unwrap_err().msg,
            "Bitmap already exists: a"
        );
        b.set_enabled(false);
        n.mark(70000, 10);
        assert_eq!(a.bits().dirty_bytes(), 65536);
        assert_eq!(b.bits().dirty_bytes(), 0);
        let names: Vec<_> = n.list().iter().map(|b| b.name().to_string()).collect();
        assert_eq!(names, ["b", "a"]);
        let pos = n.release(&b).unwrap();
        assert!(n.find("b").is_none());
        n.reinsert(pos, b.clone());
        assert!(Arc::ptr_eq(&n.list()[0], &b));
        a.set_busy(true);
        assert_eq!(
            a.check(Check::ALLOW_RO).unwrap_err().msg,
            "Bitmap 'a' is currently in use by another operation and cannot be used"
        );
        b.set_readonly(true);
        assert!(b.check(Check::ALLOW_RO).is_ok());
        assert!(b.check(Check::DEFAULT).is_err());
        n.truncate(65536);
        assert_eq!(a.bits().len(), 65536);
    }

    #[test]
    fn successors() {
        let n = NodeBitmaps::default();
        let a = n.create("a", 512, 1 << 20).unwrap();
        n.mark(0, 512);
        n.create_successor(&a).unwrap();
        assert!(a.busy() && !a.enabled() && a.recording());
        assert!(n.create_successor(&a).is_err());
        assert_eq!(n.list().len(), 2);
        assert_eq!(n.list()[0].name(), "");
        n.mark(4096, 512);
        assert_eq!(a.bits().dirty_bytes(), 512);
        n.reclaim(&a);
        assert!(!a.busy() && a.enabled());
        assert_eq!(a.bits().dirty_bytes(), 1024);
        assert_eq!(n.list().len(), 1);
        n.create("b", 512, 1 << 20).unwrap();
        n.create_successor(&a).unwrap();
        n.mark(8192, 512);
        n.abdicate(&a);
        assert_eq!(a.bits().next_dirty_run(0, u64::MAX), Some((8192, 512)));
        // The bitmap now sits where its successor was: first.
        let names: Vec<_> = n.list().iter().map(|b| b.name().to_string()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(!a.busy() && a.enabled());
    }
}
