//! Shared helpers for blockd's integration tests: start a `blockd --qmp`
//! server in a short scratch directory under `/tmp`, connect clients, check
//! liveness, and stop the server (SIGTERM, then SIGKILL) when dropped.

#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockd_testkit::QmpClient;
use serde_json::{json, Value};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A running `blockd --qmp SOCK`, stopped on drop.
pub struct Server {
    child: Child,
    /// Scratch directory (removed on drop).
    pub dir: PathBuf,
    /// The QMP socket.
    pub sock: PathBuf,
}

impl Server {
    /// Starts a server with `prefix` in its directory name
    /// (`/tmp/<prefix>-<pid>-<n>/s`); its stderr goes to `err.log` there.
    pub fn start(prefix: &str) -> Server {
        Server::start_with_args(prefix, &[])
    }

    /// [`Server::start`] with more command-line arguments after `--qmp`.
    pub fn start_with_args(prefix: &str, args: &[String]) -> Server {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let sock = dir.join("s");
        let log = File::create(dir.join("err.log")).expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_blockd"))
            .arg("--qmp")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn blockd");
        let mut srv = Server { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !srv.sock.exists() {
            assert!(srv.is_alive(), "blockd exited at start-up: {}", srv.log());
            assert!(
                Instant::now() < deadline,
                "blockd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        srv
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the server process runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics (with the server's log) unless the process is alive.
    pub fn assert_alive(&mut self, what: &str) {
        let status = self.child.try_wait();
        assert!(
            matches!(status, Ok(None)),
            "{what}: blockd is not running ({status:?}); log:\n{}",
            self.log()
        );
    }

    /// The server's stderr so far (last 4 KiB).
    pub fn log(&self) -> String {
        let text = std::fs::read(self.dir.join("err.log")).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(4096)..];
        String::from_utf8_lossy(tail).into_owned()
    }

    /// A connection that has read nothing yet.
    pub fn raw_client(&self) -> QmpClient {
        QmpClient::connect_retry(&self.sock, Duration::from_secs(10)).expect("connect")
    }

    /// A connection past the greeting and `qmp_capabilities`.
    pub fn client(&self) -> QmpClient {
        let mut c = self.raw_client();
        c.negotiate().expect("negotiate");
        c
    }

    /// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`).
    pub fn status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.is_alive() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety
            // preconditions; the child is not reaped yet, so the pid is ours.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.is_alive() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes responses until one carries `id`; returns the ones before it and
/// that one.
pub fn responses_until(c: &mut QmpClient, id: &Value, timeout: Duration) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + timeout;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = c.next_response(left).unwrap_or_else(|e| {
            panic!("waiting for the reply with id {id}: {e}; before it: {before:?}")
        });
        if r.get("id") == Some(id) {
            return (before, r);
        }
        before.push(r);
    }
}

/// Sends `query-version` with a fresh id on `c`, expects its successful,
/// matching reply (after any others, which are returned), and checks that
/// the server process is alive.
pub fn alive_check(c: &mut QmpClient, srv: &mut Server, tag: &str) -> Vec<Value> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let id = Value::String(format!("alive-{tag}-{}", N.fetch_add(1, Ordering::Relaxed)));
    let mut cmd = br#"{"execute": "query-version", "id": "#.to_vec();
    cmd.extend_from_slice(id.to_string().as_bytes());
    cmd.extend_from_slice(b"}\n");
    // a leading LF so that a `{` starts a line (blockd's resync point)
    let mut bytes = b"\n".to_vec();
    bytes.extend_from_slice(&cmd);
    c.send_raw(&bytes)
        .unwrap_or_else(|e| panic!("{tag}: sending the alive check: {e}"));
    let (before, reply) = responses_until(c, &id, Duration::from_secs(60));
    assert!(
        reply["return"]["qemu"]["major"].is_u64(),
        "{tag}: alive check got {reply}"
    );
    srv.assert_alive(tag);
    before
}

/// Whether a tool (`qemu-img`, ...) runs here; says so when it does not,
/// so that a test skipped for lack of it is visible in the output.
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping: {tool} not installed");
    }
    found
}

/// A tool's stdout; panics with its output if it failed.
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Removes export `name` and waits until it is gone (it goes once its
/// clients did).
pub fn unexport(c: &mut QmpClient, name: &str) {
    c.execute("block-export-del", Some(json!({"id": name})))
        .unwrap();
    for _ in 0..100 {
        let l = c.execute("query-block-exports", None).unwrap();
        if !l.as_array().unwrap().iter().any(|e| e["id"] == name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("export {name} did not go away");
}

/// Reads `node` through a read-only NBD export with `qemu-io -r`, running
/// `cmds` (`read -P ...`): starts the server's NBD server on `nbd` in its
/// directory unless it runs, exports the node as `r`, checks that every
/// command ran and no pattern failed, and removes the export again.
pub fn qemu_io_reads(c: &mut QmpClient, srv: &Server, node: &str, cmds: &[&str]) {
    let sock = srv.dir.join("nbd");
    if !sock.exists() {
        c.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": sock}}})),
        )
        .unwrap();
    }
    c.execute(
        "block-export-add",
        Some(json!({"type": "nbd", "id": "r", "node-name": node, "name": "r"})),
    )
    .unwrap();
    let url = format!("nbd+unix:///r?socket={}", sock.display());
    let mut args = vec!["-r", "-f", "raw"];
    for cmd in cmds {
        args.extend(["-c", cmd]);
    }
    args.push(&url);
    let out = ok(&Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("run qemu-io"));
    assert!(!out.contains("fail"), "{node}: {out}");
    assert_eq!(out.matches("read ").count(), cmds.len(), "{node}: {out}");
    unexport(c, "r");
}
