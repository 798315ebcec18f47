//! File descriptors passed by clients: named descriptors (`getfd`,
//! `closefd`) and descriptor sets (`add-fd`, `remove-fd`, `query-fdsets`)
//! that nodes open as `/dev/fdset/N`, as libvirt uses them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use blockd_core::BlockError;
use blockd_drivers::FdSets;

struct SetFd {
    fd: OwnedFd,
    opaque: Option<String>,
}

/// The descriptor sets of the server (shared by all connections).
#[derive(Default)]
pub struct FdSetStore {
    /// Sets by id; descriptors oldest first.
    sets: Mutex<BTreeMap<i64, Vec<SetFd>>>,
}

impl FdSetStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Vec<SetFd>>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a descriptor to set `id` (or to a new set with the lowest free
    /// id); returns `(set id, fd number)`.
    pub fn add(
        &self,
        id: Option<i64>,
        fd: OwnedFd,
        opaque: Option<String>,
    ) -> Result<(i64, i64), String> {
        let mut sets = self.lock();
        let id = match id {
            Some(i) if i < 0 => {
                return Err("Parameter 'fdset-id' expects a non-negative value".into());
            }
            Some(i) => i,
            None => (0..).find(|i| !sets.contains_key(i)).unwrap_or(0),
        };
        let raw = i64::from(fd.as_raw_fd());
        sets.entry(id).or_default().push(SetFd { fd, opaque });
        Ok((id, raw))
    }

    /// Closes descriptor `fd` of set `id`, or the whole set.
    pub fn remove(&self, id: i64, fd: Option<i64>) -> Result<(), String> {
        let mut sets = self.lock();
        let not_found = || match fd {
            Some(f) => format!("File descriptor named 'fdset-id:{id}, fd:{f}' not found"),
            None => format!("File descriptor named 'fdset-id:{id}' not found"),
        };
        let set = sets.get_mut(&id).ok_or_else(not_found)?;
        match fd {
            Some(f) => {
                let before = set.len();
                set.retain(|s| i64::from(s.fd.as_raw_fd()) != f);
                if set.len() == before {
                    return Err(not_found());
                }
            }
            None => set.clear(),
        }
        if set.is_empty() {
            sets.remove(&id);
        }
        Ok(())
    }

    /// `query-fdsets`: sets in descending id order, descriptors oldest
    /// first (QEMU's order).
    pub fn query(&self) -> serde_json::Value {
        let sets = self.lock();
        let list: Vec<serde_json::Value> = sets
            .iter()
            .rev()
            .map(|(id, fds)| {
                let fds: Vec<serde_json::Value> = fds
                    .iter()
                    .map(|s| {
                        let mut m = serde_json::Map::new();
                        m.insert("fd".into(), s.fd.as_raw_fd().into());
                        if let Some(o) = &s.opaque {
                            m.insert("opaque".into(), o.clone().into());
                        }
                        serde_json::Value::Object(m)
                    })
                    .collect();
                serde_json::json!({"fdset-id": id, "fds": fds})
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

impl FdSets for FdSetStore {
    fn dup_for(&self, set: i64, writable: bool) -> Result<OwnedFd, BlockError> {
        let sets = self.lock();
        let fds = sets.get(&set).ok_or_else(|| {
            BlockError::io(
                format!("Could not open '/dev/fdset/{set}'"),
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )
        })?;
        let want = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        for s in fds {
            // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
            let fl = unsafe { libc::fcntl(s.fd.as_raw_fd(), libc::F_GETFL) };
            if fl >= 0 && fl & libc::O_ACCMODE == want {
                return s
                    .fd
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| BlockError::io(format!("Could not open '/dev/fdset/{set}'"), e));
            }
        }
        Err(BlockError::io(
            format!("Could not open '/dev/fdset/{set}'"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        ))
    }
}
