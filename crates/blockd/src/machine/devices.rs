//! Device front ends: the models, their buses, `device_add` and
//! `device_del` (QEMU's `system/qdev-monitor.c`, `hw/block/virtio-blk.c`,
//! `hw/scsi/scsi-disk.c`, `hw/ide/qdev.c`, `hw/block/fdc.c`).
//!
//! The machine is a PC without default devices: `pci.0` takes hotplugged
//! PCI devices; the IDE buses `ide.0`/`ide.1` and `floppy-bus.0` exist but
//! cannot hotplug, so IDE and floppy devices only come from the command
//! line (`--device`). A virtio-scsi controller brings a SCSI bus (`ID.0`,
//! or `scsi.N` without id); every virtio proxy has an internal
//! `virtio-bus` holding its `virtio-backend` device, which for
//! virtio-blk is the device the backend is attached to.

use std::sync::Arc;

use blockd_core::backend::{DeviceLink, OnError};
use blockd_core::{BlockBackend, BlockGraph, BlockNode, Perm, PermPair};
use blockd_qmp::QmpError;
use serde_json::{Map, Value};

use super::props::{self, Kind, PropValue};
use super::{device_deleted, id_wellformed, Inner, Machine};

/// The device models blockd has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// A virtio block device on PCI.
    VirtioBlkPci,
    /// A virtio SCSI controller on PCI.
    VirtioScsiPci,
    /// A SCSI disk.
    ScsiHd,
    /// A SCSI CD-ROM (removable, with a tray).
    ScsiCd,
    /// An IDE disk.
    IdeHd,
    /// An IDE CD-ROM (removable, with a tray).
    IdeCd,
    /// A floppy drive (removable, no tray).
    Floppy,
}

/// The kinds of bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusType {
    /// PCI.
    Pci,
    /// SCSI.
    Scsi,
    /// IDE.
    Ide,
    /// The floppy controller's.
    Floppy,
    /// A virtio proxy's internal bus.
    VirtioPci,
}

impl BusType {
    /// The QOM type name QEMU prints.
    pub fn typename(self) -> &'static str {
        match self {
            BusType::Pci => "PCI",
            BusType::Scsi => "SCSI",
            BusType::Ide => "IDE",
            BusType::Floppy => "floppy-bus",
            BusType::VirtioPci => "virtio-pci-bus",
        }
    }
}

impl Model {
    /// The model of a driver name (with QEMU's aliases).
    pub fn lookup(name: &str) -> Option<Model> {
        Some(match name {
            "virtio-blk-pci" | "virtio-blk" => Model::VirtioBlkPci,
            "virtio-scsi-pci" | "virtio-scsi" => Model::VirtioScsiPci,
            "scsi-hd" => Model::ScsiHd,
            "scsi-cd" => Model::ScsiCd,
            "ide-hd" => Model::IdeHd,
            "ide-cd" => Model::IdeCd,
            "floppy" => Model::Floppy,
            _ => return None,
        })
    }

    /// The QOM type name.
    pub fn typename(self) -> &'static str {
        match self {
            Model::VirtioBlkPci => "virtio-blk-pci",
            Model::VirtioScsiPci => "virtio-scsi-pci",
            Model::ScsiHd => "scsi-hd",
            Model::ScsiCd => "scsi-cd",
            Model::IdeHd => "ide-hd",
            Model::IdeCd => "ide-cd",
            Model::Floppy => "floppy",
        }
    }

    /// The bus the model plugs into.
    pub fn bus_type(self) -> BusType {
        match self {
            Model::VirtioBlkPci | Model::VirtioScsiPci => BusType::Pci,
            Model::ScsiHd | Model::ScsiCd => BusType::Scsi,
            Model::IdeHd | Model::IdeCd => BusType::Ide,
            Model::Floppy => BusType::Floppy,
        }
    }

    fn is_virtio(self) -> bool {
        matches!(self, Model::VirtioBlkPci | Model::VirtioScsiPci)
    }
}

