//! The virtual machine's block side: backends, device front ends and their
//! buses (what QEMU keeps in `block/block-backend.c`, `blockdev.c` and the
//! qdev tree).
//!
//! blockd has no guest. Its devices are front ends that own a backend and
//! model what the guest-facing hardware decides (removable media, a tray,
//! a guest lock, error reporting); consumers reach a backend through an
//! NBD export of it ([`crate::exports::BackendIo`]).
//!
//! ```text
//!  machine buses: pci.0 (hotplug) · ide.0 ide.1 · floppy-bus.0 (no hotplug)
//!  virtio-scsi-pci "scsi0" ──► bus scsi0.0 ──► scsi-cd "cd0" ──► backend "" ──► node
//!  virtio-blk-pci "vd0" ─virtio-bus─► /machine/peripheral/vd0/virtio-backend ──► backend
//!  --drive id=d0 ──────────────────────────────────────────────► backend "d0"
//! ```
//!
//! Everything here changes under one lock, so a command sees and leaves a
//! consistent machine; files are opened before the lock is taken and
//! released nodes are closed after it is dropped.

pub mod devices;
pub mod drive;
pub mod fast;
pub mod io_limits;
pub mod media;
pub mod props;
pub mod query;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use blockd_core::backend::{ErrorAction, IoErrorHook, IoErrorInfo};
use blockd_core::runstate::{RunState, RunStatus};
use blockd_core::{BlockBackend, BlockGraph, BlockNode};
use blockd_qmp::{EventBus, QmpError};

use crate::events::{BlockIoError, DeviceDeleted, Stop};
use blockd_core::qapi::IoOperationType;
use devices::Device;

/// How a `--drive` was connected (QEMU's `DriveInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Legacy {
    /// The `if=` interface.
    pub iface: String,
    /// Bus number.
    pub bus: u32,
    /// Unit number.
    pub unit: u32,
    /// `media=cdrom`.
    pub media_cd: bool,
}

/// A backend the machine knows.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    /// The backend.
    pub blk: Arc<BlockBackend>,
    /// Set for backends created by `--drive`, which die with their device.
    pub legacy: Option<Legacy>,
}

/// The machine state behind the lock.
#[derive(Default)]
pub struct Inner {
    /// Every backend with a name or a device, in creation order.
    pub backends: Vec<BackendEntry>,
    /// Devices in creation order.
    pub devices: Vec<Device>,
    /// Counter for `/machine/peripheral-anon/device[N]`.
    pub anon_count: u32,
    /// Counter for the names of SCSI buses of controllers without id.
    pub scsi_bus_count: u32,
    /// Exports using each backend, by user key.
    pub export_refs: HashMap<String, usize>,
    /// Backends deleted while exports still used them; released when the
    /// last export goes.
    pub hidden: Vec<Arc<BlockBackend>>,
}

/// The machine. See the [module docs](self).
pub struct Machine {
    inner: Mutex<Inner>,
    /// Where events go.
    pub events: EventBus,
    /// The server's run state.
    pub run: Arc<RunState>,
    hook: Arc<ErrorEvents>,
}

/// The error-policy hook of every backend: `BLOCK_IO_ERROR`, and for `stop`
/// the server stops (`STOP`) until `cont`.
pub struct ErrorEvents {
    events: EventBus,
    run: Arc<RunState>,
}

impl IoErrorHook for ErrorEvents {
    fn io_error(&self, blk: &BlockBackend, info: IoErrorInfo) {
        let reason = blockd_core::error::strerror(&std::io::Error::from_raw_os_error(info.errno));
        self.events.send(&BlockIoError {
            qom_path: blk.dev().map(|d| d.path).unwrap_or_default(),
            device: blk.name().to_string(),
            node_name: info.node_name.clone(),
            operation: if info.is_read {
                IoOperationType::Read
            } else {
                IoOperationType::Write
            },
            action: info.action,
            nospace: info.iostatus_enabled.then_some(info.errno == libc::ENOSPC),
            reason: reason.to_string(),
        });
        if info.action == ErrorAction::Stop && self.run.stop(RunStatus::IoError) {
            self.events.send(&Stop);
        }
    }
}

pub use blockd_core::qapi::id_wellformed;

/// Closes nodes that left the graph.
pub async fn close_nodes(nodes: Vec<Arc<BlockNode>>) {
    crate::qmp::close_nodes(nodes).await
}

impl Machine {
    /// An empty machine.
    pub fn new(events: EventBus, run: Arc<RunState>) -> Self {
        let hook = Arc::new(ErrorEvents {
            events: events.clone(),
            run: run.clone(),
        });
        Machine {
            inner: Mutex::new(Inner::default()),
            events,
            run,
            hook,
        }
    }

    /// The locked state.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new backend wired to the run state and the error events.
    pub fn new_backend(&self, name: &str, perm: blockd_core::PermPair) -> Arc<BlockBackend> {
        let b = Arc::new(BlockBackend::new(name, perm, self.run.clone()));
        b.set_error_hook(self.hook.clone());
        b
    }

