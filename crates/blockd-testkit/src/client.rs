//! A raw QMP client for tests, over a Unix stream socket.
//!
//! [`QmpClient`] speaks the wire protocol directly and checks it strictly:
//! every message the server sends must be one JSON value on a line ending in
//! CRLF (`\r\n`); a bare LF, a line that is not JSON, or a message cut off by
//! the end of the stream is a [`ClientError::Protocol`] failure.
//!
//! Received messages are sorted into two queues, as QMP clients do: *events*
//! (objects with an `"event"` key) and *responses* (everything else: the
//! greeting, `return` and `error` replies). [`QmpClient::next_response`]
//! takes responses in arrival order, [`QmpClient::wait_event`] takes the first
//! pending or arriving event that matches, leaving the others queued.
//!
//! ```no_run
//! use std::time::Duration;
//! use blockd_testkit::{Pattern, QmpClient};
//! use serde_json::json;
//!
//! let mut c = QmpClient::connect_retry("/tmp/qmp.sock", Duration::from_secs(10))?;
//! c.negotiate()?;
//! let version = c.execute("query-version", None)?;
//! assert!(version["qemu"]["major"].is_u64());
//! c.execute("blockdev-create", Some(json!({"job-id": "j0", "options": {}})))?;
//! let ev = c.wait_event(&Pattern::parse(r#"{"event": "JOB_STATUS_CHANGE"}"#)?, Duration::from_secs(5))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::pattern::{dumps, Pattern};

/// Default time to wait for a response or an event.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest slice of time one blocking read waits, so that callers' deadlines
/// are checked regularly.
const READ_SLICE: Duration = Duration::from_millis(500);

/// Why a [`QmpClient`] operation failed.
#[derive(Debug)]
pub enum ClientError {
    /// Connecting, reading or writing failed.
    Io(io::Error),
    /// The server broke the wire protocol: a message not terminated by CRLF,
    /// a line that is not JSON, a message cut off by end of stream, or an
    /// unexpected reply during negotiation.
    Protocol(String),
    /// Nothing suitable arrived in time.
    Timeout(String),
    /// The server closed the connection.
    Closed,
    /// A command returned a QMP error.
    Qmp {
        /// `error.class`, e.g. `GenericError`.
        class: String,
        /// `error.desc`.
        desc: String,
        /// The whole reply.
        reply: Value,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "I/O error: {e}"),
            ClientError::Protocol(s) => write!(f, "protocol error: {s}"),
            ClientError::Timeout(s) => f.write_str(s),
            ClientError::Closed => f.write_str("connection closed by the server"),
            ClientError::Qmp { class, desc, .. } => write!(f, "QMP error {class}: {desc}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// True if `msg` is a QMP event (an object with an `"event"` key).
pub fn is_event(msg: &Value) -> bool {
    msg.as_object().is_some_and(|o| o.contains_key("event"))
}

/// A callback that receives a line for every send, receive and state change.
pub type TraceFn = Box<dyn FnMut(&str) + Send>;

/// A raw QMP client connection. See the [module docs](self).
pub struct QmpClient {
    stream: Option<UnixStream>,
    path: PathBuf,
    buf: Vec<u8>,
    responses: VecDeque<Value>,
    events: VecDeque<Value>,
    eof: bool,
    trace: Option<TraceFn>,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .field("open", &self.stream.is_some())
            .field("eof", &self.eof)
            .field("pending_responses", &self.responses.len())
            .field("pending_events", &self.events.len())
            .finish()
    }
}

/// True for connect errors that mean "the server is not listening yet".
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::EAGAIN)
    )
}

