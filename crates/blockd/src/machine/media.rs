//! Removable media: trays, eject, inserting and removing media (QEMU's
//! `block/qapi-system.c`), event for event as QEMU.
//!
//! `DEVICE_TRAY_MOVED` is sent exactly when a device's tray changes state.
//! A tray the guest locked is not opened unless forced: the guest is asked
//! to open it (an eject request, which no QMP event reports) and the
//! command fails (`eject`, `blockdev-change-medium`) or succeeds without
//! effect (`blockdev-open-tray`). Devices without a tray (floppy) and
//! backends without a device have their medium removed directly.

use std::sync::Arc;

use blockd_core::{BlockBackend, BlockGraph, BlockNode, Perm};
use blockd_qmp::QmpError;

use super::{Inner, Machine};
use crate::events::DeviceTrayMoved;

/// Why a tray could not be opened (QEMU's `do_open_tray` return codes).
pub enum TrayError {
    /// A real error (no such device, not removable).
    Fail(QmpError),
    /// The device has no tray (`-ENOSYS`).
    NoTray(QmpError),
    /// The tray is locked; the guest was asked to open it (`-EINPROGRESS`).
    InProgress(QmpError),
}

/// Nodes that left the graph, to be closed.
pub type Nodes = Vec<Arc<BlockNode>>;

