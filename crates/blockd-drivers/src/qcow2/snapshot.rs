//! Internal snapshots (QEMU's `block/qcow2-snapshot.c`): the snapshot
//! table's entries, and taking and deleting snapshots.
//!
//! A snapshot is an entry in the snapshot table pointing at a copy of the
//! active L1 table. Taking one (`qcow2_snapshot_create`) copies the L1
//! table, raises the refcount of every cluster the active tables reach
//! (L2 tables and data) by one and clears `QCOW_OFLAG_COPIED` on their
//! entries, so the next guest write to any of them copies it first; then
//! a new snapshot table with the entry appended replaces the old one.
//! Deleting one (`qcow2_snapshot_delete`) first writes the table without
//! it, then drops the references its L1 table held, frees that L1 table,
//! and sets `QCOW_OFLAG_COPIED` again where the active tables are the only
//! user left. The metadata side is in `meta/snapshot.rs`.

use std::io;

use blockd_core::snapshot::SnapshotInfo;

use super::Qcow2Driver;

/// Size of the extra data blockd writes (`QCowSnapshotExtraData`:
/// 64-bit VM state size, disk size, icount).
const EXTRA_LEN: usize = 24;

/// One entry of the snapshot table, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Its entries.
    pub l1_size: u32,
    /// The unique id.
    pub id: String,
    /// The name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// The extra data, kept as stored (fields blockd does not know too).
    pub extra: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SnapEntry {
    /// The length of the entry whose fixed 40 bytes are `h`.
    pub fn stored_len(h: &[u8]) -> u64 {
        let id = u64::from(u16::from_be_bytes([h[12], h[13]]));
        let name = u64::from(u16::from_be_bytes([h[14], h[15]]));
        let extra = u64::from(be32(h, 36));
        (40 + extra + id + name).div_ceil(8) * 8
    }

    /// Parses one whole entry (`b` holds at least [`SnapEntry::stored_len`]).
    pub fn parse(b: &[u8]) -> SnapEntry {
        let id_len = u16::from_be_bytes([b[12], b[13]]) as usize;
        let name_len = u16::from_be_bytes([b[14], b[15]]) as usize;
        let extra_len = be32(b, 36) as usize;
        let e = 40 + extra_len;
        SnapEntry {
            l1_table_offset: be64(b, 0),
            l1_size: be32(b, 8),
            date_sec: be32(b, 16),
            date_nsec: be32(b, 20),
            vm_clock_nsec: be64(b, 24),
            vm_state_size: be32(b, 32),
            extra: b[40..e].to_vec(),
            id: String::from_utf8_lossy(&b[e..e + id_len]).into_owned(),
            name: String::from_utf8_lossy(&b[e + id_len..e + id_len + name_len]).into_owned(),
        }
    }

    /// The stored form, padded to 8 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.id.len() + self.name.len());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_state_size.to_be_bytes());
        b.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.extra);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
        b
    }

    /// As the block layer shows it.
    pub fn info(&self) -> SnapshotInfo {
        let x = &self.extra;
        let vm_state_size = if x.len() >= 8 {
            be64(x, 0)
        } else {
            u64::from(self.vm_state_size)
        };
        let disk_size = if x.len() >= 16 { be64(x, 8) } else { 0 };
        let icount = (x.len() >= 24)
            .then(|| be64(x, 16))
            .filter(|&i| i != u64::MAX);
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: u64::from(self.date_nsec),
            vm_clock_nsec: self.vm_clock_nsec,
            icount,
            disk_size,
        }
    }

    /// A new entry for a snapshot of the active L1 table (not yet copied).
    pub fn new(sn: &SnapshotInfo, id: String, l1_table_offset: u64, l1_size: u32) -> SnapEntry {
        let mut extra = Vec::with_capacity(EXTRA_LEN);
        extra.extend_from_slice(&sn.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&sn.disk_size.to_be_bytes());
        extra.extend_from_slice(&sn.icount.unwrap_or(u64::MAX).to_be_bytes());
        SnapEntry {
            l1_table_offset,
            l1_size,
            id,
            name: sn.name.clone(),
            date_sec: sn.date_sec as u32,
            date_nsec: sn.date_nsec as u32,
            vm_clock_nsec: sn.vm_clock_nsec,
            vm_state_size: sn.vm_state_size as u32,
            extra,
        }
    }
}

/// QEMU's `find_new_snapshot_id`: one more than the largest numeric id.
pub fn new_id(entries: &[SnapEntry]) -> String {
    let max = entries
        .iter()
        .map(|e| {
            // strtoul: leading digits, 0 without any.
            let d: String = e.id.chars().take_while(|c| c.is_ascii_digit()).collect();
            d.parse::<u64>().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// QEMU's `find_snapshot_by_id_and_name`.
pub fn find(entries: &[SnapEntry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    entries.iter().position(|e| match (id, name) {
        (Some(i), Some(n)) => e.id == i && e.name == n,
        (Some(i), None) => e.id == i,
        (None, Some(n)) => e.name == n,
        (None, None) => false,
    })
}

impl Qcow2Driver {
    fn publish_snapshots(&self, entries: &[SnapEntry]) {
        *self
            .shown
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = entries.iter().map(SnapEntry::info).collect();
    }

    pub(super) async fn do_snapshot_create(
        &self,
        mut sn: SnapshotInfo,
    ) -> io::Result<SnapshotInfo> {
        if self.read_only.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        // Everything written and every pending free applied: refcounts
        // are exact before they are raised.
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        if m.snapshots.len() as u64 >= super::header::MAX_SNAPSHOTS {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        sn.disk_size = m.geo.size;
        let id = new_id(&m.snapshots);
        m.snapshot_create(&sn, id.clone()).await?;
        self.publish_snapshots(&m.snapshots);
        sn.id = id;
        Ok(sn)
    }

    pub(super) async fn do_snapshot_delete(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> io::Result<SnapshotInfo> {
        if self.read_only.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        let Some(i) = find(&m.snapshots, id, name) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "Can't find the snapshot",
            ));
        };
        let e = m.snapshot_delete(i).await?;
        self.publish_snapshots(&m.snapshots);
        Ok(e.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_ids_count_up() {
        let sn = SnapshotInfo {
            name: "snap-one".into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 3_000_000_007,
            disk_size: 1 << 20,
            ..SnapshotInfo::default()
        };
        let e = SnapEntry::new(&sn, "7".into(), 0x50000, 1);
        let b = e.encode();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(SnapEntry::stored_len(&b) as usize, b.len());
        let back = SnapEntry::parse(&b);
        assert_eq!(back, e);
        let info = back.info();
        assert_eq!(info.id, "7");
        assert_eq!(info.disk_size, 1 << 20);
        assert_eq!(info.icount, None);
        assert_eq!(new_id(std::slice::from_ref(&e)), "8");
        assert_eq!(new_id(&[]), "1");
        assert_eq!(
            find(std::slice::from_ref(&e), Some("7"), Some("snap-one")),
            Some(0)
        );
        assert_eq!(
            find(std::slice::from_ref(&e), Some("7"), Some("other")),
            None
        );
        assert_eq!(find(&[e], None, Some("snap-one")), Some(0));
    }
}
