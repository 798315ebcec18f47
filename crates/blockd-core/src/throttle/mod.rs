//! Rate limiting: QEMU's leaky buckets (`util/throttle.c`), in integer
//! nanoseconds with the clock passed in, so that the arithmetic is exact
//! and testable without a runtime.
//!
//! * [`LeakyBucket`] — one bucket: a block job's `speed`.
//! * [`ThrottleConfig`] — I/O limits as QEMU's `block_set_io_throttle`
//!   and `throttle-group` objects set them, with QEMU's validation.
//! * [`ThrottleState`] — the six buckets of a set of limits.
//! * [`group`] — throttle groups: members sharing one state, queued
//!   requests served round-robin on timers (QEMU's `throttle-groups.c`).

mod bucket;
mod config;
pub mod group;
mod state;

pub use bucket::LeakyBucket;
pub use config::{BucketConfig, BucketType, Direction, ThrottleConfig, THROTTLE_VALUE_MAX};
pub use group::{ThrottleGroup, ThrottleGroups, ThrottleMember};
pub use state::{ThrottleState, SLACK_DIV};
