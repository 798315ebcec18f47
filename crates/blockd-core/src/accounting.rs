//! I/O accounting of a block backend (QEMU's `block/accounting.c`).
//!
//! A device front end brackets every request it issues: [`AcctStats::start`]
//! before, then [`AcctStats::done`] or [`AcctStats::failed`] when it
//! completes; requests it refuses before issuing them (out of range) are
//! counted with [`AcctStats::invalid`]. The counters are what
//! `query-blockstats` reports for the backend:
//!
//! * bytes, operations, total latency and merged requests per type;
//! * failed and invalid operations (with `account_failed` set, failed
//!   requests also count towards latency and the idle time; with
//!   `account_invalid`, invalid ones reset the idle time);
//! * the time of the last access (`idle_time_ns` is measured from it and
//!   is absent before the first access);
//! * optional timed statistics: for every configured interval, the
//!   minimum, maximum and average latency and the average queue depth,
//!   over a window of that length that slides by half its length
//!   (QEMU's `TimedAverage`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// The kinds of request that are accounted (QEMU's `BlockAcctType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcctType {
    /// Reads.
    Read = 0,
    /// Writes, including write-zeroes.
    Write = 1,
    /// Zone appends (never issued by blockd; always zero).
    ZoneAppend = 2,
    /// Flushes.
    Flush = 3,
    /// Discards.
    Unmap = 4,
}

const TYPES: usize = 5;

/// Nanoseconds on a monotonic clock private to the process; never zero, so
/// that zero can mean "never".
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A request being accounted: what [`AcctStats::start`] returns.
#[derive(Debug, Clone, Copy)]
#[must_use = "a started request must be completed with done() or failed()"]
pub struct Cookie {
    start_ns: u64,
    bytes: u64,
    ty: AcctType,
}

/// One window of a [`TimedAverage`].
#[derive(Debug, Clone, Copy)]
struct Window {
    min: u64,
    max: u64,
    sum: u64,
    count: u64,
    expiration: u64,
}

impl Window {
    fn reset(&mut self) {
        self.min = u64::MAX;
        self.max = 0;
        self.sum = 0;
        self.count = 0;
    }
}

/// Minimum, maximum and average of values over a sliding period: two
/// windows of the period's length, offset by half of it, both fed with
/// every value; the older one is reported.
#[derive(Debug, Clone)]
struct TimedAverage {
    period: u64,
    windows: [Window; 2],
    current: usize,
}

impl TimedAverage {
    fn new(period: u64, now: u64) -> Self {
        let empty = Window {
            min: u64::MAX,
            max: 0,
            sum: 0,
            count: 0,
            expiration: 0,
        };
        let mut w = [empty; 2];
        w[0].expiration = now + period / 2;
        w[1].expiration = now + period;
        TimedAverage {
            period,
            windows: w,
            current: 0,
        }
    }

    /// Restarts expired windows; returns the time elapsed in the window
    /// that is reported.
    fn check(&mut self, now: u64) -> u64 {
        for w in &mut self.windows {
            if w.expiration <= now {
                w.reset();
                let elapsed = (now - w.expiration) % self.period;
                w.expiration = now + (self.period - elapsed);
            }
        }
        self.current = if self.windows[0].expiration < self.windows[1].expiration {
            0
        } else {
            1
        };
        let remaining = self.windows[self.current].expiration.saturating_sub(now);
        self.period.saturating_sub(remaining)
    }

    fn account(&mut self, value: u64, now: u64) {
        self.check(now);
        for w in &mut self.windows {
            w.sum += value;
            w.count += 1;
            w.min = w.min.min(value);
            w.max = w.max.max(value);
        }
    }

    /// (min, max, avg, sum, elapsed) of the reported window.
    fn read(&mut self, now: u64) -> (u64, u64, u64, u64, u64) {
        let elapsed = self.check(now);
        let w = &self.windows[self.current];
        let min = if w.min < u64::MAX { w.min } else { 0 };
        let avg = w.sum.checked_div(w.count).unwrap_or(0);
        (min, w.max, avg, w.sum, elapsed)
    }
}

/// The timed statistics of one interval.
#[derive(Debug, Clone)]
struct TimedStats {
    interval_length: u32,
    latency: [TimedAverage; TYPES],
}

/// Latency figures of one type within a timed interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimedLatency {
    /// Minimum latency in the window (0 if none).
    pub min_ns: u64,
    /// Maximum latency in the window.
    pub max_ns: u64,
    /// Average latency in the window (0 if none).
    pub avg_ns: u64,
    /// Average number of requests in flight over the window.
    pub avg_queue_depth: f64,
}

