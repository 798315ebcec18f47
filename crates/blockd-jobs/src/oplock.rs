//! A re-entrant, thread-owned lock that serialises lifecycle operations of
//! one [`crate::JobManager`] (the role of QEMU's BQL for jobs).
//!
//! Every status change, every job command and every finalization runs while
//! holding it, so driver callbacks and event emission see a stable job list
//! and events of different operations never interleave. Re-entrancy lets a
//! callback or an event sink running inside an operation start another
//! operation on the same thread. The guard is `!Send`, so it cannot be held
//! across an `.await` in a spawned task.

use std::marker::PhantomData;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};

#[derive(Default)]
struct Owner {
    thread: Option<ThreadId>,
    depth: usize,
}

/// See the [module docs](self).
#[derive(Default)]
pub(crate) struct OpLock {
    owner: Mutex<Owner>,
    released: Condvar,
}

/// Proof of holding the [`OpLock`]; releases one level on drop.
pub(crate) struct OpGuard<'a> {
    lock: &'a OpLock,
    outermost: bool,
    _not_send: PhantomData<*const ()>,
}

impl OpLock {
    fn owner(&self) -> MutexGuard<'_, Owner> {
        self.owner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Acquires the lock, or another level of it if this thread holds it.
    pub(crate) fn lock(&self) -> OpGuard<'_> {
        let me = thread::current().id();
        let mut owner = self.owner();
        loop {
            match owner.thread {
                None => {
                    owner.thread = Some(me);
                    owner.depth = 1;
                    break;
                }
                Some(t) if t == me => {
                    owner.depth += 1;
                    break;
                }
                Some(_) => {
                    owner = self
                        .released
                        .wait(owner)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
        let outermost = owner.depth == 1;
        OpGuard {
            lock: self,
            outermost,
            _not_send: PhantomData,
        }
    }
}

impl OpGuard<'_> {
    /// True for the first level taken on this thread: the level that flushes
    /// queued events before releasing.
    pub(crate) fn is_outermost(&self) -> bool {
        self.outermost
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let mut owner = self.lock.owner();
        owner.depth -= 1;
        if owner.depth == 0 {
            owner.thread = None;
            drop(owner);
            self.lock.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reentrant_on_one_thread() {
        let lock = OpLock::default();
        let a = lock.lock();
        assert!(a.is_outermost());
        let b = lock.lock();
        assert!(!b.is_outermost());
        drop(b);
        drop(a);
        assert!(lock.lock().is_outermost());
    }

    #[test]
    fn exclusive_across_threads() {
        let lock = Arc::new(OpLock::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                let inside = inside.clone();
                thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = lock.lock();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