/// A bus of the machine.
#[derive(Debug, Clone)]
pub struct Bus {
    /// Its name (`pci.0`, `scsi0.0`, ...).
    pub name: String,
    /// Its type.
    pub ty: BusType,
    /// Whether devices can be plugged and unplugged at run time.
    pub hotpluggable: bool,
    /// How many devices it takes (`None`: no limit worth modelling).
    pub max: Option<usize>,
}

/// A device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its id, if it has one.
    pub id: Option<String>,
    /// Its model.
    pub model: Model,
    /// Its canonical QOM path.
    pub path: String,
    /// The bus it sits on.
    pub bus: String,
    /// The bus it provides (SCSI controllers).
    pub child_bus: Option<String>,
    /// Its backend.
    pub blk: Option<Arc<BlockBackend>>,
    /// SCSI address (channel, target, lun) or IDE/floppy unit in `.1`.
    pub addr: (u32, u32, u32),
    /// The properties it was given, parsed.
    pub props: Vec<(String, PropValue)>,
}

impl Device {
    /// The backend of the device itself (`inner == false`) or of its
    /// `virtio-backend` child: for virtio-blk the backend is the child's.
    pub fn blk_of(&self, inner: bool) -> Option<Arc<BlockBackend>> {
        match (self.model, inner) {
            (Model::VirtioBlkPci, true) => self.blk.clone(),
            (Model::VirtioBlkPci | Model::VirtioScsiPci, _) => None,
            (_, false) => self.blk.clone(),
            (_, true) => None,
        }
    }

