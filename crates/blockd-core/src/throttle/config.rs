//! I/O limits (QEMU's `ThrottleConfig`, `util/throttle.c`): six buckets
//! (bytes and operations; total, read, write), each with an average rate,
//! an optional burst rate (`max`) and the burst's length in seconds, plus
//! the operation size that counts a large request as several operations.
//!
//! [`ThrottleConfig::validate`] is QEMU's `throttle_is_valid`, with its
//! messages and in its order of checks.

/// The largest rate or burst QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// A request's direction (QEMU's `ThrottleDirection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Reads.
    Read = 0,
    /// Writes, write-zeroes and discards.
    Write = 1,
}

impl Direction {
    /// Both directions, reads first.
    pub const ALL: [Direction; 2] = [Direction::Read, Direction::Write];

    /// The index in per-direction arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The buckets (QEMU's `BucketType`), in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketType {
    /// `bps`: bytes per second, both directions.
    BpsTotal = 0,
    /// `bps_rd`.
    BpsRead = 1,
    /// `bps_wr`.
    BpsWrite = 2,
    /// `iops`: operations per second, both directions.
    OpsTotal = 3,
    /// `iops_rd`.
    OpsRead = 4,
    /// `iops_wr`.
    OpsWrite = 5,
}

impl BucketType {
    /// All six, in QEMU's order.
    pub const ALL: [BucketType; 6] = [
        BucketType::BpsTotal,
        BucketType::BpsRead,
        BucketType::BpsWrite,
        BucketType::OpsTotal,
        BucketType::OpsRead,
        BucketType::OpsWrite,
    ];

    /// The index in [`ThrottleConfig::buckets`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the bucket counts bytes (else operations).
    pub fn is_bytes(self) -> bool {
        (self as usize) < 3
    }

    /// The buckets a request in `dir` fills (QEMU's `to_check` and
    /// `bucket_types_size`/`bucket_types_units`).
    pub fn for_direction(dir: Direction) -> [BucketType; 4] {
        match dir {
            Direction::Read => [
                BucketType::BpsTotal,
                BucketType::OpsTotal,
                BucketType::BpsRead,
                BucketType::OpsRead,
            ],
            Direction::Write => [
                BucketType::BpsTotal,
                BucketType::OpsTotal,
                BucketType::BpsWrite,
                BucketType::OpsWrite,
            ],
        }
    }
}

/// One bucket's limits (the configuration part of QEMU's `LeakyBucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Units per second (0: unlimited).
    pub avg: u64,
    /// Units per second during a burst (0: no burst).
    pub max: u64,
    /// How many seconds a burst at `max` may last (1 unless set).
    pub burst_length: u64,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A set of I/O limits. The default limits nothing (QEMU's
/// `throttle_config_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleConfig {
    /// Indexed by [`BucketType::index`].
    pub buckets: [BucketConfig; 6],
    /// `iops_size`: a request larger than this counts as
    /// `size / op_size` operations (0: every request is one).
    pub op_size: u64,
}

impl ThrottleConfig {
    /// The bucket of type `t`.
    pub fn bucket(&self, t: BucketType) -> &BucketConfig {
        &self.buckets[t.index()]
    }

    /// The bucket of type `t`, to change.
    pub fn bucket_mut(&mut self, t: BucketType) -> &mut BucketConfig {
        &mut self.buckets[t.index()]
    }

    /// Whether anything is limited (QEMU's `throttle_enabled`).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's `throttle_is_valid`: the same checks in the same order, with
    /// its messages.
    pub fn validate(&self) -> Result<(), String> {
        let b = |t: BucketType| self.bucket(t);
        let conflict =
            |t: BucketType, r: BucketType, w: BucketType, f: fn(&BucketConfig) -> u64| {
                f(b(t)) != 0 && (f(b(r)) != 0 || f(b(w)) != 0)
            };
        use BucketType::*;
        if conflict(BpsTotal, BpsRead, BpsWrite, |x| x.avg)
            || conflict(OpsTotal, OpsRead, OpsWrite, |x| x.avg)
            || conflict(BpsTotal, BpsRead, BpsWrite, |x| x.max)
            || conflict(OpsTotal, OpsRead, OpsWrite, |x| x.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.op_size != 0 && b(OpsTotal).avg == 0 && b(OpsRead).avg == 0 && b(OpsWrite).avg == 0
        {
            return Err("iops size requires an iops value to be set".into());
        }
        for bkt in &self.buckets {
            if bkt.avg > THROTTLE_VALUE_MAX || bkt.max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if bkt.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if bkt.burst_length > 1 && bkt.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if bkt.max != 0 && bkt.burst_length > THROTTLE_VALUE_MAX / bkt.max {
                return Err("burst length too high for this burst rate".into());
            }
            if bkt.max != 0 && bkt.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if bkt.max != 0 && bkt.max < bkt.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BucketType::*;

    fn cfg(f: impl FnOnce(&mut ThrottleConfig)) -> Result<(), String> {
        let mut c = ThrottleConfig::default();
        f(&mut c);
        c.validate()
    }

    #[test]
    fn qemu_checks_in_qemu_order() {
        assert!(cfg(|_| {}).is_ok());
        assert!(!ThrottleConfig::default().enabled());
        let e = |r: Result<(), String>| r.unwrap_err();
        assert_eq!(
            e(cfg(|c| {
                c.bucket_mut(BpsTotal).avg = 1;
                c.bucket_mut(BpsWrite).avg = 1;
            })),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(cfg(|c| {
                c.bucket_mut(OpsTotal).max = 1;
                c.bucket_mut(OpsRead).max = 1;
            })),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            e(cfg(|c| c.op_size = 4096)),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            e(cfg(|c| c.bucket_mut(BpsRead).avg = -1i64 as u64)),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            e(cfg(|c| c.bucket_mut(BpsRead).burst_length = 0)),
            "the burst length cannot be 0"
        );
        assert_eq!(
            e(cfg(|c| c.bucket_mut(BpsRead).burst_length = 2)),
            "burst length set without burst rate"
        );
        assert_eq!(
            e(cfg(|c| {
                let b = c.bucket_mut(OpsWrite);
                b.avg = 10;
                b.max = THROTTLE_VALUE_MAX;
                b.burst_length = 2;
            })),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            e(cfg(|c| c.bucket_mut(BpsTotal).max = 5)),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            e(cfg(|c| {
                c.bucket_mut(BpsTotal).avg = 10;
                c.bucket_mut(BpsTotal).max = 5;
            })),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        let mut ok = ThrottleConfig::default();
        ok.bucket_mut(BpsRead).avg = 10;
        ok.bucket_mut(OpsWrite).avg = 10;
        ok.op_size = 512;
        assert!(ok.validate().is_ok() && ok.enabled());
    }
}