impl QmpClient {
    /// Connects once; fails at once if nobody listens at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)?;
        Ok(Self::from_stream(stream, path))
    }

    /// Connects, retrying every 50 ms while the socket is missing or refuses
    /// connections, for up to `timeout`.
    pub fn connect_retry(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_until(path, Instant::now() + timeout, || false)
    }

    /// Connects, retrying every 50 ms while the socket is missing or refuses
    /// connections, until `deadline` or until `give_up()` returns true (for
    /// instance because the server process has exited). The last connect
    /// error is returned.
    pub fn connect_until(
        path: impl AsRef<Path>,
        deadline: Instant,
        mut give_up: impl FnMut() -> bool,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Self::from_stream(stream, path)),
                Err(e) => {
                    if !is_transient(&e) || give_up() || Instant::now() >= deadline {
                        return Err(ClientError::Io(e));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: UnixStream, path: &Path) -> Self {
        QmpClient {
            stream: Some(stream),
            path: path.to_path_buf(),
            buf: Vec::new(),
            responses: VecDeque::new(),
            events: VecDeque::new(),
            eof: false,
            trace: None,
        }
    }

    /// Installs a callback that is given one line per message sent
    /// (`-> ...`), received (`<- ...`, `<- event ...`) and for end of stream.
    pub fn set_trace(&mut self, trace: impl FnMut(&str) + Send + 'static) {
        self.trace = Some(Box::new(trace));
    }

    fn log(&mut self, text: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t(&text());
        }
    }

    /// The socket path this client connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the server has closed the connection (end of stream seen).
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Events received and not yet taken, oldest first.
    pub fn pending_events(&self) -> &VecDeque<Value> {
        &self.events
    }

    /// Responses received and not yet taken, oldest first.
    pub fn pending_responses(&self) -> &VecDeque<Value> {
        &self.responses
    }

    /// Removes and returns every pending event.
    pub fn take_all_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn stream(&mut self) -> Result<&mut UnixStream, ClientError> {
        self.stream
            .as_mut()
            .ok_or_else(|| ClientError::Io(io::Error::new(io::ErrorKind::NotConnected, "closed")))
    }

    /// Sends bytes exactly as given (no newline is added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.log(|| {
            format!(
                "-> {}",
                String::from_utf8_lossy(bytes).trim_end_matches('\n')
            )
        });
        let s = self.stream()?;
        s.write_all(bytes)?;
        Ok(())
    }

    /// Sends `text` plus a newline.
    pub fn send_line(&mut self, text: &str) -> Result<(), ClientError> {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        self.send_raw(&bytes)
    }

    /// Sends a JSON value on one line, newline-terminated.
    pub fn send_json(&mut self, value: &Value) -> Result<(), ClientError> {
        self.send_line(&value.to_string())
    }

    /// Waits up to `timeout` for data and files every complete message into
    /// its queue. Returns the number of messages received (0 on timeout or
    /// at end of stream). With a zero timeout it only takes what is already
    /// there.
    pub fn pump(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        // complete lines left over by read_message come first
        let filed = self.split_messages()?;
        if filed > 0 || self.eof {
            return Ok(filed);
        }
        let mut chunk = [0u8; 65536];
        let s = self.stream()?;
        let read = if timeout.is_zero() {
            s.set_nonblocking(true)?;
            let r = s.read(&mut chunk);
            s.set_nonblocking(false)?;
            r
        } else {
            s.set_read_timeout(Some(timeout))?;
            s.read(&mut chunk)
        };
        let n = match read {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => {
                // a reset connection is the end of the stream
                self.log(|| format!("recv error: {e}"));
                0
            }
        };
        if n == 0 {
            self.pump_eof()?;
            return Ok(0);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        self.split_messages()
    }

    /// Files every complete line of the buffer into the queues.
    fn split_messages(&mut self) -> Result<usize, ClientError> {
        let mut count = 0;
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line).into_owned();
            if line.len() < 2 || line[line.len() - 2] != b'\r' {
                return Err(ClientError::Protocol(format!(
                    "message not terminated by CRLF (bare LF): {}",
                    text.trim_end()
                )));
            }
            let body = text[..text.len() - 2].trim();
            if body.is_empty() {
                continue;
            }
            let msg: Value = serde_json::from_str(body).map_err(|e| {
                ClientError::Protocol(format!("server sent a line that is not JSON ({e}): {body}"))
            })?;
            if is_event(&msg) {
                self.log(|| format!("<- event {}", dumps(&msg, 4000)));
                self.events.push_back(msg);
            } else {
                self.log(|| format!("<- {}", dumps(&msg, 4000)));
                self.responses.push_back(msg);
            }
            count += 1;
        }
        Ok(count)
    }

    /// Takes everything that has already arrived, without waiting.
    pub fn drain(&mut self) -> Result<(), ClientError> {
        while self.pump(Duration::ZERO)? > 0 {}
        Ok(())
    }

    /// Reads the next message off the wire (waiting up to `timeout`), files
    /// it into the event or response queue, and returns a copy of it.
    /// Messages are returned in arrival order regardless of kind.
    pub fn read_message(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            // a complete line may already sit in the buffer
            if let Some(v) = self.read_buffered()? {
                return Ok(v);
            }
            if self.eof {
                return Err(ClientError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(format!(
                    "no message within {} s",
                    timeout.as_secs_f64()
                )));
            }
            // read bytes only, so that exactly one message is filed at a time
            let mut chunk = [0u8; 65536];
            let s = self.stream()?;
            s.set_read_timeout(Some(left.min(READ_SLICE)))?;
            match s.read(&mut chunk) {
                Ok(0) => {
                    self.pump_eof()?;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    self.log(|| format!("recv error: {e}"));
                    self.pump_eof()?;
                }
            }
        }
    }

    /// Marks end of stream and checks that no partial message is left.
    fn pump_eof(&mut self) -> Result<(), ClientError> {
        self.eof = true;
        self.log(|| "<- end of stream".to_string());
        // (complete lines never stay buffered at this point)
        if self.buf.iter().any(|b| !b.is_ascii_whitespace()) {
            let rest = std::mem::take(&mut self.buf);
            return Err(ClientError::Protocol(format!(
                "connection closed in the middle of a message (no CRLF): {}",
                String::from_utf8_lossy(&rest)
            )));
        }
        Ok(())
    }

    /// Files the first complete buffered line, if any, and returns it.
    fn read_buffered(&mut self) -> Result<Option<Value>, ClientError> {
        let Some(pos) = self.buf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        // split off the first line, file it, put the rest back
        let rest = self.buf.split_off(pos + 1);
        let (nev, nresp) = (self.events.len(), self.responses.len());
        let result = self.split_messages();
        self.buf = rest;
        result?;
        if self.events.len() > nev {
            Ok(self.events.back().cloned())
        } else if self.responses.len() > nresp {
            Ok(self.responses.back().cloned())
        } else {
            // a blank line: look at the next one
            self.read_buffered()
        }
    }

    /// Takes the oldest pending response, waiting up to `timeout` for one.
    /// Events that arrive meanwhile are queued.
    pub fn next_response(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.responses.pop_front() {
                return Ok(r);
            }
            if self.eof {
                return Err(ClientError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(format!(
                    "no response within {} s",
                    timeout.as_secs_f64()
                )));
            }
            self.pump(left.min(READ_SLICE))?;
        }
    }

    /// Takes the next response and checks it against `pattern`; on a
    /// mismatch the error says where and includes the response.
    pub fn expect_response(
        &mut self,
        pattern: &Pattern,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let r = self.next_response(timeout)?;
        match pattern.check(&r) {
            Ok(()) => Ok(r),
            Err(why) => Err(ClientError::Protocol(format!(
                "response does not match ({why}): expected {pattern}, received {}",
                dumps(&r, 4000)
            ))),
        }
    }

    /// Reads the greeting, sends `qmp_capabilities` and expects
    /// `{"return": {}}`. Returns the greeting.
    pub fn negotiate(&mut self) -> Result<Value, ClientError> {
        let greeting = self.next_response(DEFAULT_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected the QMP greeting, received {}",
                dumps(&greeting, 4000)
            )));
        }
        self.send_json(&json!({"execute": "qmp_capabilities"}))?;
        let reply = self.next_response(DEFAULT_TIMEOUT)?;
        if reply != json!({"return": {}}) {
            return Err(ClientError::Protocol(format!(
                "qmp_capabilities: expected {{\"return\": {{}}}}, received {}",
                dumps(&reply, 4000)
            )));
        }
        Ok(greeting)
    }

    /// Sends `{"execute": name, "arguments": args}` (without `arguments` if
    /// `args` is `None`) and returns the whole reply, success or error.
    pub fn command(&mut self, name: &str, args: Option<Value>) -> Result<Value, ClientError> {
        let mut cmd = json!({ "execute": name });
        if let Some(args) = args {
            cmd["arguments"] = args;
        }
        self.send_json(&cmd)?;
        self.next_response(DEFAULT_TIMEOUT)
    }

    /// Runs a command and returns its `return` value; a QMP error reply
    /// becomes [`ClientError::Qmp`].
    pub fn execute(&mut self, name: &str, args: Option<Value>) -> Result<Value, ClientError> {
        let mut reply = self.command(name, args)?;
        if let Some(ret) = reply.get_mut("return") {
            return Ok(ret.take());
        }
        if let Some(err) = reply.get("error") {
            let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(ClientError::Qmp {
                class: s("class"),
                desc: s("desc"),
                reply,
            });
        }
        Err(ClientError::Protocol(format!(
            "{name}: reply has neither return nor error: {}",
            dumps(&reply, 4000)
        )))
    }

    /// Takes the first pending or arriving event that matches `pattern`,
    /// waiting up to `timeout`; other events stay queued.
    pub fn wait_event(
        &mut self,
        pattern: &Pattern,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        self.wait_event_with(|e| pattern.matches(e), timeout)
            .map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(format!(
                    "no event matching {pattern} within {} s",
                    timeout.as_secs_f64()
                )),
                other => other,
            })
    }

    /// Like [`wait_event`](Self::wait_event) with a predicate. Returns
    /// [`ClientError::Closed`] if the server closes the connection first.
    pub fn wait_event_with(
        &mut self,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        loop {
            self.drain()?;
            if let Some(i) = (scanned..self.events.len()).find(|&i| pred(&self.events[i])) {
                return Ok(self.events.remove(i).expect("index in range"));
            }
            scanned = self.events.len();
            if self.eof {
                return Err(ClientError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(format!(
                    "no matching event within {} s",
                    timeout.as_secs_f64()
                )));
            }
            self.pump(left.min(READ_SLICE))?;
        }
    }

    /// Watches for `window`: returns the first event (pending or arriving)
    /// that matches `pattern`, without taking it, or `None` if none did.
    /// Stops early at end of stream.
    pub fn find_event(
        &mut self,
        pattern: &Pattern,
        window: Duration,
    ) -> Result<Option<Value>, ClientError> {
        let deadline = Instant::now() + window;
        loop {
            self.drain()?;
            if let Some(e) = self.events.iter().find(|e| pattern.matches(e)) {
                return Ok(Some(e.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.eof {
                return Ok(None);
            }
            self.pump(left.min(Duration::from_millis(200)))?;
        }
    }

    /// Fails if an event matching `pattern` is pending or arrives within
    /// `window`.
    pub fn expect_no_event(
        &mut self,
        pattern: &Pattern,
        window: Duration,
    ) -> Result<(), ClientError> {
        match self.find_event(pattern, window)? {
            None => Ok(()),
            Some(e) => Err(ClientError::Protocol(format!(
                "unexpected event matching {pattern}: {}",
                dumps(&e, 4000)
            ))),
        }
    }

    /// Closes the connection (also done on drop).
    pub fn close(&mut self) {
        if self.stream.take().is_some() {
            self.log(|| "closed".to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A connected pair: the client, and the server end for the test to drive.
    fn pair() -> (QmpClient, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (QmpClient::from_stream(a, Path::new("(pair)")), b)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn splits_on_crlf_and_sorts_events() {
        let (mut c, mut s) = pair();
        s.write_all(b"{\"QMP\": {}}\r\n{\"event\": \"A\"}\r\n{\"return\": 1}\r\n")
            .unwrap();
        assert_eq!(c.read_message(T).unwrap(), json!({"QMP": {}}));
        assert_eq!(c.read_message(T).unwrap(), json!({"event": "A"}));
        assert_eq!(c.pending_events().len(), 1);
        assert_eq!(c.next_response(T).unwrap(), json!({"QMP": {}}));
        assert_eq!(c.next_response(T).unwrap(), json!({"return": 1}));
        assert_eq!(c.take_all_events(), vec![json!({"event": "A"})]);
    }

    #[test]
    fn message_split_across_reads() {
        let (mut c, mut s) = pair();
        let t = thread::spawn(move || {
            s.write_all(b"{\"ret").unwrap();
            thread::sleep(Duration::from_millis(100));
            s.write_all(b"urn\": {}}\r").unwrap();
            thread::sleep(Duration::from_millis(100));
            s.write_all(b"\n").unwrap();
            s
        });
        assert_eq!(c.next_response(T).unwrap(), json!({"return": {}}));
        drop(t.join());
    }

    #[test]
    fn bare_lf_is_a_protocol_error() {
        let (mut c, mut s) = pair();
        s.write_all(b"{\"return\": {}}\n").unwrap();
        let e = c.next_response(T).unwrap_err();
        assert!(
            matches!(&e, ClientError::Protocol(m) if m.contains("bare LF")),
            "{e}"
        );
        let (mut c, mut s) = pair();
        s.write_all(b"{\"return\": {}}\n").unwrap();
        assert!(matches!(c.read_message(T), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn non_json_and_truncated_are_protocol_errors() {
        let (mut c, mut s) = pair();
        s.write_all(b"hello\r\n").unwrap();
        assert!(matches!(c.next_response(T), Err(ClientError::Protocol(_))));
        let (mut c, mut s) = pair();
        s.write_all(b"{\"return\": {}}").unwrap();
        drop(s);
        let e = c.next_response(T).unwrap_err();
        assert!(
            matches!(&e, ClientError::Protocol(m) if m.contains("middle")),
            "{e}"
        );
    }

    #[test]
    fn eof_and_timeout() {
        let (mut c, s) = pair();
        let e = c.next_response(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)));
        drop(s);
        assert!(matches!(c.next_response(T), Err(ClientError::Closed)));
        assert!(c.is_eof());
    }

    #[test]
    fn wait_event_leaves_others_queued() {
        let (mut c, mut s) = pair();
        s.write_all(b"{\"event\": \"A\", \"n\": 1}\r\n{\"event\": \"B\"}\r\n{\"event\": \"A\", \"n\": 2}\r\n")
            .unwrap();
        let b = Pattern::parse(r#"{"event": "B"}"#).unwrap();
        assert_eq!(c.wait_event(&b, T).unwrap(), json!({"event": "B"}));
        assert_eq!(c.pending_events().len(), 2);
        let a = Pattern::parse(r#"{"event": "A"}"#).unwrap();
        assert!(c.find_event(&a, Duration::ZERO).unwrap().is_some());
        assert!(c.expect_no_event(&b, Duration::from_millis(50)).is_ok());
        assert!(c.expect_no_event(&a, Duration::from_millis(50)).is_err());
        let e = c.wait_event(&b, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)));
        let two = c.wait_event_with(|e| e["n"] == 2, T).unwrap();
        assert_eq!(two["n"], 2);
    }

    #[test]
    fn negotiate_and_execute() {
        let dir = std::env::temp_dir().join(format!("btc-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let mut got = Vec::new();
            for reply in [
                "{\"return\": {}}\r\n",
                "{\"return\": {\"x\": 1}}\r\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\r\n",
            ] {
                line.clear();
                io::BufRead::read_line(&mut r, &mut line).unwrap();
                got.push(serde_json::from_str::<Value>(&line).unwrap());
                s.write_all(reply.as_bytes()).unwrap();
            }
            got
        });
        let mut c = QmpClient::connect_retry(&path, T).unwrap();
        assert!(c.negotiate().unwrap().get("QMP").is_some());
        assert_eq!(c.execute("a", None).unwrap(), json!({"x": 1}));
        let e = c.execute("b", Some(json!({"k": true}))).unwrap_err();
        assert!(
            matches!(&e, ClientError::Qmp { class, desc, .. } if class == "GenericError" && desc == "no")
        );
        let got = server.join().unwrap();
        assert_eq!(got[0], json!({"execute": "qmp_capabilities"}));
        assert_eq!(got[1], json!({"execute": "a"}));
        assert_eq!(got[2], json!({"execute": "b", "arguments": {"k": true}}));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_retry_gives_up() {
        let e = QmpClient::connect_retry("/nonexistent/bt/sock", Duration::from_millis(120))
            .unwrap_err();
        assert!(matches!(e, ClientError::Io(_)));
    }

    #[test]
    fn trace_sees_traffic() {
        let (mut c, mut s) = pair();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let l2 = log.clone();
        c.set_trace(move |line| l2.lock().unwrap().push(line.to_string()));
        c.send_json(&json!({"execute": "x"})).unwrap();
        s.write_all(b"{\"event\": \"E\"}\r\n").unwrap();
        c.drain().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log[0], r#"-> {"execute":"x"}"#);
        assert_eq!(log[1], r#"<- event {"event": "E"}"#);
    }
}
