//! Block backends: the device front end on a [`Root`] (the device parts
//! of QEMU's `BlockBackend`, `block/block-backend.c`).
//!
//! ```text
//!   device "cd0" ──attached──► BlockBackend ──Root──edge "root"──► node
//!   (tray, lock)               name, error policy,  perms, gate,  swappable
//!                              io-status, accounting              medium
//! ```
//!
//! A backend's root has an optional root node, the *medium*. While it has
//! one, the root is a user of that node in the [`BlockGraph`], holding the
//! backend's permissions, so the node cannot be deleted under it. The
//! medium can be removed and another inserted (`eject`, `blockdev-change-
//! medium`). A device model may be attached; it decides whether the media
//! are removable, whether there is a tray and whether the guest locked it,
//! which is recorded here in a [`DeviceLink`].
//!
//! I/O through a backend ([`BlockBackend::read`] and friends) is what a
//! device front end issues: it waits while the server is stopped, fails
//! with `ENOMEDIUM` without a medium or with an open tray, refuses
//! out-of-range requests as invalid, accounts every request (see
//! [`crate::accounting`]) and applies the `rerror`/`werror` policy to
//! failures (report, ignore, or stop the server and retry the request once
//! it runs again); then it goes through the root (its gate, its write
//! cache mode) to the medium.
//!
//! An export's own backend ([`BlockBackend::new_export`], QEMU's
//! `BlockExport.blk`) has none of the device parts: its requests go
//! straight through the root. Every export's I/O thus takes one path.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::accounting::AcctStats;
use crate::error::BlockError;
use crate::graph::BlockGraph;
use crate::node::{BlockNode, DetectZeroes};
use crate::perm::{Perm, PermPair};
use crate::root::{Root, RootKind};
use crate::runstate::RunState;

pub use crate::qapi::{BlockErrorAction as ErrorAction, BlockdevOnError as OnError, IoStatus};

/// The device model attached to a backend, as the backend sees it (QEMU's
/// `BlockDevOps` callbacks and the state behind them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLink {
    /// The device's id, or its canonical path if it has none (`qdev` in
    /// queries, `id` in `DEVICE_TRAY_MOVED`).
    pub id: String,
    /// The device's canonical QOM path (`qom-path` of `BLOCK_IO_ERROR`).
    pub path: String,
    /// The media can be changed.
    pub removable: bool,
    /// The device has a tray (implies `removable`).
    pub has_tray: bool,
    /// The tray is open.
    pub tray_open: bool,
    /// The guest locked the tray.
    pub locked: bool,
    /// The guest was asked to open the tray and has not yet done so.
    pub eject_request: bool,
}

/// A `DEVICE_TRAY_MOVED` event to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrayMoved {
    /// The backend name (empty for anonymous backends).
    pub device: String,
    /// The device's id or path.
    pub id: String,
    /// Whether the tray is open now.
    pub tray_open: bool,
}

/// The device side of a backend as queries show it (see
/// [`BlockBackend::summary`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The attached device's id or path (empty without a device).
    pub dev_id: String,
    /// Whether the media are removable.
    pub removable: bool,
    /// `Some(open)` if the device has a tray.
    pub tray: Option<bool>,
    /// Whether the guest locked the medium.
    pub locked: bool,
    /// The io-status, if the backend reports one.
    pub iostatus: Option<IoStatus>,
    /// Whether the write cache is on.
    pub write_cache: bool,
}

/// Options a medium inserted later is opened with (QEMU's
/// `BlockBackendRootState`): remembered from the last medium, or set when
/// an empty drive is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootState {
    /// Open read-only.
    pub read_only: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `discard=unmap`.
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

/// A failure the error policy acted on, for the `BLOCK_IO_ERROR` event.
#[derive(Debug, Clone)]
pub struct IoErrorInfo {
    /// The failed request was a read.
    pub is_read: bool,
    /// What the policy decided.
    pub action: ErrorAction,
    /// The errno.
    pub errno: i32,
    /// The medium's node-name, if any.
    pub node_name: Option<String>,
    /// Whether the backend reports an io-status (then the event says
    /// whether the error was `ENOSPC`).
    pub iostatus_enabled: bool,
}