    /// The named backend `name`.
    pub fn backend_by_name(&self, name: &str) -> Option<Arc<BlockBackend>> {
        self.lock().backend_by_name(name)
    }

    /// The backends queries list (named or attached to a device).
    pub fn listed_backends(&self) -> Vec<Arc<BlockBackend>> {
        self.lock()
            .backends
            .iter()
            .filter(|e| !e.blk.name().is_empty() || e.blk.has_dev())
            .map(|e| e.blk.clone())
            .collect()
    }

    /// `cont`: every backend's io-status goes back to `ok`.
    pub fn iostatus_reset_all(&self) {
        for e in &self.lock().backends {
            e.blk.iostatus_reset();
        }
    }

    /// An export starts using a backend.
    pub fn export_ref(&self, blk: &BlockBackend) {
        *self.lock().export_refs.entry(blk.user_key()).or_default() += 1;
    }

    /// An export stopped using a backend; a backend deleted meanwhile
    /// loses its medium now. Returns the nodes to close.
    pub fn export_unref(&self, graph: &BlockGraph, blk: &Arc<BlockBackend>) -> Vec<Arc<BlockNode>> {
        let mut g = self.lock();
        let key = blk.user_key();
        let left = match g.export_refs.get_mut(&key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return Vec::new();
        }
        g.export_refs.remove(&key);
        let Some(pos) = g.hidden.iter().position(|b| Arc::ptr_eq(b, blk)) else {
            return Vec::new();
        };
        g.hidden.remove(pos);
        release_medium(graph, blk)
    }

    /// Every backend's medium is released (shutdown).
    pub fn clear(&self, graph: &BlockGraph) {
        let mut g = self.lock();
        let inner = &mut *g;
        let all: Vec<Arc<BlockBackend>> = inner
            .backends
            .drain(..)
            .map(|e| e.blk)
            .chain(inner.hidden.drain(..))
            .collect();
        inner.devices.clear();
        drop(g);
        for b in all {
            b.detach_dev();
            b.remove(graph);
        }
    }
}

impl Inner {
    /// The named backend `name`.
    pub fn backend_by_name(&self, name: &str) -> Option<Arc<BlockBackend>> {
        if name.is_empty() {
            return None;
        }
        self.backends
            .iter()
            .find(|e| e.blk.name() == name)
            .map(|e| e.blk.clone())
    }

    /// The entry of a backend.
    pub fn entry(&self, blk: &Arc<BlockBackend>) -> Option<&BackendEntry> {
        self.backends.iter().find(|e| Arc::ptr_eq(&e.blk, blk))
    }

    /// Takes a backend out of the machine (its device is gone, or it was
    /// anonymous). Unless exports still use it, its medium is released;
    /// returns the nodes to close.
    pub fn drop_backend(
        &mut self,
        graph: &BlockGraph,
        blk: &Arc<BlockBackend>,
    ) -> Vec<Arc<BlockNode>> {
        self.backends.retain(|e| !Arc::ptr_eq(&e.blk, blk));
        if self
            .export_refs
            .get(&blk.user_key())
            .is_some_and(|&n| n > 0)
        {
            self.hidden.push(blk.clone());
            return Vec::new();
        }
        release_medium(graph, blk)
    }

    /// QEMU's `qmp_get_blk`: a backend by `device` name or by device `id`.
    pub fn get_blk(
        &self,
        device: Option<&str>,
        id: Option<&str>,
    ) -> Result<Arc<BlockBackend>, QmpError> {
        match (device, id) {
            (Some(_), Some(_)) | (None, None) => {
                Err(QmpError::generic("Need exactly one of 'device' and 'id'"))
            }
            (None, Some(id)) => self.blk_by_qdev_id(id),
            (Some(d), None) => self
                .backend_by_name(d)
                .ok_or_else(|| QmpError::device_not_found(d)),
        }
    }

    /// QEMU's `blk_by_qdev_id`: the backend of the device at `id` (an id or
    /// a QOM path).
    pub fn blk_by_qdev_id(&self, id: &str) -> Result<Arc<BlockBackend>, QmpError> {
        let (i, inner) = self.find_device_state(id)?;
        self.devices[i]
            .blk_of(inner)
            .ok_or_else(|| QmpError::generic("Device does not have a block device backend"))
    }
}

/// Takes the medium out of a backend that is going away and releases it.
pub fn release_medium(graph: &BlockGraph, blk: &BlockBackend) -> Vec<Arc<BlockNode>> {
    blk.detach_dev();
    match blk.remove(graph) {
        Some(node) => graph.release(&node),
        None => Vec::new(),
    }
}

/// `{"device": ..., "path": ...}` of `DEVICE_DELETED`.
pub fn device_deleted(id: Option<&str>, path: &str) -> DeviceDeleted {
    DeviceDeleted {
        device: id.map(str::to_string),
        path: path.to_string(),
    }
}