/// One entry of `timed_stats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimedSnapshot {
    /// The interval length in seconds.
    pub interval_length: u32,
    /// Reads.
    pub read: TimedLatency,
    /// Writes.
    pub write: TimedLatency,
    /// Zone appends.
    pub zone_append: TimedLatency,
    /// Flushes.
    pub flush: TimedLatency,
}

/// Counters of one request type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeCounters {
    /// Bytes transferred by completed requests.
    pub bytes: u64,
    /// Completed requests.
    pub ops: u64,
    /// Requests refused as invalid before being issued.
    pub invalid: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Total latency in nanoseconds.
    pub total_time_ns: u64,
    /// Requests merged into others.
    pub merged: u64,
}

/// A consistent copy of a backend's statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcctSnapshot {
    /// Reads.
    pub read: TypeCounters,
    /// Writes (including write-zeroes).
    pub write: TypeCounters,
    /// Zone appends.
    pub zone_append: TypeCounters,
    /// Flushes.
    pub flush: TypeCounters,
    /// Discards.
    pub unmap: TypeCounters,
    /// Nanoseconds since the last access, if there was one.
    pub idle_time_ns: Option<u64>,
    /// Whether invalid requests count as accesses.
    pub account_invalid: bool,
    /// Whether failed requests count towards latency and accesses.
    pub account_failed: bool,
    /// Timed statistics, one per configured interval.
    pub timed: Vec<TimedSnapshot>,
}

#[derive(Debug)]
struct Inner {
    counters: [TypeCounters; TYPES],
    last_access_ns: u64,
    account_invalid: bool,
    account_failed: bool,
    intervals: Vec<TimedStats>,
}

/// The statistics of a backend. All methods take `&self`.
#[derive(Debug)]
pub struct AcctStats {
    inner: Mutex<Inner>,
    /// Requests started and not yet completed, per type (queue depth).
    inflight: [AtomicU64; TYPES],
}

impl Default for AcctStats {
    fn default() -> Self {
        AcctStats {
            inner: Mutex::new(Inner {
                counters: [TypeCounters::default(); TYPES],
                last_access_ns: 0,
                account_invalid: true,
                account_failed: true,
                intervals: Vec::new(),
            }),
            inflight: Default::default(),
        }
    }
}

impl AcctStats {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `account_invalid` / `account_failed`; `None` keeps the current
    /// value (QEMU's `auto`).
    pub fn setup(&self, account_invalid: Option<bool>, account_failed: Option<bool>) {
        let mut g = self.lock();
        if let Some(v) = account_invalid {
            g.account_invalid = v;
        }
        if let Some(v) = account_failed {
            g.account_failed = v;
        }
    }

    /// Adds a timed-statistics interval of `seconds` (> 0).
    pub fn add_interval(&self, seconds: u32) {
        let period = u64::from(seconds.max(1)) * 1_000_000_000;
        let now = now_ns();
        let ts = TimedStats {
            interval_length: seconds,
            latency: std::array::from_fn(|_| TimedAverage::new(period, now)),
        };
        self.lock().intervals.push(ts);
    }

    /// Starts accounting a request of `bytes` bytes.
    pub fn start(&self, bytes: u64, ty: AcctType) -> Cookie {
        self.inflight[ty as usize].fetch_add(1, Ordering::Relaxed);
        Cookie {
            start_ns: now_ns(),
            bytes,
            ty,
        }
    }

    fn finish(&self, c: Cookie, failed: bool) {
        self.inflight[c.ty as usize].fetch_sub(1, Ordering::Relaxed);
        let now = now_ns();
        let latency = now.saturating_sub(c.start_ns);
        let mut g = self.lock();
        let t = c.ty as usize;
        if failed {
            g.counters[t].failed += 1;
        } else {
            g.counters[t].bytes += c.bytes;
            g.counters[t].ops += 1;
        }
        if !failed || g.account_failed {
            g.counters[t].total_time_ns += latency;
            g.last_access_ns = now;
            for i in &mut g.intervals {
                i.latency[t].account(latency, now);
            }
        }
    }

    /// A started request completed.
    pub fn done(&self, c: Cookie) {
        self.finish(c, false);
    }

    /// A started request failed.
    pub fn failed(&self, c: Cookie) {
        self.finish(c, true);
    }