/// Receives the failures the error policy acted on. For
/// [`ErrorAction::Stop`] the hook must also stop the server (after
/// sending its event), so that the retried request waits for `cont`.
pub trait IoErrorHook: Send + Sync {
    /// Called once per failure, after the io-status was updated.
    fn io_error(&self, blk: &BlockBackend, info: IoErrorInfo);
}

#[derive(Debug)]
struct State {
    dev: Option<DeviceLink>,
    root_state: RootState,
    probed_raw: bool,
    on_read_error: OnError,
    on_write_error: OnError,
    iostatus_enabled: bool,
    iostatus: IoStatus,
}

/// A block backend. See the [module docs](self).
pub struct BlockBackend {
    name: String,
    root: Arc<Root>,
    /// A device front end (run state, media, accounting, error policy);
    /// `false` for an export's own backend.
    front_end: bool,
    st: Mutex<State>,
    stats: AcctStats,
    run: Arc<RunState>,
    hook: OnceLock<Arc<dyn IoErrorHook>>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("name", &self.name)
            .field("root", &self.root().map(|n| n.name().to_string()))
            .finish()
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl BlockBackend {
    /// A backend without medium; `name` is empty for an anonymous one.
    /// `perm` is what it will hold on its media; `run` is the server's run
    /// state, which I/O waits on.
    pub fn new(name: &str, perm: PermPair, run: Arc<RunState>) -> Self {
        Self::build(name, perm, run, true)
    }

    /// An export's own backend (QEMU's `BlockExport.blk`): anonymous, no
    /// device parts; `perm` is what the export takes on its node.
    pub fn new_export(perm: PermPair, run: Arc<RunState>) -> Self {
        Self::build("", perm, run, false)
    }

    fn build(name: &str, perm: PermPair, run: Arc<RunState>, front_end: bool) -> Self {
        let kind = if front_end {
            RootKind::Backend
        } else {
            RootKind::Export
        };
        BlockBackend {
            name: name.to_string(),
            root: Root::new(kind, name, perm),
            front_end,
            st: Mutex::new(State {
                dev: None,
                // A backend that never had a medium opens its first one
                // read-only unless told otherwise (QEMU's zeroed flags).
                root_state: RootState {
                    read_only: true,
                    ..RootState::default()
                },
                probed_raw: false,
                on_read_error: OnError::Report,
                on_write_error: OnError::Enospc,
                iostatus_enabled: false,
                iostatus: IoStatus::Ok,
            }),
            stats: AcctStats::default(),
            run,
            hook: OnceLock::new(),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name (empty for anonymous backends).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A key naming this backend uniquely within the process.
    pub fn user_key(&self) -> String {
        format!("backend:{}", self.root.id())
    }

    /// The root the backend issues its requests through.
    pub fn root_handle(&self) -> &Arc<Root> {
        &self.root
    }

    /// Whether the backend is a device front end (not an export's own).
    pub fn is_front_end(&self) -> bool {
        self.front_end
    }

    /// How permission errors name the backend (QEMU's
    /// `blk_root_get_parent_desc`).
    pub fn describe(&self) -> String {
        self.root.describe()
    }

    /// Installs the error-policy hook (once).
    pub fn set_error_hook(&self, hook: Arc<dyn IoErrorHook>) {
        let _ = self.hook.set(hook);
    }

    /// The statistics.
    pub fn stats(&self) -> &AcctStats {
        &self.stats
    }

    /// The medium, if any.
    pub fn root(&self) -> Option<Arc<BlockNode>> {
        self.root.node()
    }

    /// Whether a medium is inserted.
    pub fn is_inserted(&self) -> bool {
        self.root.edge().is_some()
    }

    /// Whether I/O can reach a medium: inserted and the tray closed.
    pub fn is_available(&self) -> bool {
        self.is_inserted() && !self.is_tray_open()
    }

    /// The permissions the backend holds (or will hold) on its medium.
    pub fn perm(&self) -> PermPair {
        self.root.perm()
    }

    /// Whether writes are allowed: a medium that is not read-only and the
    /// `write` permission.
    pub fn is_writable(&self) -> bool {
        self.perm().perm.contains(Perm::WRITE) && self.root().is_some_and(|n| !n.read_only())
    }

    /// Whether the backend could take the `write` permission: its medium is
    /// writable, or without medium, the next one will be opened read-write
    /// (QEMU's `blk_supports_write_perm`).
    pub fn supports_write_perm(&self) -> bool {
        match self.root() {
            Some(n) => !n.read_only(),
            None => !self.st().root_state.read_only,
        }
    }

    /// Changes the permissions; on a conflict nothing changed.
    pub fn set_perm(&self, graph: &BlockGraph, perm: PermPair) -> Result<(), BlockError> {
        graph.set_root_perm(&self.root, perm)
    }

    /// Inserts a medium (QEMU's `blk_insert_bs`): the backend becomes a user
    /// of `node` with its permissions. The caller checked that there is no
    /// medium.
    pub fn insert(&self, graph: &BlockGraph, node: Arc<BlockNode>) -> Result<(), BlockError> {
        graph.attach_root(&self.root, &node)
    }

    /// Removes the medium (QEMU's `blk_remove_bs`), remembering its options
    /// for the next one; returns it. The node stays in the graph: the caller
    /// releases it if it was opened implicitly.
    pub fn remove(&self, graph: &BlockGraph) -> Option<Arc<BlockNode>> {
        let node = graph.detach_root(&self.root)?;
        self.update_root_state(&node);
        self.st().probed_raw = false;
        Some(node)
    }

    fn update_root_state(&self, node: &BlockNode) {
        let o = node.options();
        self.st().root_state = RootState {
            read_only: o.read_only,
            cache_direct: o.cache_direct,
            cache_no_flush: o.cache_no_flush,
            discard_unmap: o.discard_unmap,
            detect_zeroes: o.detect_zeroes,
        };
    }

    /// The options for the next medium: the current medium's if there is
    /// one, else the remembered ones.
    pub fn root_state(&self) -> RootState {
        if let Some(n) = self.root() {
            self.update_root_state(&n);
        }
        self.st().root_state
    }

    /// Sets the options for the next medium (an empty drive's).
    pub fn set_root_state(&self, rs: RootState) {
        self.st().root_state = rs;
    }

    /// Marks the medium as raw by probing: writes that would make its first
    /// sector look like another format are refused.
    pub fn set_probed_raw(&self, probed: bool) {
        self.st().probed_raw = probed;
    }

    /// Attaches a device model; `false` if one is attached already. The
    /// io-status is reset (QEMU's `blk_attach_dev`).
    pub fn attach_dev(&self, dev: DeviceLink) -> bool {
        let mut st = self.st();
        if st.dev.is_some() {
            return false;
        }
        self.root.set_dev_id(Some(dev.id.clone()));
        st.dev = Some(dev);
        if st.iostatus_enabled {
            st.iostatus = IoStatus::Ok;
        }
        true
    }

    /// Detaches the device model.
    pub fn detach_dev(&self) {
        let mut st = self.st();
        st.dev = None;
        st.iostatus_enabled = false;
        self.root.set_dev_id(None);
    }

    /// Whether a device model is attached.
    pub fn has_dev(&self) -> bool {
        self.st().dev.is_some()
    }

    /// What queries show of the backend's device side, read under one lock.
    pub fn summary(&self) -> Summary {
        let st = self.st();
        let dev = st.dev.as_ref();
        let iostatus_enabled = st.iostatus_enabled
            && (matches!(st.on_write_error, OnError::Enospc | OnError::Stop)
                || st.on_read_error == OnError::Stop);
        Summary {
            dev_id: dev.map(|d| d.id.clone()).unwrap_or_default(),
            removable: dev.is_none_or(|d| d.removable),
            tray: dev.filter(|d| d.has_tray).map(|d| d.tray_open),
            locked: dev.is_some_and(|d| d.has_tray && d.locked),
            iostatus: iostatus_enabled.then_some(st.iostatus),
            write_cache: self.root.write_cache(),
        }
    }

    /// The attached device model, if any.
    pub fn dev(&self) -> Option<DeviceLink> {
        self.st().dev.clone()
    }

    /// The attached device's id or path (empty without a device).
    pub fn attached_dev_id(&self) -> String {
        self.st()
            .dev
            .as_ref()
            .map(|d| d.id.clone())
            .unwrap_or_default()
    }

    /// Whether the media are removable: always without a device.
    pub fn has_removable_media(&self) -> bool {
        self.st().dev.as_ref().is_none_or(|d| d.removable)
    }

    /// Whether the attached device has a tray.
    pub fn has_tray(&self) -> bool {
        self.st().dev.as_ref().is_some_and(|d| d.has_tray)
    }

    /// Whether the attached device has a tray and it is open.
    pub fn is_tray_open(&self) -> bool {
        self.st()
            .dev
            .as_ref()
            .is_some_and(|d| d.has_tray && d.tray_open)
    }

    /// Whether the guest locked the medium.
    pub fn is_medium_locked(&self) -> bool {
        self.st()
            .dev
            .as_ref()
            .is_some_and(|d| d.has_tray && d.locked)
    }

    /// Asks the guest to release the medium; with `force` the lock is
    /// broken (the medium is about to be pulled out).
    pub fn eject_request(&self, force: bool) {
        if let Some(d) = self.st().dev.as_mut().filter(|d| d.has_tray) {
            d.eject_request = true;
            if force {
                d.locked = false;
            }
        }
    }

    /// Sets the guest-side tray lock (what a guest's PREVENT ALLOW MEDIUM
    /// REMOVAL does); `false` without a tray.
    pub fn set_locked(&self, locked: bool) -> bool {
        match self.st().dev.as_mut().filter(|d| d.has_tray) {
            Some(d) => {
                d.locked = locked;
                true
            }
            None => false,
        }
    }

    /// Tells the device a medium was loaded (`load`) or ejected (QEMU's
    /// `blk_dev_change_media_cb`): a tray closes or opens. Returns the
    /// `DEVICE_TRAY_MOVED` event to send if the tray moved.
    pub fn change_media(&self, load: bool) -> Option<TrayMoved> {
        let mut st = self.st();
        let d = st.dev.as_mut().filter(|d| d.removable)?;
        let was_open = d.has_tray && d.tray_open;
        if d.has_tray {
            d.tray_open = !load;
            d.eject_request = false;
        }
        let is_open = d.has_tray && d.tray_open;
        (was_open != is_open).then(|| TrayMoved {
            device: self.name.clone(),
            id: d.id.clone(),
            tray_open: is_open,
        })
    }

    /// Whether the write cache is on (else every write is flushed).
    pub fn write_cache(&self) -> bool {
        self.root.write_cache()
    }

    /// Turns the write cache on or off.
    pub fn set_write_cache(&self, on: bool) {
        self.root.set_write_cache(on);
    }

    /// The error policies (read, write).
    pub fn on_error(&self) -> (OnError, OnError) {
        let st = self.st();
        (st.on_read_error, st.on_write_error)
    }

    /// Sets the error policies.
    pub fn set_on_error(&self, read: OnError, write: OnError) {
        let mut st = self.st();
        st.on_read_error = read;
        st.on_write_error = write;
    }

    /// Enables the io-status (devices that report errors do).
    pub fn iostatus_enable(&self) {
        let mut st = self.st();
        st.iostatus_enabled = true;
        st.iostatus = IoStatus::Ok;
    }

    /// Whether queries show an io-status: enabled, and a policy that can
    /// stop (QEMU's `blk_iostatus_is_enabled`).
    pub fn iostatus_is_enabled(&self) -> bool {
        let st = self.st();
        st.iostatus_enabled
            && (matches!(st.on_write_error, OnError::Enospc | OnError::Stop)
                || st.on_read_error == OnError::Stop)
    }

    /// The io-status.
    pub fn iostatus(&self) -> IoStatus {
        self.st().iostatus
    }

    /// Resets the io-status to `ok` (`cont` does this for every backend).
    pub fn iostatus_reset(&self) {
        if self.iostatus_is_enabled() {
            self.st().iostatus = IoStatus::Ok;
        }
    }

    fn iostatus_set_err(&self, e: i32) {
        if self.iostatus_is_enabled() {
            let mut st = self.st();
            st.iostatus = st.iostatus.after_error(e);
        }
    }

    /// What the policy says about error `e` of a read or write (QEMU's
    /// `blk_get_error_action`).
    pub fn error_action(&self, is_read: bool, e: i32) -> ErrorAction {
        let (r, w) = self.on_error();
        ErrorAction::for_error(if is_read { r } else { w }, e == libc::ENOSPC)
    }

    /// The medium's length (0 without one).
    pub fn length(&self) -> u64 {
        self.root.length()
    }
}

mod request;

#[cfg(test)]
mod tests;
