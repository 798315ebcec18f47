//! Event delivery to every negotiated client, and the one way to emit an
//! event: [`EventBus::send`] with a value of a type implementing [`Event`]
//! (its name, and its `data` as the type serialises it), so that a call
//! site cannot misspell an event or one of its members. Each event's type
//! lives in the crate that emits it ([`Shutdown`] here, the server's
//! events in `blockd::events`); the job layer types its own events and
//! hands them over serialised through its sink ([`EventBus::forward`]).
//!
//! An event is encoded once and queued on each subscriber's outgoing queue,
//! the same queue that carries its command replies, so an event emitted
//! while a command runs reaches that client before the command's reply (as
//! with QEMU). Emitting never waits: a client whose queue is full has
//! stopped reading its socket; it is disconnected (its already received
//! commands still run), rather than letting it stall the server or grow
//! memory without bound.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::schema::Schema;
use crate::wire;

/// An event: a struct whose serialisation is the event's `data`, with the
/// members named as on the wire (optional ones as `Option`s skipped when
/// `None`), or a unit struct for an event without data.
pub trait Event: Serialize {
    /// The event's name on the wire.
    const NAME: &'static str;
}

/// `ShutdownCause`: why the server shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    /// The `quit` command.
    HostQmpQuit,
    /// SIGTERM or SIGINT (and a failed start-up).
    HostSignal,
}

/// `SHUTDOWN`: sent once, after every received command was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shutdown {
    /// Always false: blockd has no guest.
    pub guest: bool,
    /// Why.
    pub reason: ShutdownCause,
}

impl Event for Shutdown {
    const NAME: &'static str = "SHUTDOWN";
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    kill: CancellationToken,
}

/// Fans events out to subscribed connections.
#[derive(Clone)]
pub struct EventBus {
    subs: Arc<Mutex<Vec<Subscriber>>>,
    schema: Arc<Schema>,
}

impl EventBus {
    /// A bus with no subscribers; event data is checked against `schema`
    /// in debug builds.
    pub fn new(schema: Arc<Schema>) -> Self {
        EventBus {
            subs: Arc::default(),
            schema,
        }
    }

    /// Adds a connection's outgoing queue; `kill` is cancelled if it overflows.
    pub fn subscribe(&self, id: u64, tx: mpsc::Sender<Bytes>, kill: CancellationToken) {
        self.lock().push(Subscriber { id, tx, kill });
    }

    /// Removes a connection.
    pub fn unsubscribe(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }

    /// Removes every connection (at shutdown, after the last event).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Number of subscribed connections.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `{"event": NAME, "data": DATA, "timestamp": ...}` to every
    /// subscriber; an event without data (a unit struct) has no `data`.
    pub fn send<E: Event>(&self, event: &E) {
        let data = serde_json::to_value(event)
            .unwrap_or_else(|e| panic!("event {} does not serialise: {e}", E::NAME));
        self.deliver(E::NAME, (!data.is_null()).then_some(data));
    }

    /// Sends an event that a crate below this one typed and serialised
    /// itself: the job layer's events, which reach the server through its
    /// `JobEvents` sink as a name and a `data` object. Checked against the
    /// schema in debug builds, as every event is.
    pub fn forward(&self, name: &str, data: Value) {
        self.deliver(name, Some(data));
    }

    fn deliver(&self, name: &str, data: Option<Value>) {
        if cfg!(debug_assertions) {
            self.debug_check(name, data.as_ref());
        }
        let mut m = Map::new();
        m.insert("event".into(), name.into());
        if let Some(d) = data {
            m.insert("data".into(), d);
        }
        m.insert("timestamp".into(), wire::timestamp());
        let bytes = wire::encode(&Value::Object(m));
        tracing::debug!(event = name, "emit");
        self.lock().retain(|s| match s.tx.try_send(bytes.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    session = s.id,
                    event = name,
                    "client not reading its events: disconnecting it"
                );
                s.kill.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    fn debug_check(&self, name: &str, data: Option<&Value>) {
        let Some(def) = self.schema.event(name) else {
            panic!("event {name} is not in the schema");
        };
        let empty = Value::Object(Map::new());
        if let Err(e) = self.schema.check_value(&def.data, data.unwrap_or(&empty)) {
            panic!("event {name} does not match the schema: {}", e.desc);
        }
    }
}
