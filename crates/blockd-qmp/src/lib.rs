//! QMP, QEMU's JSON monitor protocol, as blockd speaks it.
//!
//! * [`json`] — the QEMU-dialect streaming JSON parser (byte stream, not lines).
//! * [`schema`] — blockd's schema, argument checking and introspection.
//! * [`wire`] — message encoding (ASCII, CRLF) and the request envelope.
//! * [`dispatch`] — the command table and typed handlers.
//! * [`events`] — event fan-out to negotiated clients.
//! * [`server`] — listeners, connections, ordering, shutdown.
//!
//! The crate knows nothing about block devices: the server is generic over
//! the state its handlers share.

pub mod dispatch;
pub mod error;
pub mod events;
pub mod json;
pub mod schema;
pub mod server;
pub mod wire;

pub use dispatch::{Ctx, Dispatcher, Empty, NoArgs, RawReply, Reply, Session};
pub use error::{ErrorClass, QmpError};
pub use events::{Event, EventBus, Shutdown, ShutdownCause};
pub use server::{QmpServer, ServerConfig};
