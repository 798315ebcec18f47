//! Rate limiting: QEMU's leaky buckets (`util/throttle.c`), in integer
//! nanoseconds with the clock passed in, so that the arithmetic is exact
//! and testable without a runtime. Block jobs pace themselves with one
//! bucket (`speed`); I/O throttling builds on the same buckets.

mod bucket;

pub use bucket::LeakyBucket;
