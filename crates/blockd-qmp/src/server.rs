//! The QMP server: listeners, connections, negotiation, ordering, shutdown.
//!
//! Each connection runs three tasks joined by bounded queues:
//!
//! ```text
//!  socket ──► reader ──(parsed items, ≤ REQUEST_QUEUE)──► executor ──┐
//!             (JSON stream parser,                       (one command │
//!              SCM_RIGHTS fds)                             at a time)  ▼
//!  socket ◄── writer ◄──(encoded messages, ≤ OUTGOING_QUEUE)── replies + events
//! ```
//!
//! * Commands of one connection run one after another and are answered in
//!   order; connections are independent, so a slow command on one never
//!   delays another client's queries (QEMU serialises all monitors).
//! * Backpressure instead of buffering: a client that does not read its
//!   replies stops its own executor, which stops its reader.
//! * A command that was fully received is run even if the client hangs up.
//! * Shutdown ([`QmpServer::shutdown`]): stop accepting and reading, let
//!   every executor answer what it already received, send `SHUTDOWN`, flush,
//!   close.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::events::{Shutdown, ShutdownCause};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::{Ctx, Dispatcher, Reply, Session};
use crate::error::{ErrorClass, QmpError};
use crate::events::EventBus;
use crate::json::{JsonError, Limits, StreamParser};
use crate::wire;

/// Parsed input items a connection may hold before it stops reading.
pub const REQUEST_QUEUE: usize = 8;
/// Outgoing messages (replies and events) queued for a client before an
/// event overflow disconnects it.
pub const OUTGOING_QUEUE: usize = 4096;
/// Most file descriptors a connection may hold unclaimed; extra ones are closed.
pub const MAX_PENDING_FDS: usize = 64;

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `version` member of the greeting (and `query-version`).
    pub version: Value,
    /// JSON input limits per message.
    pub limits: Limits,
    /// How long shutdown waits for running commands.
    pub drain_timeout: Duration,
}

/// A QMP server over shared state `S`.
pub struct QmpServer<S> {
    dispatcher: Arc<Dispatcher<S>>,
    state: Arc<S>,
    events: EventBus,
    config: ServerConfig,
    /// Cancelled when the server shuts down.
    stop: CancellationToken,
    executors: TaskTracker,
    io_tasks: TaskTracker,
    next_session: AtomicU64,
}

