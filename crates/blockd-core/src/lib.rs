//! blockd's core: the block graph, backends, the request path, throttling
//! and error policy (the design of QEMU's `block.c`, `block/io.c` and
//! `block/block-backend.c`).
//!
//! So far: [`runstate`], the server-wide running/paused state that
//! `stop`/`cont` switch and that the request path will wait on.

pub mod runstate;