fn gen(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// The name QEMU uses for the device in messages: `id` if given, else the
/// backend name.
fn shown<'a>(device: Option<&'a str>, id: Option<&'a str>) -> &'a str {
    id.or(device).unwrap_or_default()
}

impl Machine {
    fn tray_event(&self, ev: Option<blockd_core::backend::TrayMoved>) {
        if let Some(ev) = ev {
            self.events.send(&DeviceTrayMoved {
                device: ev.device,
                id: ev.id,
                tray_open: ev.tray_open,
            });
        }
    }

    /// QEMU's `do_open_tray`.
    fn do_open_tray(
        &self,
        g: &Inner,
        device: Option<&str>,
        id: Option<&str>,
        force: bool,
    ) -> Result<(), TrayError> {
        let blk = g.get_blk(device, id).map_err(TrayError::Fail)?;
        let name = shown(device, id);
        if !blk.has_removable_media() {
            return Err(TrayError::Fail(gen(format!(
                "Device '{name}' is not removable"
            ))));
        }
        if !blk.has_tray() {
            return Err(TrayError::NoTray(gen(format!(
                "Device '{name}' does not have a tray"
            ))));
        }
        if blk.is_tray_open() {
            return Ok(());
        }
        let locked = blk.is_medium_locked();
        if locked {
            blk.eject_request(force);
        }
        if !locked || force {
            self.tray_event(blk.change_media(false));
        }
        if locked && !force {
            return Err(TrayError::InProgress(gen(format!(
                "Device '{name}' is locked and force was not specified, wait for tray to open and try again"
            ))));
        }
        Ok(())
    }

    /// `blockdev-open-tray`.
    pub fn open_tray(
        &self,
        device: Option<&str>,
        id: Option<&str>,
        force: bool,
    ) -> Result<(), QmpError> {
        let g = self.lock();
        match self.do_open_tray(&g, device, id, force) {
            Err(TrayError::Fail(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn close_tray_locked(
        &self,
        g: &Inner,
        device: Option<&str>,
        id: Option<&str>,
    ) -> Result<(), QmpError> {
        let blk = g.get_blk(device, id)?;
        if !blk.has_removable_media() {
            return Err(gen(format!(
                "Device '{}' is not removable",
                device.or(id).unwrap_or_default()
            )));
        }
        if !blk.has_tray() || !blk.is_tray_open() {
            return Ok(());
        }
        self.tray_event(blk.change_media(true));
        Ok(())
    }

    /// `blockdev-close-tray`.
    pub fn close_tray(&self, device: Option<&str>, id: Option<&str>) -> Result<(), QmpError> {
        let g = self.lock();
        self.close_tray_locked(&g, device, id)
    }

    /// QEMU's `blockdev_remove_medium`; returns the nodes to close.
    fn remove_medium_locked(
        &self,
        g: &Inner,
        graph: &BlockGraph,
        device: Option<&str>,
        id: Option<&str>,
    ) -> Result<Vec<Arc<BlockNode>>, QmpError> {
        let blk = g.get_blk(device, id)?;
        let name = device.or(id).unwrap_or_default();
        let attached = blk.has_dev();
        if attached && !blk.has_removable_media() {
            return Err(gen(format!("Device '{name}' is not removable")));
        }
        if attached && blk.has_tray() && !blk.is_tray_open() {
            return Err(gen(format!("Tray of device '{name}' is not open")));
        }
        let Some(node) = blk.remove(graph) else {
            return Ok(Vec::new());
        };
        if !blk.has_tray() {
            self.tray_event(blk.change_media(false));
        }
        Ok(graph.release(&node))
    }

    /// `blockdev-remove-medium`.
    pub fn remove_medium(
        &self,
        graph: &BlockGraph,
        id: &str,
    ) -> Result<Vec<Arc<BlockNode>>, QmpError> {
        let g = self.lock();
        self.remove_medium_locked(&g, graph, None, Some(id))
    }

    /// `eject`: open the tray, then remove the medium.
    pub fn eject(
        &self,
        graph: &BlockGraph,
        device: Option<&str>,
        id: Option<&str>,
        force: bool,
    ) -> Result<Vec<Arc<BlockNode>>, QmpError> {
        let g = self.lock();
        match self.do_open_tray(&g, device, id, force) {
            Ok(()) | Err(TrayError::NoTray(_)) => {}
            Err(TrayError::Fail(e)) | Err(TrayError::InProgress(e)) => return Err(e),
        }
        self.remove_medium_locked(&g, graph, device, id)
    }

    /// QEMU's `qmp_blockdev_insert_anon_medium`.
    fn insert_anon_medium(
        &self,
        graph: &BlockGraph,
        blk: &BlockBackend,
        node: Arc<BlockNode>,
    ) -> Result<(), QmpError> {
        let attached = blk.has_dev();
        if attached && !blk.has_removable_media() {
            return Err(gen("Device is not removable"));
        }
        if attached && blk.has_tray() && !blk.is_tray_open() {
            return Err(gen("Tray of the device is not open"));
        }
        if blk.is_inserted() {
            return Err(gen("There already is a medium in the device"));
        }
        blk.insert(graph, node).map_err(crate::qmp::qerr)?;
        if !blk.has_tray() {
            self.tray_event(blk.change_media(true));
            if attached {
                // A floppy drive takes the permissions the new medium allows
                // (QEMU's fd_change_cb).
                let mut p = blk.perm();
                p.perm = if blk.supports_write_perm() {
                    p.perm | Perm::WRITE
                } else {
                    p.perm & !Perm::WRITE
                };
                if let Err(e) = blk.set_perm(graph, p) {
                    if let Some(n) = blk.remove(graph) {
                        graph.release(&n);
                    }
                    return Err(crate::qmp::qerr(e));
                }
            }
        }
        Ok(())
    }

    /// `blockdev-insert-medium`.
    pub fn insert_medium(
        &self,
        graph: &BlockGraph,
        id: &str,
        node_name: &str,
    ) -> Result<(), QmpError> {
        let g = self.lock();
        let blk = g.get_blk(None, Some(id))?;
        let node = graph
            .get(node_name)
            .ok_or_else(|| gen(format!("Node '{node_name}' not found")))?;
        if graph.has_backend_user(&node) {
            return Err(gen(format!("Node '{node_name}' is already in use")));
        }
        self.insert_anon_medium(graph, &blk, node)
    }

    /// The second half of `blockdev-change-medium`, once the new medium is
    /// open: open the tray, swap the media, close the tray. Returns the
    /// nodes to close (the old medium, or the new one on failure).
    pub fn change_medium(
        &self,
        graph: &BlockGraph,
        device: Option<&str>,
        id: Option<&str>,
        force: bool,
        medium: Arc<BlockNode>,
    ) -> Result<Nodes, (QmpError, Nodes)> {
        let g = self.lock();
        let fail = |e: QmpError| (e, graph.release(&medium));
        match self.do_open_tray(&g, device, id, force) {
            Ok(()) | Err(TrayError::NoTray(_)) => {}
            Err(TrayError::Fail(e)) | Err(TrayError::InProgress(e)) => return Err(fail(e)),
        }
        let old = self
            .remove_medium_locked(&g, graph, device, id)
            .map_err(fail)?;
        let blk = g.get_blk(device, id).map_err(|e| (e, Vec::new()))?;
        if let Err(e) = self.insert_anon_medium(graph, &blk, medium.clone()) {
            let mut nodes = old;
            nodes.extend(graph.release(&medium));
            return Err((e, nodes));
        }
        if let Err(e) = self.close_tray_locked(&g, device, id) {
            return Err((e, old));
        }
        Ok(old)
    }

    /// `x-blockd-set-tray-lock`: the guest locks or unlocks the tray.
    pub fn set_tray_lock(&self, id: &str, locked: bool) -> Result<(), QmpError> {
        let g = self.lock();
        let blk = g.blk_by_qdev_id(id)?;
        if !blk.has_removable_media() {
            return Err(gen(format!("Device '{id}' is not removable")));
        }
        if !blk.set_locked(locked) {
            return Err(gen(format!("Device '{id}' does not have a tray")));
        }
        Ok(())
    }
}
