//! Block drivers for blockd, one module each, all implementing
//! [`blockd_core::BlockDriver`]; plus [`open`], which opens a tree of
//! nodes for `blockdev-add`, [`implicit`], which opens an image by file
//! name (a medium, a backing file: protocol node, probe, format node),
//! [`filename`], which says what an image name (`json:`, a protocol URI,
//! a file) opens, [`reopen`], which turns `blockdev-reopen`'s options into
//! a reopen of the graph, and [`options`], the typed options.
//!
//! Drivers only ever see aligned, bounds-checked requests: the core's
//! request layer pads and serialises for them.

pub mod blkdebug;
pub mod create;
pub mod file;
pub mod filename;
mod filename_nbd;
pub mod filename_rbd;
pub mod implicit;
pub mod nbd;
pub mod null;
pub mod open;
pub mod options;
pub mod qcow2;
pub mod raw;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod reopen;
pub mod secrets;
pub mod throttle;

pub use implicit::{open_image, ImageRequest, OpenedImage};
pub use open::{blockdev_add, open_implicit, Env, FdSets, NamedFds, OpenCtx};
pub use reopen::blockdev_reopen;
