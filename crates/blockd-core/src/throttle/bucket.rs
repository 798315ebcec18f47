//! One leaky bucket (QEMU's `LeakyBucket`): a level that requests add to
//! and that drains at the average rate; a request must wait while the
//! level is above the bucket's size, for as long as the excess takes to
//! drain.
//!
//! Levels are kept in unit-nanoseconds (units × 10⁹) so that draining at
//! `avg` units per second is an exact integer subtraction per nanosecond
//! elapsed; nothing accumulates rounding error over long runs.

const NS: u128 = 1_000_000_000;

/// See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakyBucket {
    /// Units per second (0: unlimited).
    avg: u64,
    /// How many units may pile up before requests wait (the burst).
    size: u64,
    /// The level in unit-nanoseconds.
    level: u128,
    /// When the level was last drained (ns on the caller's clock).
    last: u64,
}

impl LeakyBucket {
    /// A bucket draining `avg` units per second that lets `size` units pile
    /// up before requests wait. `avg == 0` never waits.
    pub fn new(avg: u64, size: u64) -> LeakyBucket {
        LeakyBucket {
            avg,
            size,
            level: 0,
            last: 0,
        }
    }

    /// The rate (units per second; 0: unlimited).
    pub fn avg(&self) -> u64 {
        self.avg
    }

    /// Changes the rate, keeping the level (QEMU keeps it too).
    pub fn set_avg(&mut self, avg: u64, now: u64) {
        self.leak(now);
        self.avg = avg;
    }

    /// Changes the burst size, keeping the level.
    pub fn set_size(&mut self, size: u64) {
        self.size = size;
    }

    fn leak(&mut self, now: u64) {
        let dt = u128::from(now.saturating_sub(self.last));
        self.last = self.last.max(now);
        self.level = self.level.saturating_sub(dt * u128::from(self.avg));
    }

    /// How long a request arriving at `now` must wait (0: go).
    pub fn wait_ns(&mut self, now: u64) -> u64 {
        if self.avg == 0 {
            return 0;
        }
        self.leak(now);
        let size = u128::from(self.size) * NS;
        if self.level <= size {
            return 0;
        }
        let excess = self.level - size;
        excess
            .div_ceil(u128::from(self.avg))
            .min(u128::from(u64::MAX)) as u64
    }

    /// Adds `units` done at `now` to the level.
    pub fn account(&mut self, units: u64, now: u64) {
        if self.avg == 0 {
            return;
        }
        self.leak(now);
        self.level += u128::from(units) * NS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_average_exactly() {
        // 1 MiB/s in 64 KiB requests, no burst: each request waits for the
        // previous one to drain; 160 requests take 10 s (to the ns).
        let mut b = LeakyBucket::new(1 << 20, 0);
        let mut now = 0u64;
        for _ in 0..160 {
            now += b.wait_ns(now);
            b.account(65536, now);
        }
        now += b.wait_ns(now);
        assert_eq!(now, 10 * 1_000_000_000);
    }

    #[test]
    fn burst_size_lets_requests_through_and_unlimited_never_waits() {
        let mut b = LeakyBucket::new(1000, 3000);
        for _ in 0..3 {
            assert_eq!(b.wait_ns(0), 0);
            b.account(1000, 0);
        }
        b.account(1000, 0);
        assert_eq!(b.wait_ns(0), 1_000_000_000);
        assert_eq!(b.wait_ns(500_000_000), 500_000_000);
        let mut u = LeakyBucket::new(0, 0);
        u.account(u64::MAX, 0);
        assert_eq!(u.wait_ns(0), 0);
    }

    #[test]
    fn a_faster_rate_drains_sooner() {
        let mut b = LeakyBucket::new(100, 0);
        b.account(100, 0);
        assert_eq!(b.wait_ns(0), 1_000_000_000);
        b.set_avg(200, 0);
        assert_eq!(b.wait_ns(0), 500_000_000);
    }
}
