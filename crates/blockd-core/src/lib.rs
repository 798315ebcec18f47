//! blockd's core: the block graph, the request path, permissions, and the
//! run state (the design of QEMU's `block.c`, `block/io.c` and
//! `block/block-backend.c`).
//!
//! * [`control`] — the control-plane lock (the BQL's role).
//! * [`driver`] — the trait every block driver implements, and child edges.
//! * [`node`] — a graph node and its request path (padding, read-modify-write,
//!   serialisation, detect-zeroes, statistics).
//! * [`tracked`] — in-flight request tracking.
//! * [`graph`] — names, users, permission propagation, insertion and removal.
//! * [`perm`] — QEMU's permission model.
//! * [`error`] — control-path errors.
//! * [`runstate`] — running/paused.
//! * [`backend`] — block backends: the device-side root of a graph, with
//!   removable media, error policy and accounting ([`accounting`]).
//! * [`probe`] — image format signatures.
//! * [`qapi`] — QAPI enums shared by devices and jobs; `id_wellformed`.

pub mod accounting;
pub mod backend;
pub mod control;
pub mod driver;
pub mod error;
pub mod graph;
pub mod node;
pub mod perm;
pub mod probe;
pub mod qapi;
pub mod runstate;
pub mod tracked;

pub use backend::BlockBackend;
pub use control::{ControlGuard, ControlLock};
pub use driver::{
    BlockDriver, BlockStatus, Child, ChildRef, DriverInfo, IoFuture, IoLimits, ReqFlags,
};
pub use error::{BlockError, ErrorKind};
pub use graph::BlockGraph;
pub use node::{BlockNode, DetectZeroes, NodeOptions};
pub use perm::{ChildRole, Perm, PermPair};
