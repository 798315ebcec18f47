//! In-flight request tracking: serialising overlapping requests that must
//! not race (the seed's `tracked_request_begin`/`wait_for_overlapping_requests`).
//!
//! Most requests run concurrently. A *serialising* request (a padded
//! read-modify-write, a copy-on-write) excludes every overlapping request
//! for its duration: it waits for overlapping requests in flight, and
//! requests that start later wait for it. Overlap is checked on ranges
//! widened to the given alignment, because read-modify-write touches whole
//! aligned blocks.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

/// The set of requests in flight on one node.
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<(u64, Vec<Entry>)>,
    changed: Notify,
}

/// A request's place in the tracker; leaving scope ends it.
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut g = self.tracker.lock();
        g.1.retain(|e| e.id != self.id);
        drop(g);
        self.tracker.changed.notify_waiters();
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Entry>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().1.len()
    }

    /// Starts a request on `[start, end)`. It waits while an overlapping
    /// request it must not race with is in flight: any overlapping request
    /// if this one is serialising, else any overlapping serialising one.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> Tracked<'_> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a request ending between
            // the check and the wait cannot be missed.
            notified.as_mut().enable();
            {
                let mut g = self.lock();
                let blocked = g.1.iter().any(|e| {
                    (serialising || e.serialising) && overlaps((start, end), (e.start, e.end))
                });
                if !blocked {
                    g.0 += 1;
                    let id = g.0;
                    g.1.push(Entry {
                        id,
                        start,
                        end,
                        serialising,
                    });
                    return Tracked { tracker: self, id };
                }
            }
            notified.await;
        }
    }

    /// Waits until no request is in flight (drain).
    pub async fn drain(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().1.is_empty() {
                return;
            }
            notified.await;
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
}
