//! The QMP command handlers (blockd's `blockdev.c`/`qmp.c`): thin functions
//! that check what the schema cannot, call into the core, and choose the
//! error class per call site as QEMU does.

use blockd_qmp::Dispatcher;

use crate::state::State;

mod amend;
mod backend;
mod backup;
mod bitmap;
mod block;
mod blockjob;
mod control;
mod device;
mod drive_job;
mod export;
pub mod image;
mod job;
mod misc;
mod object;
mod qom;
mod resize;
mod snapshot;
mod snapshot_internal;
mod throttle;
mod transaction;

pub use block::{block_device_info, close_nodes, image_info, qerr};
pub use job::jerr;

/// Builds the command table: every schema command gets its handler here.
pub fn dispatcher(schema: std::sync::Arc<blockd_qmp::schema::Schema>) -> Dispatcher<State> {
    let mut d = Dispatcher::new(schema);
    d.register_builtin("qmp_capabilities");
    control::register(&mut d);
    block::register(&mut d);
    misc::register(&mut d);
    job::register(&mut d);
    blockjob::register(&mut d);
    backup::register(&mut d);
    bitmap::register(&mut d);
    drive_job::register(&mut d);
    export::register(&mut d);
    device::register(&mut d);
    backend::register(&mut d);
    throttle::register(&mut d);
    object::register(&mut d);
    qom::register(&mut d);
    snapshot::register(&mut d);
    snapshot_internal::register(&mut d);
    transaction::register(&mut d);
    resize::register(&mut d);
    amend::register(&mut d);
    d
}
