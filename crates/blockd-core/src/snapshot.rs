//! Internal snapshots as the block layer sees them (QEMU's
//! `QEMUSnapshotInfo`, `block/snapshot.c`): what a format that keeps
//! snapshots in the image (qcow2) lists, creates and deletes through
//! [`crate::BlockDriver`].

/// One internal snapshot (QAPI's `SnapshotInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The unique id the image gave it (`"1"`, `"2"`, ...).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Size of the saved VM state (always 0 for snapshots blockd takes).
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u64,
    /// Creation time: nanoseconds within the second.
    pub date_nsec: u64,
    /// The guest clock when taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The record/replay instruction count, if any.
    pub icount: Option<u64>,
    /// The virtual disk size when taken.
    pub disk_size: u64,
}

impl SnapshotInfo {
    /// The QAPI `SnapshotInfo` object, members in QEMU's order.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("name".into(), self.name.clone().into());
        m.insert("vm-state-size".into(), self.vm_state_size.into());
        m.insert("date-sec".into(), self.date_sec.into());
        m.insert("date-nsec".into(), self.date_nsec.into());
        m.insert(
            "vm-clock-sec".into(),
            (self.vm_clock_nsec / 1_000_000_000).into(),
        );
        m.insert(
            "vm-clock-nsec".into(),
            (self.vm_clock_nsec % 1_000_000_000).into(),
        );
        if let Some(i) = self.icount {
            m.insert("icount".into(), i.into());
        }
        serde_json::Value::Object(m)
    }
}