impl<S: Send + Sync + 'static> QmpServer<S> {
    /// A server; `events` must be the bus that `state` emits events on.
    pub fn new(
        dispatcher: Dispatcher<S>,
        state: Arc<S>,
        events: EventBus,
        config: ServerConfig,
    ) -> Arc<Self> {
        Arc::new(QmpServer {
            dispatcher: Arc::new(dispatcher),
            state,
            events,
            config,
            stop: CancellationToken::new(),
            executors: TaskTracker::new(),
            io_tasks: TaskTracker::new(),
            next_session: AtomicU64::new(1),
        })
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Arc<Dispatcher<S>> {
        &self.dispatcher
    }

    /// Runs a command outside any client connection (command-line options
    /// such as `--blockdev` use this).
    pub async fn execute(&self, name: &str, args: Value) -> Result<Value, QmpError> {
        let Value::Object(m) = args else {
            return Err(QmpError::generic("arguments must be a JSON object"));
        };
        let ctx = Ctx {
            state: self.state.clone(),
            session: Arc::new(Session::default()),
        };
        self.dispatcher
            .dispatch(ctx, name, Some(&m))
            .await?
            .into_value()
    }

    /// Accepts connections on `listener` until shutdown.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        let me = self.clone();
        self.io_tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = me.stop.cancelled() => break,
                    r = listener.accept() => match r {
                        Ok((stream, _)) => me.clone().connection(stream),
                        Err(e) => {
                            // EMFILE and friends: wait a little rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
    }

    /// Serves one client connection.
    pub fn connection(self: Arc<Self>, stream: UnixStream) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            id,
            ..Session::default()
        });
        tracing::debug!(session = id, "client connected");
        let (rd, wr) = stream.into_split();
        let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(OUTGOING_QUEUE);
        let kill = CancellationToken::new();
        let greeting = json!({"QMP": {"version": self.config.version, "capabilities": []}});
        // The queue is empty: the greeting always fits.
        let _ = out_tx.try_send(wire::encode(&greeting));

        self.io_tasks.spawn(writer(wr, out_rx, kill.clone()));
        let me = self.clone();
        let s = session.clone();
        let k = kill.clone();
        self.io_tasks
            .spawn(async move { me.reader(rd, req_tx, s, k).await });
        let me = self.clone();
        self.executors
            .spawn(async move { me.executor(req_rx, out_tx, session, kill).await });
    }

    async fn reader(
        self: Arc<Self>,
        rd: OwnedReadHalf,
        req_tx: mpsc::Sender<Result<Value, JsonError>>,
        session: Arc<Session>,
        kill: CancellationToken,
    ) {
        let mut parser = StreamParser::new(self.config.limits.clone());
        let mut buf = vec![0u8; 64 * 1024];
        let mut items = Vec::new();
        'outer: loop {
            let n = tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = kill.cancelled() => break,
                r = read_with_fds(&rd, &mut buf, &session) => match r {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(session = session.id, error = %e, "read failed");
                        break;
                    }
                },
            };
            parser.feed(&buf[..n], &mut items);
            if n == buf.len() && items.is_empty() {
                // A client streaming a huge message: let other connections
                // run between chunks instead of parsing it in one go.
                tokio::task::yield_now().await;
            }
            for item in items.drain(..) {
                tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    _ = kill.cancelled() => break 'outer,
                    r = req_tx.send(item) => if r.is_err() { break 'outer },
                }
            }
        }
        if parser.in_message() {
            tracing::debug!(
                session = session.id,
                "client closed with an incomplete message: discarded"
            );
        }
    }

    async fn executor(
        self: Arc<Self>,
        mut req_rx: mpsc::Receiver<Result<Value, JsonError>>,
        out_tx: mpsc::Sender<Bytes>,
        session: Arc<Session>,
        kill: CancellationToken,
    ) {
        let mut negotiated = false;
        while let Some(item) = req_rx.recv().await {
            let was_negotiated = negotiated;
            let reply = self.process(item, &mut negotiated, &session).await;
            // Waiting for room in the queue is the backpressure; an error
            // means the client is gone, and the command ran all the same.
            let _ = out_tx.send(reply).await;
            if negotiated && !was_negotiated && !kill.is_cancelled() {
                // Events flow from here on, after the negotiation reply.
                self.events
                    .subscribe(session.id, out_tx.clone(), kill.clone());
            }
        }
        // At shutdown the client stays subscribed until SHUTDOWN was sent.
        if !self.stop.is_cancelled() {
            self.events.unsubscribe(session.id);
        }
        tracing::debug!(session = session.id, "client done");
    }

    async fn process(
        &self,
        item: Result<Value, JsonError>,
        negotiated: &mut bool,
        session: &Arc<Session>,
    ) -> Bytes {
        let v = match item {
            Ok(v) => v,
            Err(e) => return wire::encode(&wire::failure(&QmpError::generic(e.desc), None)),
        };
        let req = match wire::parse_request(v, false) {
            Ok(r) => r,
            Err((e, id)) => return wire::encode(&wire::failure(&e, id)),
        };
        let id = req.id;
        let name = req.execute.as_str();
        if !*negotiated && name != "qmp_capabilities" {
            let e = QmpError::with_class(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return wire::encode(&wire::failure(&e, id));
        }
        let result = if name == "qmp_capabilities" {
            self.capabilities(req.arguments.as_ref(), negotiated)
                .map(Reply::Value)
        } else {
            let ctx = Ctx {
                state: self.state.clone(),
                session: session.clone(),
            };
            self.dispatcher
                .dispatch(ctx, name, req.arguments.as_ref())
                .await
        };
        match result {
            Ok(Reply::Value(v)) => wire::encode(&wire::success(v, id)),
            Ok(Reply::Raw(text)) => wire::success_raw(&text, id),
            Err(e) => wire::encode(&wire::failure(&e, id)),
        }
    }

    fn capabilities(
        &self,
        args: Option<&serde_json::Map<String, Value>>,
        negotiated: &mut bool,
    ) -> Result<Value, QmpError> {
        let args = self
            .dispatcher
            .schema()
            .check_command_args("qmp_capabilities", args)?;
        if *negotiated {
            return Err(QmpError::with_class(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if let Some(caps) = args.get("enable").and_then(Value::as_array) {
            if let Some(cap) = caps.first().and_then(Value::as_str) {
                // blockd offers no capability (it has no out-of-band commands).
                return Err(QmpError::generic(format!(
                    "Capability '{cap}' not available"
                )));
            }
        }
        *negotiated = true;
        Ok(json!({}))
    }

    /// Stops the server: no new connections or input; commands already
    /// received are answered (up to the drain timeout); `SHUTDOWN` is sent
    /// with `reason`; queues are flushed; connections closed. The same as
    /// [`stop_input`](Self::stop_input) then [`close`](Self::close).
    pub async fn shutdown(&self, reason: ShutdownCause) {
        self.stop_input().await;
        self.close(reason).await;
    }

    /// The first half of [`shutdown`](Self::shutdown): no new connections
    /// or input, commands already received answered (up to the drain
    /// timeout). Events still reach the clients, so the server can report
    /// what it does while it winds down (jobs cancelled).
    pub async fn stop_input(&self) {
        self.stop.cancel();
        self.executors.close();
        if tokio::time::timeout(self.config.drain_timeout, self.executors.wait())
            .await
            .is_err()
        {
            tracing::warn!("commands still running at shutdown; not waiting for them");
        }
    }

    /// The second half of [`shutdown`](Self::shutdown): `SHUTDOWN` with
    /// `reason`, queues flushed, connections closed.
    pub async fn close(&self, reason: ShutdownCause) {
        self.events.send(&Shutdown {
            guest: false,
            reason,
        });
        self.events.clear();
        self.io_tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.io_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("clients not reading at shutdown; closing anyway");
        }
    }
}

async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>, kill: CancellationToken) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = kill.cancelled() => break,
        };
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(m) => batch.extend_from_slice(&m),
                Err(_) => break,
            }
        }
        let r = tokio::select! {
            r = wr.write_all(&batch) => r,
            _ = kill.cancelled() => break,
        };
        if r.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Reads bytes, collecting any file descriptors passed with SCM_RIGHTS.
async fn read_with_fds(rd: &OwnedReadHalf, buf: &mut [u8], session: &Session) -> io::Result<usize> {
    let stream: &UnixStream = rd.as_ref();
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            recvmsg_fds(stream.as_raw_fd(), buf, session)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

fn recvmsg_fds(fd: i32, buf: &mut [u8], session: &Session) -> io::Result<usize> {
    const MAX_FDS: usize = 16;
    // Control buffer, aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: `msg` points at `iov` (covering `buf`) and `cmsg_buf`, both
    // live and writable for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Vec::new();
    // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of
    // well-formed control messages; the CMSG_* macros walk them in bounds.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = (len / std::mem::size_of::<i32>()).min(MAX_FDS);
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    // The descriptor is now ours: wrap it so it is closed.
                    received.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if !received.is_empty() {
        let mut fds = session.fds.lock().unwrap_or_else(|e| e.into_inner());
        for fd in received {
            if fds.len() < MAX_PENDING_FDS {
                fds.push(fd);
            } else {
                tracing::warn!(session = session.id, "too many unclaimed fds: closing one");
            }
        }
    }
    Ok(n as usize)
}