    /// A started request will be issued again (the error policy stopped
    /// the server): it leaves the queue without being counted.
    pub fn cancel(&self, c: Cookie) {
        self.inflight[c.ty as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// A request was refused as invalid before it was issued.
    pub fn invalid(&self, ty: AcctType) {
        let mut g = self.lock();
        g.counters[ty as usize].invalid += 1;
        if g.account_invalid {
            g.last_access_ns = now_ns();
        }
    }

    /// `num` requests were merged into others.
    pub fn merged(&self, ty: AcctType, num: u64) {
        self.lock().counters[ty as usize].merged += num;
    }

    /// A copy of every counter, with the timed statistics evaluated now.
    pub fn snapshot(&self) -> AcctSnapshot {
        let now = now_ns();
        let mut g = self.lock();
        let c = g.counters;
        let idle = (g.last_access_ns > 0).then(|| now.saturating_sub(g.last_access_ns));
        let mut timed = Vec::with_capacity(g.intervals.len());
        for i in &mut g.intervals {
            let mut one = |t: AcctType| {
                let (min, max, avg, sum, elapsed) = i.latency[t as usize].read(now);
                TimedLatency {
                    min_ns: min,
                    max_ns: max,
                    avg_ns: avg,
                    avg_queue_depth: if elapsed > 0 {
                        sum as f64 / elapsed as f64
                    } else {
                        0.0
                    },
                }
            };
            let snap = TimedSnapshot {
                interval_length: i.interval_length,
                read: one(AcctType::Read),
                write: one(AcctType::Write),
                zone_append: one(AcctType::ZoneAppend),
                flush: one(AcctType::Flush),
            };
            timed.push(snap);
        }
        AcctSnapshot {
            read: c[AcctType::Read as usize],
            write: c[AcctType::Write as usize],
            zone_append: c[AcctType::ZoneAppend as usize],
            flush: c[AcctType::Flush as usize],
            unmap: c[AcctType::Unmap as usize],
            idle_time_ns: idle,
            account_invalid: g.account_invalid,
            account_failed: g.account_failed,
            timed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_failed_invalid() {
        let s = AcctStats::default();
        assert_eq!(s.snapshot().idle_time_ns, None);
        let c = s.start(4096, AcctType::Read);
        s.done(c);
        let c = s.start(512, AcctType::Write);
        s.failed(c);
        s.invalid(AcctType::Flush);
        let snap = s.snapshot();
        assert_eq!(snap.read.ops, 1);
        assert_eq!(snap.read.bytes, 4096);
        assert_eq!(snap.write.ops, 0);
        assert_eq!(snap.write.bytes, 0);
        assert_eq!(snap.write.failed, 1);
        assert_eq!(snap.flush.invalid, 1);
        assert!(snap.idle_time_ns.is_some());
        assert!(snap.account_invalid && snap.account_failed);
    }

    #[test]
    fn failed_requests_do_not_touch_time_without_account_failed() {
        let s = AcctStats::default();
        s.setup(Some(false), Some(false));
        let c = s.start(1, AcctType::Read);
        s.failed(c);
        s.invalid(AcctType::Read);
        let snap = s.snapshot();
        assert_eq!(snap.idle_time_ns, None);
        assert_eq!(snap.read.failed, 1);
        assert_eq!(snap.read.invalid, 1);
        assert_eq!(snap.read.total_time_ns, 0);
        // None keeps the current setting.
        s.setup(None, Some(true));
        let snap = s.snapshot();
        assert!(!snap.account_invalid && snap.account_failed);
    }

    #[test]
    fn timed_average_windows() {
        let mut t = TimedAverage::new(1000, 10);
        t.account(5, 20);
        t.account(15, 30);
        let (min, max, avg, sum, elapsed) = t.read(40);
        assert_eq!((min, max, avg, sum), (5, 15, 10, 20));
        // The reported window (window 0) started half a period before t=10.
        assert_eq!(elapsed, 530);
        // Far in the future both windows restarted: nothing to report.
        let (min, max, avg, sum, _) = t.read(1_000_000);
        assert_eq!((min, max, avg, sum), (0, 0, 0, 0));
    }

    #[test]
    fn intervals_show_up_in_snapshots() {
        let s = AcctStats::default();
        s.add_interval(60);
        let c = s.start(10, AcctType::Write);
        s.done(c);
        let snap = s.snapshot();
        assert_eq!(snap.timed.len(), 1);
        assert_eq!(snap.timed[0].interval_length, 60);
        assert!(snap.timed[0].write.max_ns >= snap.timed[0].write.min_ns);
        assert_eq!(snap.timed[0].read, TimedLatency::default());
    }
}
