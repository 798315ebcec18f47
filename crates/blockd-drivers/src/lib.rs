//! Block drivers for blockd: `file`, `raw`, `qcow2`, `null-co`, `blkdebug`,
//! `throttle` and the `nbd` client, one module each, all implementing the
//! core's driver trait. Drivers only ever see aligned, bounds-checked
//! requests: the core's request layer pads and serialises for them.
//!
//! (The drivers arrive with the block-graph issue; this crate holds the
//! place in the workspace so the dependency structure is fixed from the start.)
