//! blockd's core: the block graph, the request path, permissions, and the
//! run state (the design of QEMU's `block.c`, `block/io.c` and
//! `block/block-backend.c`).
//!
//! * [`edge`] — who owns what: nodes, child edges, back-edges, roots.
//! * [`graph`] — names, insertion and removal, roots attaching and
//!   detaching, node replacement; every change all-or-nothing.
//! * [`perms`] — the permission refresh behind every change; [`perm`] —
//!   QEMU's permission model.
//! * [`root`] — the one root type (backends, exports and jobs hold one):
//!   permissions, a swappable root node, the quiesce gate.
//! * [`drain`] — drained sections over a node and everything above it.
//! * [`reopen`] — reopening nodes with new options, all-or-nothing;
//!   [`append`] — an overlay put on top of a node (snapshots) and taken off.
//! * [`control`] — the control-plane lock (the BQL's role).
//! * [`driver`] — the trait every block driver implements.
//! * [`node`] — a graph node and its request path (padding, read-modify-write,
//!   serialisation, detect-zeroes, statistics); [`tracked`] — in-flight
//!   request tracking.
//! * [`backend`] — block backends: the device front end on a root, with
//!   removable media, error policy and accounting ([`accounting`]).
//! * [`chain`] — walking backing chains; [`blocker`] — operation blockers;
//!   [`bitmap`] — dirty bitmaps; [`dirty`] — named dirty bitmaps on nodes
//!   ([`sha256`] hashes them as QEMU does);
//!   [`stored_bitmap`] — persistent bitmaps as drivers store them;
//!   [`throttle`] — leaky buckets (job speed, I/O limits).
//! * [`error`] — control-path errors; [`runstate`] — running/paused.
//! * `resize` — `block_resize`'s truncate with QEMU's checks.
//! * [`threshold`] — write thresholds (`BLOCK_WRITE_THRESHOLD`).
//! * [`snapshot`] — internal snapshots as formats report them.
//! * [`probe`] — image format signatures.
//! * [`qapi`] — QAPI enums shared by devices and jobs; `id_wellformed`.

pub mod accounting;
pub mod append;
pub mod backend;
pub mod bitmap;
pub mod blocker;
pub mod buf;
pub mod chain;
pub mod control;
pub mod dirty;
pub mod drain;
pub mod driver;
pub mod edge;
pub mod error;
pub mod graph;
pub mod node;
pub mod perm;
pub mod perms;
pub mod probe;
pub mod qapi;
pub mod reopen;
mod resize;
pub mod root;
pub mod runstate;
pub mod sha256;
pub mod snapshot;
pub mod stored_bitmap;
pub mod threshold;
pub mod throttle;
pub mod tracked;

pub use backend::BlockBackend;
pub use control::{ControlGuard, ControlLock};
pub use drain::DrainedSection;
pub use driver::{BlockDriver, BlockStatus, DriverInfo, IoFuture, IoLimits, ReqFlags, Staged};
pub use edge::{Child, ChildRef, Children, Parent};
pub use error::{BlockError, ErrorKind};
pub use graph::BlockGraph;
pub use node::{BlockNode, DetectZeroes, ExplicitOptions, NodeOptions};
pub use perm::{ChildRole, Perm, PermPair};
pub use reopen::{ReopenRequest, ReopenSpec};
pub use root::{Root, RootKind};
pub use stored_bitmap::{BitmapSource, StoredBitmap};
