//! The state of a set of I/O limits (QEMU's `ThrottleState` and its
//! `LeakyBucket` arithmetic: `throttle_leak_bucket`,
//! `throttle_compute_wait`, `throttle_account`), with the clock passed in.
//!
//! Each bucket has a level that admitted requests add to and that drains
//! at the average rate. A request may start while every bucket it fills is
//! at or below its size; it then adds its whole size (so a level can pass
//! the size by one request). With a burst rate (`max`), the bucket's size
//! is `max × burst_length` and a second level, draining at `max`, keeps the
//! burst itself at the burst rate.
//!
//! Levels are kept in unit-nanoseconds (units × 10⁹), so that draining at
//! `avg` units per second is an exact integer subtraction per nanosecond;
//! nothing accumulates rounding error over long runs (QEMU uses doubles).
//!
//! **Deviation (more exact than QEMU):** without a burst rate QEMU lets
//! a tenth of a second's worth pile up (`avg / 10`), so every run starting
//! from idle gets 10% extra in its first second and a 10-second run
//! measures 1.01x of the limit. blockd's slack is a two-hundredth
//! ([`SLACK_DIV`]): 5 ms worth, enough to absorb a timer that fires late
//! on a busy machine (which would otherwise lose rate), small enough that
//! a one-second run stays within 1%. Likewise a burst's own rate is held
//! to `max` with 5 ms of slack instead of 100 ms.

use super::config::{BucketType, Direction, ThrottleConfig};

const NS: u128 = 1_000_000_000;

/// The slack of a bucket, as a fraction of its rate: `rate / SLACK_DIV`
/// units (5 ms worth). See the [module docs](self).
pub const SLACK_DIV: u128 = 200;

/// See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleState {
    cfg: ThrottleConfig,
    /// Per bucket, in unit-nanoseconds.
    level: [u128; 6],
    /// Per bucket, in unit-nanoseconds (bursts longer than a second).
    burst_level: [u128; 6],
    /// When the levels were last drained (ns on the caller's clock).
    last: u64,
}

impl ThrottleState {
    /// Empty buckets with limits `cfg`, at `now`.
    pub fn new(cfg: ThrottleConfig, now: u64) -> ThrottleState {
        ThrottleState {
            cfg,
            level: [0; 6],
            burst_level: [0; 6],
            last: now,
        }
    }

    /// The limits.
    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    /// New limits; the buckets start empty (QEMU's `throttle_config`).
    pub fn set_config(&mut self, cfg: ThrottleConfig, now: u64) {
        *self = ThrottleState::new(cfg, now.max(self.last));
    }

    fn leak(&mut self, now: u64) {
        let dt = u128::from(now.saturating_sub(self.last));
        self.last = self.last.max(now);
        if dt == 0 {
            return;
        }
        for (i, b) in self.cfg.buckets.iter().enumerate() {
            self.level[i] = self.level[i].saturating_sub(dt * u128::from(b.avg));
            if b.burst_length > 1 {
                self.burst_level[i] = self.burst_level[i].saturating_sub(dt * u128::from(b.max));
            }
        }
    }

    /// How long one bucket makes a request wait (QEMU's
    /// `throttle_compute_wait`).
    fn bucket_wait(&self, t: BucketType) -> u64 {
        let b = self.cfg.bucket(t);
        let i = t.index();
        if b.avg == 0 {
            return 0;
        }
        let (avg, max) = (u128::from(b.avg), u128::from(b.max));
        let (size, burst_size) = if b.max == 0 {
            (avg * NS / SLACK_DIV, 0)
        } else {
            (max * u128::from(b.burst_length) * NS, max * NS / SLACK_DIV)
        };
        if self.level[i] > size {
            return wait(self.level[i] - size, avg);
        }
        if b.burst_length > 1 && self.burst_level[i] > burst_size {
            return wait(self.burst_level[i] - burst_size, max);
        }
        0
    }

    /// How long a request in `dir` arriving at `now` must wait before it
    /// may start (0: at once). QEMU's `throttle_compute_wait_for`.
    pub fn wait_ns(&mut self, dir: Direction, now: u64) -> u64 {
        self.leak(now);
        BucketType::for_direction(dir)
            .into_iter()
            .map(|t| self.bucket_wait(t))
            .max()
            .unwrap_or(0)
    }

    /// Counts a request of `bytes` in `dir` started at `now` (QEMU's
    /// `throttle_account`): its bytes in the byte buckets, one operation
    /// (or `bytes / iops_size` of them if larger) in the operation ones.
    pub fn account(&mut self, dir: Direction, bytes: u64, now: u64) {
        self.leak(now);
        let op_size = self.cfg.op_size;
        let units = if op_size != 0 && bytes > op_size {
            u128::from(bytes) * NS / u128::from(op_size)
        } else {
            NS
        };
        for t in BucketType::for_direction(dir) {
            let b = self.cfg.bucket(t);
            if b.avg == 0 {
                continue;
            }
            let add = if t.is_bytes() {
                u128::from(bytes) * NS
            } else {
                units
            };
            self.level[t.index()] += add;
            if b.burst_length > 1 {
                self.burst_level[t.index()] += add;
            }
        }
    }
}

/// Nanoseconds for `excess` unit-nanoseconds to drain at `rate` units per
/// second, rounded up.
fn wait(excess: u128, rate: u128) -> u64 {
    excess.div_ceil(rate).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests;
