//! The command table: schema-checked arguments in, typed handlers, JSON out.
//!
//! Every command a client can run is a schema entry with a registered
//! handler; [`Dispatcher::missing_handlers`] and the panic in
//! [`Dispatcher::register`] keep the two in step (a test asserts both ways).
//! A handler receives its arguments already checked against the schema (so
//! missing, unknown and mistyped members have been answered with QEMU's
//! errors) and deserialised into its own argument struct.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::schema::Schema;

/// What one client connection carries into a command.
#[derive(Debug, Default)]
pub struct Session {
    /// A number unique to this connection within the server's lifetime.
    pub id: u64,
    /// File descriptors received with SCM_RIGHTS and not yet claimed by a
    /// command (`getfd`, `add-fd`), oldest first.
    pub fds: Mutex<Vec<OwnedFd>>,
    /// Descriptors named with `getfd`, per connection as in QEMU.
    pub named_fds: Mutex<std::collections::HashMap<String, OwnedFd>>,
}

impl Session {
    /// Takes the most recently received file descriptor, as QEMU's `getfd` does.
    pub fn take_fd(&self) -> Option<OwnedFd> {
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

/// What a handler gets besides its arguments.
pub struct Ctx<S> {
    /// The server's shared state.
    pub state: Arc<S>,
    /// The client connection the command came from.
    pub session: Arc<Session>,
}

/// Argument struct for commands without arguments.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Return value for commands that return an empty object.
#[derive(Debug, Default, Serialize)]
pub struct Empty {}

/// A return value already encoded as JSON text, sent as it is: for large
/// query replies that are cheaper to write straight out than to build as a
/// [`Value`]. The text must be one JSON value of the command's return type,
/// ASCII only (see [`crate::wire::to_ascii_json`]).
#[derive(Debug, Clone)]
pub struct RawReply(pub String);

impl Serialize for RawReply {
    /// Only for completeness: the dispatcher passes a `RawReply` through
    /// without serialising it. As a value it is the JSON it holds.
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        let v: Value = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        v.serialize(s)
    }
}

/// What a command returned: a value, or encoded JSON text.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A value.
    Value(Value),
    /// JSON text to send as it is.
    Raw(String),
}

impl Reply {
    /// The reply as a value (raw text is parsed).
    pub fn into_value(self) -> Result<Value, QmpError> {
        match self {
            Reply::Value(v) => Ok(v),
            Reply::Raw(s) => serde_json::from_str(&s)
                .map_err(|e| QmpError::generic(format!("internal error: bad raw reply: {e}"))),
        }
    }
}

/// Turns a handler's return value into a [`Reply`]: values and raw text
/// pass through as they are, anything else is serialised.
fn to_reply<R: Serialize + 'static>(cmd: &str, ret: R) -> Result<Reply, QmpError> {
    let any: Box<dyn std::any::Any> = Box::new(ret);
    let any = match any.downcast::<Value>() {
        Ok(v) => return Ok(Reply::Value(*v)),
        Err(a) => a,
    };
    let any = match any.downcast::<RawReply>() {
        Ok(r) => return Ok(Reply::Raw(r.0)),
        Err(a) => a,
    };
    let ret = any
        .downcast::<R>()
        .map_err(|_| QmpError::generic("internal error: reply type"))?;
    serde_json::to_value(*ret)
        .map(Reply::Value)
        .map_err(|e| QmpError::generic(format!("internal error: bad reply of '{cmd}': {e}")))
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Reply, QmpError>> + Send>>;
type Handler<S> = Box<dyn Fn(Ctx<S>, Value) -> HandlerFuture + Send + Sync>;

/// Maps command names to handlers, checking arguments against the schema.
pub struct Dispatcher<S> {
    schema: Arc<Schema>,
    handlers: HashMap<String, Handler<S>>,
    builtin: Vec<String>,
}

impl<S: Send + Sync + 'static> Dispatcher<S> {
    /// An empty table over a schema.
    pub fn new(schema: Arc<Schema>) -> Self {
        Dispatcher {
            schema,
            handlers: HashMap::new(),
            builtin: Vec::new(),
        }
    }

    /// The schema.
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// Registers the handler of a schema command.
    ///
    /// # Panics
    /// If `name` is not a command of the schema or already has a handler:
    /// both are programming errors that every test run would show.
    pub fn register<A, R, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
        F: Fn(Ctx<S>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
    {
        assert!(
            self.schema.command(name).is_some(),
            "handler registered for '{name}', which the schema does not define"
        );
        let f = Arc::new(f);
        let cmd = name.to_string();
        let handler: Handler<S> = Box::new(move |ctx, args| {
            let f = f.clone();
            let cmd = cmd.clone();
            Box::pin(async move {
                let args: A = serde_json::from_value(args).map_err(|e| {
                    tracing::error!(command = %cmd, error = %e, "schema and handler disagree");
                    QmpError::generic(format!(
                        "internal error: arguments of '{cmd}' do not fit its handler: {e}"
                    ))
                })?;
                let ret = f(ctx, args).await?;
                to_reply(&cmd, ret)
            })
        });
        if self.handlers.insert(name.to_string(), handler).is_some() {
            panic!("two handlers registered for '{name}'");
        }
        self
    }

    /// Declares a schema command that the connection layer itself answers
    /// (such as `qmp_capabilities`), so it counts as handled.
    pub fn register_builtin(&mut self, name: &str) -> &mut Self {
        assert!(
            self.schema.command(name).is_some(),
            "unknown builtin '{name}'"
        );
        self.builtin.push(name.to_string());
        self
    }

    /// Schema commands that have no handler (should be empty).
    pub fn missing_handlers(&self) -> Vec<String> {
        self.schema
            .commands()
            .iter()
            .map(|c| c.name.clone())
            .filter(|n| !self.handlers.contains_key(n) && !self.builtin.contains(n))
            .collect()
    }

    /// Whether a command exists.
    pub fn has_command(&self, name: &str) -> bool {
        self.handlers.contains_key(name) || self.builtin.contains(&name.to_string())
    }

    /// Checks the arguments and runs the command.
    pub async fn dispatch(
        &self,
        ctx: Ctx<S>,
        name: &str,
        args: Option<&Map<String, Value>>,
    ) -> Result<Reply, QmpError> {
        let Some(handler) = self.handlers.get(name) else {
            return Err(QmpError::command_not_found(name));
        };
        let args = self.schema.check_command_args(name, args)?;
        handler(ctx, args).await
    }
}
