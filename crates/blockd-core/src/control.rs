//! The control-plane lock: the role of QEMU's big QEMU lock (BQL) for
//! graph changes.
//!
//! Commands that change the graph (add, delete, reopen, replace a node,
//! insert or remove a medium, add or remove an export) and the steps that
//! start and finish jobs take this lock, and may hold it across `.await`s
//! (a drained section waits for requests in flight; a job's `prepare`
//! flushes and reopens). So a transaction of several graph changes sees no
//! other graph change in between, whichever QMP connection sends it.
//!
//! It is an async, fair (FIFO) lock. Nothing on the data path takes it, and
//! queries do not either: they read the graph under its own short
//! synchronous lock, so a command waiting for a long drain never delays a
//! query or I/O. It is not re-entrant: a function that needs the lock and
//! may be called by a holder takes a `&ControlGuard` as proof instead of
//! locking again.

use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct ControlLock {
    inner: Arc<Mutex<()>>,
}

/// Proof of holding the [`ControlLock`]; releases it on drop. It is
/// `Send`, so it may be held across `.await`s in spawned tasks.
#[derive(Debug)]
pub struct ControlGuard {
    _guard: OwnedMutexGuard<()>,
    lock: Arc<Mutex<()>>,
}

impl ControlLock {
    /// A new, unlocked lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the lock (first come, first served).
    pub async fn lock(&self) -> ControlGuard {
        ControlGuard {
            _guard: self.inner.clone().lock_owned().await,
            lock: self.inner.clone(),
        }
    }

    /// The lock, if nobody holds it.
    pub fn try_lock(&self) -> Option<ControlGuard> {
        let g = self.inner.clone().try_lock_owned().ok()?;
        Some(ControlGuard {
            _guard: g,
            lock: self.inner.clone(),
        })
    }

    /// Whether `guard` is a guard of this lock (for assertions).
    pub fn holds(&self, guard: &ControlGuard) -> bool {
        Arc::ptr_eq(&self.inner, &guard.lock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_across_awaits_and_fifo() {
        let lock = ControlLock::new();
        let g = lock.lock().await;
        assert!(lock.holds(&g));
        assert!(lock.try_lock().is_none());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (lock, order) = (lock.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _g = lock.lock().await;
                order.lock().unwrap().push(i);
            }));
            // Let each waiter queue before the next one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(order.lock().unwrap().is_empty(), "held across an await");
        drop(g);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        let other = ControlLock::new();
        assert!(!other.holds(&lock.lock().await));
    }
}
