//! A tiny in-process QMP server, for testing clients and the transcript
//! runner without a real server.
//!
//! [`FakeServer::start`] listens on a Unix socket in a fresh `/tmp/btf-XXXXXX`
//! folder and serves every client on a thread of its own: it sends a greeting,
//! refuses commands before `qmp_capabilities` (as QEMU does), and answers
//! these commands afterwards (replies echo `"id"`; lines end in CRLF):
//!
//! | command | reply |
//! | --- | --- |
//! | `qmp_capabilities` | `{"return": {}}` |
//! | `echo` | `{"return": ARGUMENTS}` |
//! | `emit` (`event`, optional `data`, optional `delay-ms`) | `{"return": {}}`, then the event to every negotiated client |
//! | `bare-lf` | `{"return": {}}` ending in a bare LF (a protocol violation) |
//! | `close` | `{"return": {}}`, then the connection is closed |
//! | anything else | `CommandNotFound` |
//!
//! Input that is not a JSON object gets a `GenericError`.
//!
//! The runner starts servers as commands, so [`FakeServer::template`] gives a
//! command that symlinks the runner's `{sock}` to the fake's socket and then
//! sleeps; the runner stops that command as usual.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::make_scratch_dir;
use crate::runner::shell_quote;

/// The greeting the fake sends.
pub fn fake_greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"},
                   "capabilities": []}})
}

/// Streams of negotiated clients, for broadcasting events.
type Clients = Arc<Mutex<Vec<UnixStream>>>;

/// A running fake QMP server; stops (and removes its folder) when dropped.
#[derive(Debug)]
pub struct FakeServer {
    dir: PathBuf,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Clients,
    accept: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Starts listening and serving clients.
    pub fn start() -> io::Result<FakeServer> {
        let dir = make_scratch_dir(Path::new("/tmp/btf"))?;
        let path = dir.join("s");
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let accept = {
            let stop = stop.clone();
            let clients = clients.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let clients = clients.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, clients);
                    });
                }
            })
        };
        Ok(FakeServer {
            dir,
            path,
            stop,
            clients,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// A server command template for [`crate::RunOptions::server`]: prints
    /// a line to the server log, links `{sock}` to this server's socket, and
    /// sleeps until the runner stops it. The line comes first: once the
    /// socket exists the runner may read the log at any time.
    pub fn template(&self) -> String {
        format!(
            "echo 'fake server log line' && ln -s {} {{sock}} && exec sleep 600",
            shell_quote(&self.path.to_string_lossy())
        )
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the accept loop
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(clients) = self.clients.lock() {
            for c in clients.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send(stream: &Mutex<UnixStream>, value: &Value) -> io::Result<()> {
    let mut s = stream.lock().map_err(|_| io::Error::other("poisoned"))?;
    s.write_all(format!("{value}\r\n").as_bytes())
}

fn serve(conn: UnixStream, clients: Clients) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    send(&writer, &fake_greeting())?;
    let mut negotiated = false;
    let mut line = String::new();
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let cmd: Value = match serde_json::from_str(line.trim()) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let e = json!({"error": {"class": "GenericError", "desc": "JSON parse error"}});
                send(&writer, &e)?;
                continue;
            }
        };
        let name = cmd["execute"].as_str().unwrap_or("").to_string();
        let args = cmd.get("arguments").cloned().unwrap_or(json!({}));
        let mut reply = if !negotiated && name != "qmp_capabilities" {
            json!({"error": {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
        } else {
            match name.as_str() {
                "qmp_capabilities" => {
                    negotiated = true;
                    clients
                        .lock()
                        .map_err(|_| io::Error::other("poisoned"))?
                        .push(conn.try_clone()?);
                    json!({"return": {}})
                }
                "echo" => json!({ "return": args }),
                "emit" | "bare-lf" | "close" => json!({"return": {}}),
                other => json!({"error": {"class": "CommandNotFound",
                                "desc": format!("The command {other} has not been found")}}),
            }
        };
        if let Some(id) = cmd.get("id") {
            reply["id"] = id.clone();
        }
        if negotiated && name == "bare-lf" {
            writer
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .write_all(format!("{reply}\n").as_bytes())?;
            continue;
        }
        send(&writer, &reply)?;
        if !negotiated {
            continue;
        }
        match name.as_str() {
            "close" => {
                conn.shutdown(std::net::Shutdown::Both)?;
                return Ok(());
            }
            "emit" => {
                let mut event = json!({ "event": args["event"].clone() });
                if let Some(data) = args.get("data") {
                    event["data"] = data.clone();
                }
                let delay = Duration::from_millis(args["delay-ms"].as_u64().unwrap_or(0));
                let broadcast = move |clients: &Clients| {
                    if let Ok(list) = clients.lock() {
                        for c in list.iter() {
                            let _ = (&*c).write_all(format!("{event}\r\n").as_bytes());
                        }
                    }
                };
                if delay.is_zero() {
                    // at once, so that the event precedes any later reply
                    broadcast(&clients);
                } else {
                    let clients = clients.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        broadcast(&clients);
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::QmpClient;
    use crate::Pattern;

    #[test]
    fn fake_serves_events_to_negotiated_clients() {
        let fake = FakeServer::start().unwrap();
        let t = Duration::from_secs(5);
        let mut a = QmpClient::connect_retry(fake.socket_path(), t).unwrap();
        let mut b = QmpClient::connect_retry(fake.socket_path(), t).unwrap();
        a.negotiate().unwrap();
        assert_eq!(b.next_response(t).unwrap(), fake_greeting());
        let err = b.command("echo", None).unwrap();
        assert_eq!(err["error"]["class"], "CommandNotFound");
        a.execute("emit", Some(json!({"event": "X", "data": {"n": 1}})))
            .unwrap();
        let p = Pattern::parse(r#"{"event": "X", "data": {"n": 1}}"#).unwrap();
        a.wait_event(&p, t).unwrap();
        assert_eq!(b.find_event(&p, Duration::from_millis(200)).unwrap(), None);
    }
}