    fn prop(&self, name: &str) -> Option<&PropValue> {
        self.props
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn prop_bool(&self, name: &str) -> bool {
        matches!(self.prop(name), Some(PropValue::Bool(true)))
    }

    fn prop_num(&self, name: &str) -> Option<i64> {
        match self.prop(name) {
            Some(PropValue::Num(n)) => Some(*n),
            _ => None,
        }
    }

    fn prop_auto(&self, name: &str) -> Option<bool> {
        match self.prop(name) {
            Some(PropValue::Auto(a)) => *a,
            _ => None,
        }
    }

    fn prop_str(&self, name: &str) -> Option<&str> {
        match self.prop(name) {
            Some(PropValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The path of the device the backend is attached to.
    fn attached_path(&self) -> String {
        if self.model.is_virtio() {
            format!("{}/virtio-backend", self.path)
        } else {
            self.path.clone()
        }
    }

    /// What the backend calls its device: the id, else the path.
    fn attached_id(&self) -> String {
        match (&self.id, self.model.is_virtio()) {
            (Some(id), false) => id.clone(),
            _ => self.attached_path(),
        }
    }

    fn removable(&self) -> bool {
        match self.model {
            Model::ScsiCd | Model::IdeCd | Model::Floppy => true,
            Model::ScsiHd => self.prop_bool("removable"),
            _ => false,
        }
    }
}

/// Where a `drive` property points.
enum DriveRef {
    Backend(Arc<BlockBackend>),
    Node(Arc<BlockNode>),
}

fn gen(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

const MACHINE_CONTAINERS: [&str; 5] = [
    "/",
    "/machine",
    "/machine/peripheral",
    "/machine/peripheral-anon",
    "/machine/unattached",
];

impl Inner {
    /// The buses in QEMU's search order (newest devices first).
    pub fn buses(&self) -> Vec<Bus> {
        let mut out = vec![Bus {
            name: "pci.0".into(),
            ty: BusType::Pci,
            hotpluggable: true,
            max: None,
        }];
        for d in self.devices.iter().rev().filter(|d| d.model.is_virtio()) {
            out.push(Bus {
                name: "virtio-bus".into(),
                ty: BusType::VirtioPci,
                hotpluggable: false,
                max: Some(1),
            });
            if let Some(b) = &d.child_bus {
                out.push(Bus {
                    name: b.clone(),
                    ty: BusType::Scsi,
                    hotpluggable: true,
                    max: None,
                });
            }
        }
        for name in ["ide.1", "ide.0"] {
            out.push(Bus {
                name: name.into(),
                ty: BusType::Ide,
                hotpluggable: false,
                max: Some(2),
            });
        }
        out.push(Bus {
            name: "floppy-bus.0".into(),
            ty: BusType::Floppy,
            hotpluggable: false,
            max: Some(2),
        });
        out
    }

    fn bus_full(&self, b: &Bus) -> bool {
        match b.max {
            // Every virtio-bus holds its proxy's backend device.
            Some(_) if b.ty == BusType::VirtioPci => true,
            Some(m) => self.devices.iter().filter(|d| d.bus == b.name).count() >= m,
            None => false,
        }
    }

    /// QEMU's `find_device_state`: the device at `id` (an id relative to
    /// `/machine/peripheral`, or an absolute QOM path) and whether the path
    /// names its `virtio-backend` child.
    pub fn find_device_state(&self, id: &str) -> Result<(usize, bool), QmpError> {
        let abs = if id.starts_with('/') {
            id.to_string()
        } else if id.is_empty() {
            "/machine/peripheral".to_string()
        } else {
            format!("/machine/peripheral/{id}")
        };
        let trimmed = abs.trim_end_matches('/');
        if MACHINE_CONTAINERS.contains(&trimmed) || trimmed.is_empty() {
            return Err(gen(format!("{id} is not a hotpluggable device")));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if trimmed == d.path {
                return Ok((i, false));
            }
            if d.model.is_virtio() && trimmed == format!("{}/virtio-backend", d.path) {
                return Ok((i, true));
            }
        }
        Err(QmpError::device_not_found(id))
    }

    fn find_bus(&self, model: Model, path: Option<&str>) -> Result<Bus, QmpError> {
        let buses = self.buses();
        let want = model.bus_type();
        match path {
            Some(p) => {
                let b = buses
                    .iter()
                    .find(|b| b.name == p)
                    .ok_or_else(|| gen(format!("Bus '{p}' not found")))?;
                if self.bus_full(b) {
                    return Err(gen(format!("Bus '{p}' is full")));
                }
                if b.ty != want {
                    return Err(gen(format!(
                        "Device '{}' can't go on {} bus",
                        model.typename(),
                        b.ty.typename()
                    )));
                }
                Ok(b.clone())
            }
            None => buses
                .into_iter()
                .find(|b| b.ty == want && !self.bus_full(b))
                .ok_or_else(|| {
                    gen(format!(
                        "No '{}' bus found for device '{}'",
                        want.typename(),
                        model.typename()
                    ))
                }),
        }
    }

    fn resolve_drive(
        &self,
        graph: &BlockGraph,
        typename: &str,
        name: &str,
    ) -> Result<DriveRef, QmpError> {
        if let Some(e) = self
            .backends
            .iter()
            .find(|e| !name.is_empty() && e.blk.name() == name)
        {
            if e.blk.has_dev() {
                let auto = e.legacy.as_ref().is_some_and(|l| l.iface != "none");
                return Err(gen(if auto {
                    format!("Drive '{name}' is already in use because it has been automatically connected to another device (did you need 'if=none' in the drive options?)")
                } else {
                    format!("Drive '{name}' is already in use by another device")
                }));
            }
            return Ok(DriveRef::Backend(e.blk.clone()));
        }
        graph.get(name).map(DriveRef::Node).ok_or_else(|| {
            gen(format!(
                "Property '{typename}.drive' can't find value '{name}'"
            ))
        })
    }

    /// Picks the SCSI address on `bus` (QEMU's `scsi_qdev_realize`).
    fn scsi_addr(
        &self,
        bus: &str,
        chan: Option<i64>,
        target: Option<i64>,
        lun: Option<i64>,
    ) -> Result<(u32, u32, u32), QmpError> {
        const MAX_TARGET: i64 = 255;
        const MAX_LUN: i64 = 16383;
        let chan = chan.unwrap_or(0);
        if chan > 0 {
            return Err(gen(format!("bad scsi channel id {chan}")));
        }
        if let Some(t) = target.filter(|&t| t > MAX_TARGET) {
            return Err(gen(format!("bad scsi device id {t}")));
        }
        if let Some(l) = lun.filter(|&l| l > MAX_LUN) {
            return Err(gen(format!("bad scsi device lun {l}")));
        }
        let used = |t: i64, l: i64| {
            self.devices
                .iter()
                .find(|d| d.bus == bus && i64::from(d.addr.1) == t && i64::from(d.addr.2) == l)
        };
        let (t, l) = match (target, lun) {
            (None, lun) => {
                let l = lun.unwrap_or(0);
                let t = (0..=MAX_TARGET)
                    .find(|&t| used(t, l).is_none())
                    .ok_or_else(|| gen("no free target"))?;
                (t, l)
            }
            (Some(t), None) => {
                let l = (0..=MAX_LUN)
                    .find(|&l| used(t, l).is_none())
                    .ok_or_else(|| gen("no free lun"))?;
                (t, l)
            }
            (Some(t), Some(l)) => {
                if let Some(d) = used(t, l) {
                    return Err(gen(format!(
                        "lun already used by '{}'",
                        d.id.clone().unwrap_or_default()
                    )));
                }
                (t, l)
            }
        };
        Ok((chan as u32, t as u32, l as u32))
    }

    /// Picks the unit of an IDE or floppy device.
    fn unit(&self, model: Model, bus: &str, unit: Option<i64>) -> Result<u32, QmpError> {
        let what = if model == Model::Floppy {
            "floppy"
        } else {
            "IDE"
        };
        let taken = |u: i64| {
            self.devices
                .iter()
                .any(|d| d.bus == bus && i64::from(d.addr.1) == u)
        };
        let u = match unit {
            Some(u) if u >= 2 => {
                return Err(gen(format!(
                    "Can't create {what} unit {u}, bus supports only 2 units"
                )))
            }
            Some(u) if taken(u) => {
                let w = if model == Model::Floppy {
                    "Floppy"
                } else {
                    "IDE"
                };
                return Err(gen(format!("{w} unit {u} is in use")));
            }
            Some(u) => u,
            None => (0..2).find(|&u| !taken(u)).unwrap_or(0),
        };
        Ok(u as u32)
    }
}

/// The permissions a device takes on its backend (QEMU's
/// `blkconf_apply_backend_options`).
fn device_perm(read_only: bool, resizable: bool, share_rw: bool) -> PermPair {
    let mut perm = Perm::CONSISTENT_READ;
    if !read_only {
        perm = perm | Perm::WRITE;
    }
    let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
    if resizable {
        shared = shared | Perm::RESIZE;
    }
    if share_rw {
        shared = shared | Perm::WRITE;
    }
    PermPair { perm, shared }
}

impl Machine {
    /// `device_add` (`hotplug`) or `--device`: adds a device, as QEMU's
    /// `qdev_device_add_from_qdict` does, step by step with its errors.
    pub fn device_add(
        &self,
        graph: &BlockGraph,
        args: &Map<String, Value>,
        hotplug: bool,
    ) -> Result<(), QmpError> {
        let mut g = self.lock();
        let id = args.get("id").and_then(Value::as_str).map(str::to_string);
        if let Some(id) = &id {
            if !id_wellformed(id) {
                return Err(QmpError::invalid_parameter_value("id", "an identifier"));
            }
        }
        let driver = args
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let model = Model::lookup(driver)
            .ok_or_else(|| gen(format!("'{driver}' is not a valid device model name")))?;
        let typename = model.typename();
        let bus = g.find_bus(model, args.get("bus").and_then(Value::as_str))?;
        if hotplug && !bus.hotpluggable {
            return Err(gen(format!(
                "Bus '{}' does not support hotplugging",
                bus.name
            )));
        }
        let path = match &id {
            Some(id) => {
                if g.devices
                    .iter()
                    .any(|d| d.id.as_deref() == Some(id.as_str()))
                {
                    return Err(gen(format!("Duplicate device ID '{id}'")));
                }
                format!("/machine/peripheral/{id}")
            }
            None => {
                let n = g.anon_count;
                g.anon_count += 1;
                format!("/machine/peripheral-anon/device[{n}]")
            }
        };
        let mut props_out = Vec::new();
        let mut drive = None;
        for (k, v) in args {
            if matches!(k.as_str(), "driver" | "bus" | "id") {
                continue;
            }
            // Keyval lists from the command line: stats-intervals.0=...
            let key = k.split_once('.').map(|(a, _)| a).unwrap_or(k);
            let kind = props::kind(model, key)
                .ok_or_else(|| gen(format!("Property '{typename}.{k}' not found")))?;
            if matches!(v, Value::Array(_) | Value::Object(_)) && kind != Kind::Intervals {
                // QEMU's option conversion drops non-scalar values.
                continue;
            }
            let val = props::parse(typename, key, kind, v).map_err(gen)?;
            match (kind, &val) {
                (Kind::Drive, PropValue::Str(name)) => {
                    drive = Some(g.resolve_drive(graph, typename, name)?);
                }
                (Kind::Link, PropValue::Str(name)) => {
                    return Err(gen(format!(
                        "Property '{typename}.{key}' can't find value '{name}'"
                    )));
                }
                (Kind::Intervals, PropValue::List(l)) => {
                    if let Some((_, PropValue::List(prev))) = props_out
                        .iter_mut()
                        .find(|(n, _): &&mut (String, PropValue)| n == key)
                    {
                        prev.extend(l);
                        continue;
                    }
                }
                _ => {}
            }
            props_out.push((key.to_string(), val));
        }
        let mut dev = Device {
            id: id.clone(),
            model,
            path,
            bus: bus.name.clone(),
            child_bus: None,
            blk: None,
            addr: (0, 0, 0),
            props: props_out,
        };
        self.realize(&mut g, graph, &mut dev, drive)?;
        g.devices.push(dev);
        Ok(())
    }

    /// The model-specific part of adding a device.
    fn realize(
        &self,
        g: &mut Inner,
        graph: &BlockGraph,
        dev: &mut Device,
        drive: Option<DriveRef>,
    ) -> Result<(), QmpError> {
        let model = dev.model;
        if model == Model::VirtioScsiPci {
            dev.child_bus = Some(match &dev.id {
                Some(id) => format!("{id}.0"),
                None => {
                    let n = g.scsi_bus_count;
                    g.scsi_bus_count += 1;
                    format!("scsi.{n}")
                }
            });
            return Ok(());
        }
        if model == Model::VirtioBlkPci {
            if dev.prop_num("num-queues") == Some(0) {
                return Err(gen("num-queues property must be larger than 0"));
            }
            if let Some(q) = dev.prop_num("queue-size") {
                if !(q as u64).is_power_of_two() || !(2..=1024).contains(&q) {
                    return Err(gen(format!(
                        "invalid queue-size property ({q}), must be a power of 2 and between 2 and 1024"
                    )));
                }
            }
        }
        // Addresses first: they do not depend on the backend.
        match model {
            Model::ScsiHd | Model::ScsiCd => {
                dev.addr = g.scsi_addr(
                    &dev.bus,
                    dev.prop_num("channel"),
                    dev.prop_num("scsi-id"),
                    dev.prop_num("lun"),
                )?;
            }
            Model::IdeHd | Model::IdeCd | Model::Floppy => {
                dev.addr.1 = g.unit(model, &dev.bus, dev.prop_num("unit"))?;
            }
            _ => {}
        }
        let removable = dev.removable();
        let (blk, anon) = match drive {
            Some(DriveRef::Backend(b)) => (b, false),
            Some(DriveRef::Node(n)) => {
                let b = self.new_backend(
                    "",
                    PermPair {
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                    },
                );
                b.insert(graph, n).map_err(crate::qmp::qerr)?;
                (b, true)
            }
            None if removable => (
                self.new_backend(
                    "",
                    PermPair {
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                    },
                ),
                true,
            ),
            None if model == Model::IdeHd => return Err(gen("No drive specified")),
            None => return Err(gen("drive property not set")),
        };
        let undo = |blk: &Arc<BlockBackend>, old: Option<PermPair>| {
            blk.detach_dev();
            if anon {
                super::release_medium(graph, blk);
            } else if let Some(p) = old {
                let _ = blk.set_perm(graph, p);
            }
        };
        if !removable && !blk.is_inserted() {
            undo(&blk, None);
            return Err(gen("Device needs media, but drive is empty"));
        }
        let link = DeviceLink {
            id: dev.attached_id(),
            path: dev.attached_path(),
            removable,
            has_tray: matches!(model, Model::ScsiCd | Model::IdeCd | Model::ScsiHd) && removable,
            tray_open: false,
            locked: false,
            eject_request: false,
        };
        if !blk.attach_dev(link) {
            return Err(gen(format!(
                "Drive '{}' is already in use by another device",
                blk.name()
            )));
        }
        let old_perm = blk.perm();
        // CD-ROMs never write; an IDE disk always wants to (QEMU refuses a
        // read-only medium for it); the others follow their medium.
        let read_only = match model {
            Model::ScsiCd | Model::IdeCd => true,
            Model::IdeHd => false,
            _ => !blk.supports_write_perm(),
        };
        let resizable = matches!(model, Model::VirtioBlkPci | Model::ScsiHd | Model::IdeHd);
        let perm = device_perm(read_only, resizable, dev.prop_bool("share-rw"));
        if let Err(e) = blk.set_perm(graph, perm) {
            undo(&blk, Some(old_perm));
            return Err(crate::qmp::qerr(e));
        }
        if let Some(wce) = dev.prop_auto("write-cache") {
            blk.set_write_cache(wce);
        }
        let (mut r, mut w) = blk.on_error();
        if let Some(v) = dev.prop_str("rerror").and_then(device_on_error) {
            r = v;
        }
        if let Some(v) = dev.prop_str("werror").and_then(device_on_error) {
            w = v;
        }
        blk.set_on_error(r, w);
        blk.stats().setup(
            dev.prop_auto("account-invalid"),
            dev.prop_auto("account-failed"),
        );
        if let Some(PropValue::List(l)) = dev.prop("stats-intervals") {
            for &i in l {
                blk.stats().add_interval(i);
            }
        }
        if model != Model::Floppy {
            blk.iostatus_enable();
        }
        if anon {
            g.backends.push(super::BackendEntry {
                blk: blk.clone(),
                legacy: None,
            });
        }
        dev.blk = Some(blk);
        Ok(())
    }

    /// `device_del`: removes a device and everything on its buses at once,
    /// sending `DEVICE_DELETED` for each (children first). Returns the
    /// nodes to close.
    pub fn device_del(
        &self,
        graph: &BlockGraph,
        id: &str,
    ) -> Result<Vec<Arc<BlockNode>>, QmpError> {
        let mut g = self.lock();
        let (i, inner) = g.find_device_state(id)?;
        if inner {
            return Err(gen("Bus 'virtio-bus' does not support hotplugging"));
        }
        let bus = g.buses().into_iter().find(|b| b.name == g.devices[i].bus);
        if let Some(b) = bus.filter(|b| !b.hotpluggable) {
            return Err(gen(format!(
                "Bus '{}' does not support hotplugging",
                b.name
            )));
        }
        let dev = g.devices.remove(i);
        let mut events = Vec::new();
        let mut to_close = Vec::new();
        if let Some(child) = &dev.child_bus {
            // Children go newest first, as QEMU empties a bus.
            while let Some(pos) = g.devices.iter().rposition(|d| &d.bus == child) {
                let c = g.devices.remove(pos);
                to_close.extend(unplug_backend(&mut g, graph, &c));
                events.push(device_deleted(c.id.as_deref(), &c.path));
            }
        }
        to_close.extend(unplug_backend(&mut g, graph, &dev));
        if dev.model.is_virtio() {
            events.push(device_deleted(
                None,
                &format!("{}/virtio-backend", dev.path),
            ));
        }
        events.push(device_deleted(dev.id.as_deref(), &dev.path));
        drop(g);
        for e in &events {
            self.events.send(e);
        }
        Ok(to_close)
    }
}

/// Detaches a device's backend: anonymous ones and `--drive` ones go
/// with the device (QEMU's `blockdev_auto_del`).
fn unplug_backend(g: &mut Inner, graph: &BlockGraph, dev: &Device) -> Vec<Arc<BlockNode>> {
    let Some(blk) = &dev.blk else {
        return Vec::new();
    };
    blk.detach_dev();
    g.drop_backend(graph, blk)
}

/// A device's `rerror`/`werror` property: `auto` keeps the drive's policy.
fn device_on_error(v: &str) -> Option<OnError> {
    OnError::parse(v).filter(|p| *p != OnError::Auto)
}
