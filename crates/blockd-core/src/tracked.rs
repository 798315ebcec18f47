//! In-flight request tracking: serialising overlapping requests that must
//! not race (the seed's `tracked_request_begin`/`wait_for_overlapping_requests`).
//!
//! Most requests run concurrently. A *serialising* request (a padded
//! read-modify-write, a copy-on-write) excludes every overlapping request
//! for its duration: it waits for overlapping requests in flight, and
//! requests that start later wait for it. Overlap is checked on ranges
//! widened to the given alignment, because read-modify-write touches whole
//! aligned blocks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
    /// How many of `entries` are serialising: while none is, a plain
    /// request never waits and need not look at the others.
    serialising: usize,
}

/// The set of requests in flight on one node.
///
/// The common case (no serialising request in flight, nobody waiting)
/// costs one uncontended lock to begin and one to end: the `Notify` is
/// only touched when somebody actually waits. (A lock-free fast mode,
/// counting plain requests without their ranges, measured slower, and
/// would have made a serialising request wait for unrelated ones.)
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<State>,
    /// Tasks registered on `changed` (begin or drain waiting).
    waiters: AtomicUsize,
    changed: Notify,
}

/// A request's place in the tracker; leaving scope ends it.
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        {
            let mut g = self.tracker.lock();
            if let Some(i) = g.entries.iter().position(|e| e.id == self.id) {
                let e = g.entries.swap_remove(i);
                if e.serialising {
                    g.serialising -= 1;
                }
            }
        }
        // A waiter registers (and counts itself) under the lock before
        // releasing it, so it is either counted here or saw the removal.
        if self.tracker.waiters.load(Ordering::Acquire) > 0 {
            self.tracker.changed.notify_waiters();
        }
    }
}

/// The future of [`Tracker::begin`].
pub enum Begin<'a> {
    /// Nothing to wait for.
    Ready(Option<Tracked<'a>>),
    /// Waiting for overlapping requests to end.
    Wait(Pin<Box<dyn Future<Output = Tracked<'a>> + Send + 'a>>),
}

impl<'a> Future for Begin<'a> {
    type Output = Tracked<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Tracked<'a>> {
        match self.get_mut() {
            Begin::Ready(t) => Poll::Ready(t.take().expect("Begin polled after completion")),
            Begin::Wait(f) => f.as_mut().poll(cx),
        }
    }
}

/// Uncounts a waiter when its wait ends (or its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().entries.len()
    }

    /// Starts a request on `[start, end)`. It waits while an overlapping
    /// request it must not race with is in flight: any overlapping request
    /// if this one is serialising, else any overlapping serialising one.
    ///
    /// The check is made here, at the call; only a request that has to
    /// wait gets a (boxed) waiting future. So the common case costs one
    /// uncontended lock, and `Begin` adds three words to the caller's
    /// future (request futures nest several layers deep and are moved
    /// around whole, so their size is paid for in copies).
    pub fn begin(&self, start: u64, end: u64, serialising: bool) -> Begin<'_> {
        match self.try_begin(start, end, serialising) {
            Some(t) => Begin::Ready(Some(t)),
            None => Begin::Wait(Box::pin(self.wait_begin(start, end, serialising))),
        }
    }

    fn blocked(g: &State, start: u64, end: u64, serialising: bool) -> bool {
        (serialising || g.serialising > 0)
            && g.entries
                .iter()
                .any(|e| (serialising || e.serialising) && overlaps((start, end), (e.start, e.end)))
    }

    fn insert(&self, g: &mut State, start: u64, end: u64, serialising: bool) -> Tracked<'_> {
        g.next_id += 1;
        let id = g.next_id;
        g.entries.push(Entry {
            id,
            start,
            end,
            serialising,
        });
        if serialising {
            g.serialising += 1;
        }
        Tracked { tracker: self, id }
    }

    /// Starts the request if nothing blocks it.
    fn try_begin(&self, start: u64, end: u64, serialising: bool) -> Option<Tracked<'_>> {
        let mut g = self.lock();
        if Self::blocked(&g, start, end, serialising) {
            return None;
        }
        Some(self.insert(&mut g, start, end, serialising))
    }

    async fn wait_begin(&self, start: u64, end: u64, serialising: bool) -> Tracked<'_> {
        self.wait_until(|g| {
            (!Self::blocked(g, start, end, serialising))
                .then(|| self.insert(g, start, end, serialising))
        })
        .await
    }

    /// Waits until no request is in flight (drain).
    pub async fn drain(&self) {
        self.wait_until(|g| g.entries.is_empty().then_some(()))
            .await
    }

    /// Waits until `ready` makes something of the state. It is checked
    /// under the lock, and interest is registered before the lock is
    /// released, so a request ending in between cannot be missed.
    async fn wait_until<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            let waiting = {
                let mut g = self.lock();
                if let Some(t) = ready(&mut g) {
                    return t;
                }
                notified.as_mut().enable();
                self.waiters.fetch_add(1, Ordering::AcqRel);
                Waiting(&self.waiters)
            };
            notified.await;
            drop(waiting);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn serialising_waits_for_overlap_only() {
        let t = Arc::new(Tracker::default());
        let a = t.begin(0, 4096, false).await;
        // Non-overlapping serialising request proceeds at once.
        let b = tokio::time::timeout(Duration::from_secs(1), t.begin(4096, 8192, true))
            .await
            .expect("disjoint ranges do not wait");
        drop(b);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let _g = t2.begin(1000, 2000, true).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "overlapping serialising request waits"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the overlap ends")
            .unwrap();
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn plain_requests_do_not_serialise_each_other() {
        let t = Tracker::default();
        let _a = t.begin(0, 100, false).await;
        let _b = tokio::time::timeout(Duration::from_secs(1), t.begin(0, 100, false))
            .await
            .expect("overlapping plain requests run concurrently");
        assert_eq!(t.in_flight(), 2);
    }

    #[tokio::test]
    async fn plain_waits_for_serialising_and_waiters_are_uncounted() {
        let t = Arc::new(Tracker::default());
        let s = t.begin(0, 4096, true).await;
        // Disjoint plain request: no wait even with a serialising one in flight.
        drop(
            tokio::time::timeout(Duration::from_secs(1), t.begin(8192, 12288, false))
                .await
                .expect("disjoint"),
        );
        // A waiter whose future is dropped leaves no count behind.
        let r = tokio::time::timeout(Duration::from_millis(20), t.begin(100, 200, false)).await;
        assert!(
            r.is_err(),
            "overlapping plain request waits for serialising"
        );
        assert_eq!(t.waiters.load(Ordering::Acquire), 0);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let _g = t2.begin(100, 200, false).await;
        });
        let t3 = t.clone();
        let drainer = tokio::spawn(async move { t3.drain().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished() && !drainer.is_finished());
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("plain request woken")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), drainer)
            .await
            .expect("drain woken")
            .unwrap();
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.lock().serialising, 0);
        assert_eq!(t.waiters.load(Ordering::Acquire), 0);
    }
}
