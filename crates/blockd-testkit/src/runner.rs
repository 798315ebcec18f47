//! Running a transcript against a server.
//!
//! For each transcript [`run_file`] makes a short scratch folder
//! (`/tmp/bt-XXXXXX`, with the scratch folder `${TMP}` = `…/tmp` inside and
//! the sockets beside it), parses the transcript (syntax errors fail it before
//! any server starts), starts the server command with `sh -c` in a process
//! group of its own (working directory `${TMP}`, output captured to
//! `server.log`), waits up to 10 s for its socket(s), plays the steps, then
//! SIGTERMs the server's group (SIGKILL after 5 s), kills what shell steps
//! left behind, and removes the scratch folder.
//!
//! Timeouts and messages follow the Python reference runner
//! (`shared/tools/qmp-transcript`). One deliberate difference: the client
//! here checks the wire strictly (see [`crate::client`]), so a server message
//! ending in a bare LF, or a line that is not JSON, fails the step.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{ClientError, QmpClient};
use crate::pattern::{dumps, Pattern};
use crate::process::{self, ExitStatus, GroupGuard};
use crate::script::{self, Step, StepKind};

/// `<`: how long to wait for the next non-event message.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// `!`: how long to wait for a matching event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// `!!`: how long no matching event may arrive.
pub const ABSENCE_WINDOW: Duration = Duration::from_secs(1);
/// Server start: how long to wait for its socket(s); also the time a
/// connection keeps retrying.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// `$` / `$!`: wall-clock limit of one shell step.
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(60);
/// Delay between SIGTERM and SIGKILL when stopping the server.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// Highest connection number (`@9`).
pub const MAX_CONN: u8 = 9;

/// How to run transcripts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Server command template, run with `sh -c`: `{sock}` becomes the QMP
    /// socket path, `{sock2}`..`{sock9}` the sockets connections `@2`..`@9`
    /// use (where present), `{tmp}` the scratch folder. Paths are
    /// shell-quoted.
    pub server: String,
    /// Print the whole exchange to standard output.
    pub verbose: bool,
    /// Keep scratch folders (their paths are printed).
    pub keep: bool,
}

/// The result of one transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step succeeded.
    Pass,
    /// A step failed (or the transcript could not be run).
    Fail(Failure),
}

impl Outcome {
    /// True for [`Outcome::Pass`].
    pub fn is_pass(&self) -> bool {
        matches!(self, Outcome::Pass)
    }

    /// The failure, if any.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Outcome::Pass => None,
            Outcome::Fail(f) => Some(f),
        }
    }
}

/// Why a transcript failed.
///
/// `Display` gives `line N: reason` followed by indented detail lines
/// (`expected: …`, `received: …`, notes, `server output: …`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failure {
    /// 1-based line of the failing step; 0 when no particular line is to
    /// blame (server start, empty transcript, unreadable file).
    pub line: usize,
    /// One-line reason.
    pub reason: String,
    /// The pattern (JSON) of the failing `<`, `!` or `!!` step.
    pub expected: Option<String>,
    /// True for a `!!` step: `expected` is the pattern that must *not*
    /// match (shown as `not expected: …`).
    pub expected_absent: bool,
    /// What arrived instead (JSON), if anything.
    pub received: Option<String>,
    /// Further lines: unconsumed events, shell output, exit status of the
    /// server, other syntax errors.
    pub notes: Vec<String>,
    /// The last lines the server printed (stdout and stderr).
    pub server_output: Vec<String>,
}

impl Failure {
    fn new(line: usize, reason: impl Into<String>) -> Box<Self> {
        Box::new(Failure {
            line,
            reason: reason.into(),
            ..Failure::default()
        })
    }

    /// The detail lines as printed under the `FAIL` line (without indent).
    pub fn detail_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.expected {
            let label = if self.expected_absent {
                "not expected"
            } else {
                "expected"
            };
            out.push(format!("{label}: {e}"));
        }
        if let Some(r) = &self.received {
            out.push(format!("received: {r}"));
        }
        out.extend(self.notes.iter().cloned());
        out.extend(
            self.server_output
                .iter()
                .map(|l| format!("server output: {l}")),
        );
        out
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)?;
        for d in self.detail_lines() {
            write!(f, "\n    {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Internal result type: failures are boxed (they are large).
type Fallible<T> = Result<T, Box<Failure>>;

/// Runs one transcript file against a fresh server.
pub fn run_file(path: &Path, opts: &RunOptions) -> Outcome {
    match std::fs::read_to_string(path) {
        Ok(text) => run_script(&text, opts),
        Err(e) => Outcome::Fail(*Failure::new(
            0,
            format!("runner error: cannot read {}: {e}", path.display()),
        )),
    }
}

/// Runs a transcript given as text against a fresh server.
pub fn run_script(text: &str, opts: &RunOptions) -> Outcome {
    let mut run = match Run::new(opts) {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Fail(*Failure::new(
                0,
                format!("runner error: cannot make a scratch folder: {e}"),
            ))
        }
    };
    let result = run.run(text);
    run.cleanup();
    match result {
        Ok(()) => Outcome::Pass,
        Err(f) => Outcome::Fail(*f),
    }
}

/// Prints a line to standard output; a closed stdout is ignored.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{text}");
    let _ = o.flush();
}

/// Seconds as the reference runner prints them (`30`, `0.5`).
fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Quotes `s` for `sh` like Python's `shlex.quote`.
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if s.chars().all(safe) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// The last `n` non-blank lines of a file.
fn file_tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// A started server: `sh -c TEMPLATE` leading its own process group.
struct Server {
    child: Child,
    guard: Option<GroupGuard>,
    log_path: PathBuf,
    socks: BTreeMap<u8, PathBuf>,
}

impl Server {
    fn start(template: &str, base: &Path, tmp: &Path, verbose: bool) -> std::io::Result<Server> {
        let log_path = base.join("server.log");
        let mut socks = BTreeMap::new();
        socks.insert(1, base.join("qmp.sock"));
        for n in 2..=MAX_CONN {
            if template.contains(&format!("{{sock{n}}}")) {
                socks.insert(n, base.join(format!("qmp{n}.sock")));
            }
        }
        let q = |p: &Path| shell_quote(&p.to_string_lossy());
        let mut cmd = template.to_string();
        for (n, p) in socks.iter().rev() {
            if *n > 1 {
                cmd = cmd.replace(&format!("{{sock{n}}}"), &q(p));
            }
        }
        cmd = cmd
            .replace("{sock}", &q(&socks[&1]))
            .replace("{tmp}", &q(tmp));
        if verbose {
            out(&format!("    server: {cmd}"));
        }
        let log = File::create(&log_path)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .current_dir(tmp)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let guard = Some(GroupGuard::register(child.id() as i32));
        Ok(Server {
            child,
            guard,
            log_path,
            socks,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn sock_for(&self, n: u8) -> &Path {
        self.socks.get(&n).unwrap_or(&self.socks[&1])
    }

    fn wait_ready(&self, timeout: Duration) -> Fallible<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.socks.values().all(|p| p.exists()) {
                return Ok(());
            }
            if let Some(st) = process::exit_status(self.pid()) {
                let mut f = Failure::new(
                    0,
                    format!(
                        "server exited with status {} before creating its socket",
                        st.code()
                    ),
                );
                f.server_output = self.log_tail(15);
                return Err(f);
            }
            if Instant::now() > deadline {
                let mut f = Failure::new(
                    0,
                    format!("server socket did not appear within {} s", secs(timeout)),
                );
                f.server_output = self.log_tail(15);
                return Err(f);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, n: usize) -> Vec<String> {
        file_tail(&self.log_path, n)
    }

    fn stop(&mut self) {
        // the whole group gets the grace period (the leader is usually sh -c,
        // the server its child); the leader is reaped only afterwards
        process::stop_group(self.pid(), KILL_GRACE);
        self.guard.take();
        let _ = self.child.wait();
    }
}

/// A shell step's process group, kept unreaped until cleanup.
struct ShellProc {
    child: Child,
    guard: Option<GroupGuard>,
}

/// The state of one transcript run.
struct Run<'a> {
    opts: &'a RunOptions,
    base: PathBuf,
    tmp: PathBuf,
    server: Option<Server>,
    conns: BTreeMap<u8, QmpClient>,
    shells: Vec<ShellProc>,
    dir_guard: Option<process::DirGuard>,
    cleaned: bool,
}

impl<'a> Run<'a> {
    fn new(opts: &'a RunOptions) -> std::io::Result<Self> {
        let base = process::make_scratch_dir(Path::new("/tmp/bt"))?;
        let tmp = base.join("tmp");
        if let Err(e) = std::fs::create_dir(&tmp) {
            let _ = std::fs::remove_dir_all(&base);
            return Err(e);
        }
        let dir_guard = (!opts.keep).then(|| process::DirGuard::register(&base));
        Ok(Run {
            opts,
            base,
            tmp,
            server: None,
            conns: BTreeMap::new(),
            shells: Vec::new(),
            dir_guard,
            cleaned: false,
        })
    }

    fn vlog(&self, text: &str) {
        if self.opts.verbose {
            out(&format!("    {text}"));
        }
    }

    fn run(&mut self, text: &str) -> Fallible<()> {
        let tmp = self.tmp.to_string_lossy().into_owned();
        let sock = self.base.join("qmp.sock").to_string_lossy().into_owned();
        let steps = match script::parse(text, &[("${TMP}", &tmp), ("${SOCK}", &sock)]) {
            Ok(s) => s,
            Err(errors) => {
                let mut f = Failure::new(errors[0].line, errors[0].message.clone());
                f.notes = errors[1..].iter().map(|e| format!("also {e}")).collect();
                f.notes.push(format!("({} syntax error(s))", errors.len()));
                return Err(f);
            }
        };
        if steps.is_empty() {
            return Err(Failure::new(0, "transcript has no steps"));
        }
        let server = Server::start(&self.opts.server, &self.base, &self.tmp, self.opts.verbose)
            .map_err(|e| Failure::new(0, format!("runner error: cannot start the server: {e}")))?;
        let ready = server.wait_ready(SOCKET_TIMEOUT);
        self.server = Some(server);
        ready?;
        for step in &steps {
            self.vlog(&format!("line {}: {}", step.line, step.show()));
            if let Err(mut f) = self.step(step) {
                f.line = step.line;
                self.server_note(&mut f);
                return Err(f);
            }
        }
        Ok(())
    }

    fn server(&self) -> &Server {
        self.server
            .as_ref()
            .expect("server started before steps run")
    }

    /// Adds the server's state and last output to a step failure.
    fn server_note(&self, f: &mut Failure) {
        let Some(server) = &self.server else { return };
        // a server that closed a connection may be about to exit: give it a moment
        let eof = self.conns.values().any(|c| c.is_eof());
        let wait = if eof {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        match process::wait_exit(server.pid(), wait) {
            None => f.server_output = server.log_tail(5),
            Some(st) => {
                f.notes
                    .push(format!("server exited with status {}", st.code()));
                f.server_output = server.log_tail(15);
            }
        }
    }

    /// The client for connection `n`, connecting on first use.
    fn conn(&mut self, n: u8) -> Fallible<&mut QmpClient> {
        if !self.conns.contains_key(&n) {
            let server = self.server();
            let path = server.sock_for(n).to_path_buf();
            let pid = server.pid();
            let deadline = Instant::now() + SOCKET_TIMEOUT;
            let mut c =
                QmpClient::connect_until(&path, deadline, || process::exit_status(pid).is_some())
                    .map_err(|e| {
                    let e = match e {
                        ClientError::Io(e) => e.to_string(),
                        other => other.to_string(),
                    };
                    Failure::new(
                        0,
                        format!("connection {n}: cannot connect to {}: {e}", path.display()),
                    )
                })?;
            if self.opts.verbose {
                c.set_trace(move |line| out(&format!("    @{n} {line}")));
            }
            self.vlog(&format!("@{n} connected"));
            self.conns.insert(n, c);
        }
        Ok(self.conns.get_mut(&n).expect("just inserted"))
    }

    fn step(&mut self, step: &Step) -> Fallible<()> {
        let n = step.conn;
        let protocol = |e: ClientError| -> Box<Failure> {
            match e {
                ClientError::Protocol(m) => {
                    Failure::new(0, format!("connection {n}: protocol error: {m}"))
                }
                other => Failure::new(0, format!("connection {n}: {other}")),
            }
        };
        match &step.kind {
            StepKind::Shell {
                command,
                expect_failure,
            } => self.shell(command, *expect_failure),
            StepKind::Close => {
                if let Some(mut c) = self.conns.remove(&n) {
                    c.close();
                }
                Ok(())
            }
            StepKind::Send { text, .. } | StepKind::SendRaw { text } => {
                let c = self.conn(n)?;
                c.send_line(text)
                    .map_err(|e| Failure::new(0, format!("connection {n}: send failed: {e}")))
            }
            StepKind::Response(pattern) => {
                let c = self.conn(n)?;
                let msg = match c.next_response(RESPONSE_TIMEOUT) {
                    Ok(m) => m,
                    Err(ClientError::Closed) => {
                        return Err(Failure::new(
                            0,
                            format!(
                                "connection {n} closed by the server while waiting for a response"
                            ),
                        ))
                    }
                    Err(ClientError::Timeout(_)) => {
                        return Err(Failure::new(
                            0,
                            format!("no response within {} s", secs(RESPONSE_TIMEOUT)),
                        ))
                    }
                    Err(e) => {
                        let mut f = protocol(e);
                        f.expected = Some(pattern.to_string());
                        return Err(f);
                    }
                };
                pattern.check(&msg).map_err(|why| {
                    Box::new(Failure {
                        reason: format!("response does not match ({why})"),
                        expected: Some(pattern.to_string()),
                        received: Some(dumps(&msg, 4000)),
                        ..Failure::default()
                    })
                })
            }
            StepKind::Event(pattern) => {
                let c = self.conn(n)?;
                let why = match c.wait_event(pattern, EVENT_TIMEOUT) {
                    Ok(_) => return Ok(()),
                    Err(ClientError::Closed) => {
                        format!("connection {n} closed by the server before a matching event")
                    }
                    Err(ClientError::Timeout(_)) => {
                        format!("no matching event within {} s", secs(EVENT_TIMEOUT))
                    }
                    Err(e) => {
                        let mut f = protocol(e);
                        f.expected = Some(pattern.to_string());
                        return Err(f);
                    }
                };
                Err(event_miss(why, pattern, c))
            }
            StepKind::NoEvent(pattern) => {
                let c = self.conn(n)?;
                match c.find_event(pattern, ABSENCE_WINDOW) {
                    Ok(None) => Ok(()),
                    Ok(Some(ev)) => Err(Box::new(Failure {
                        reason: "an event matches a pattern that must not match".into(),
                        expected: Some(pattern.to_string()),
                        expected_absent: true,
                        received: Some(dumps(&ev, 4000)),
                        ..Failure::default()
                    })),
                    Err(e) => Err(protocol(e)),
                }
            }
        }
    }

    fn shell(&mut self, command: &str, expect_failure: bool) -> Fallible<()> {
        let out_path = self.base.join("shell.out");
        self.vlog(&format!("$ {command}"));
        let spawn = || -> std::io::Result<Child> {
            let log = File::create(&out_path)?;
            Command::new("sh")
                .arg("-c")
                .arg(command)
                .current_dir(&self.tmp)
                .env("TMP", &self.tmp)
                .env("SOCK", self.server().sock_for(1))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
        };
        let child = spawn()
            .map_err(|e| Failure::new(0, format!("runner error: cannot run shell step: {e}")))?;
        let pid = child.id() as i32;
        // left unreaped until cleanup: background children are killed there
        self.shells.push(ShellProc {
            child,
            guard: Some(GroupGuard::register(pid)),
        });
        let st = process::wait_exit(pid, SHELL_TIMEOUT);
        if st.is_none() {
            process::kill_group(pid, libc::SIGKILL);
        }
        let output =
            String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()).into_owned();
        for l in output.lines() {
            self.vlog(&format!("  | {l}"));
        }
        let lines: Vec<&str> = output.lines().collect();
        let tail: Vec<String> = lines[lines.len().saturating_sub(15)..]
            .iter()
            .map(|l| format!("output: {l}"))
            .collect();
        let fail = |reason: String| {
            Box::new(Failure {
                reason,
                notes: tail.clone(),
                ..Failure::default()
            })
        };
        let Some(st) = st else {
            return Err(fail(format!(
                "shell step timed out after {} s: {command}",
                secs(SHELL_TIMEOUT)
            )));
        };
        let rc = st.code();
        self.vlog(&format!("  exit status {rc}"));
        if !expect_failure && st != ExitStatus::Exited(0) {
            return Err(fail(format!(
                "shell step exited with status {rc}, expected 0: {command}"
            )));
        }
        if expect_failure && st == ExitStatus::Exited(0) {
            return Err(fail(format!(
                "shell step exited with status 0, expected non-zero: {command}"
            )));
        }
        Ok(())
    }

    /// Closes connections, stops the server, kills leftover shell processes
    /// and removes the scratch folder (unless kept). Idempotent.
    fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        // (with --verbose, each client's trace reports "@N closed")
        for (_, mut c) in std::mem::take(&mut self.conns) {
            c.close();
        }
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        for mut sh in std::mem::take(&mut self.shells) {
            process::stop_group(sh.child.id() as i32, Duration::from_secs(1));
            sh.guard.take();
            let _ = sh.child.wait();
        }
        if self.opts.keep {
            out(&format!("    scratch folder kept: {}", self.base.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.base);
        }
        self.dir_guard.take();
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        // also runs if a step panicked
        self.cleanup();
    }
}

/// The failure of a `!` step: expected pattern and the events left unconsumed.
fn event_miss(why: String, pattern: &Pattern, c: &QmpClient) -> Box<Failure> {
    let mut f = Box::new(Failure {
        reason: why,
        expected: Some(pattern.to_string()),
        ..Failure::default()
    });
    let events = c.pending_events();
    if events.is_empty() {
        f.received = Some("no unconsumed events".into());
    } else {
        f.notes = events
            .iter()
            .skip(events.len().saturating_sub(10))
            .map(|e| format!("unconsumed event: {}", dumps(e, 600)))
            .collect();
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeServer;

    fn run(fake: &FakeServer, text: &str) -> Outcome {
        let opts = RunOptions {
            server: fake.template(),
            verbose: false,
            keep: false,
        };
        run_script(text, &opts)
    }

    fn fails(fake: &FakeServer, text: &str) -> Failure {
        match run(fake, text) {
            Outcome::Pass => panic!("should fail:\n{text}"),
            Outcome::Fail(f) => f,
        }
    }

    const HELLO: &str = "< {\"QMP\": {\"version\": \"$any\", \"capabilities\": \"$any\"}}\n\
                         > {\"execute\": \"qmp_capabilities\"}\n\
                         < {\"return\": {}}\n";

    #[test]
    fn passing_transcript() {
        let fake = FakeServer::start().unwrap();
        let text = format!(
            "# a comment\n{HELLO}\
             > {{\"execute\": \"echo\", \"arguments\": {{\"a\": [1, 2]}}, \"id\": 5}}\n\
             < {{\"return\": {{\"a\": [\"$unordered\", 2, 1]}}, \"id\": 5}}\n\
             > {{\"execute\": \"emit\", \"arguments\": {{\"event\": \"E1\"}}}}\n\
             < {{\"return\": {{}}}}\n\
             > {{\"execute\": \"emit\", \"arguments\": {{\"event\": \"E2\", \"delay-ms\": 200}}}}\n\
             < {{\"return\": {{}}}}\n\
             ! {{\"event\": \"E2\"}}\n\
             ! {{\"event\": \"E1\", \"data\": \"$absent\"}}\n\
             !! {{\"event\": \"E1\"}}\n\
             >> {{\"execute\": bad}}\n\
             < {{\"error\": {{\"class\": \"GenericError\", \"desc\": \"$str\"}}}}\n\
             $ echo hi > \"$TMP/f\" && test \"$(pwd)\" = \"${{TMP}}\" && test -n \"$SOCK\"\n\
             $ test -f ${{TMP}}/f\n\
             $! test -f ${{TMP}}/nope\n\
             @2 < {{\"QMP\": \"$obj\"}}\n\
             @2 > {{\"execute\": \"query-x\"}}\n\
             @2 < {{\"error\": {{\"class\": \"CommandNotFound\"}}}}\n\
             @2 ~ close\n\
             @2 < {{\"QMP\": \"$obj\"}}\n"
        );
        assert_eq!(run(&fake, &text), Outcome::Pass);
    }

    #[test]
    fn wrong_pattern_fails_at_its_line() {
        let fake = FakeServer::start().unwrap();
        let f = fails(
            &fake,
            &format!("{HELLO}> {{\"execute\": \"echo\", \"arguments\": {{\"x\": 1}}}}\n< {{\"return\": {{\"x\": 2}}}}\n"),
        );
        assert_eq!(f.line, 5, "{f}");
        assert_eq!(
            f.reason,
            "response does not match ($.return.x: expected 2, received 1)"
        );
        assert_eq!(f.expected.as_deref(), Some(r#"{"return": {"x": 2}}"#));
        assert_eq!(f.received.as_deref(), Some(r#"{"return": {"x": 1}}"#));
        let shown = f.to_string();
        assert!(
            shown.starts_with("line 5: response does not match"),
            "{shown}"
        );
        assert!(
            shown.contains("\n    expected: {\"return\": {\"x\": 2}}"),
            "{shown}"
        );
        assert!(
            shown.contains("\n    received: {\"return\": {\"x\": 1}}"),
            "{shown}"
        );
        assert!(
            shown.contains("server output: fake server log line"),
            "{shown}"
        );
    }

    #[test]
    fn missing_event_fails_at_its_line() {
        let fake = FakeServer::start().unwrap();
        // the fake closes the connection on "close": no 30 s wait
        let f = fails(
            &fake,
            &format!(
                "{HELLO}> {{\"execute\": \"emit\", \"arguments\": {{\"event\": \"OTHER\"}}}}\n\
                 < {{\"return\": {{}}}}\n> {{\"execute\": \"close\"}}\n! {{\"event\": \"WANTED\"}}\n"
            ),
        );
        assert_eq!(f.line, 7, "{f}");
        assert_eq!(
            f.reason,
            "connection 1 closed by the server before a matching event"
        );
        assert_eq!(f.expected.as_deref(), Some(r#"{"event": "WANTED"}"#));
        assert_eq!(f.notes[0], r#"unconsumed event: {"event": "OTHER"}"#);
    }

    #[test]
    fn forbidden_event_that_arrives_fails() {
        let fake = FakeServer::start().unwrap();
        let f = fails(
            &fake,
            &format!(
                "{HELLO}> {{\"execute\": \"emit\", \"arguments\": {{\"event\": \"BAD\", \"delay-ms\": 300}}}}\n\
                 < {{\"return\": {{}}}}\n!! {{\"event\": \"GOOD\"}}\n!! {{\"event\": \"BAD\"}}\n"
            ),
        );
        assert_eq!(f.line, 7, "{f}");
        assert_eq!(f.reason, "an event matches a pattern that must not match");
        assert_eq!(f.received.as_deref(), Some(r#"{"event": "BAD"}"#));
        assert!(f
            .to_string()
            .contains("\n    not expected: {\"event\": \"BAD\"}\n"));
    }

    #[test]
    fn shell_expectations() {
        let fake = FakeServer::start().unwrap();
        let f = fails(&fake, &format!("{HELLO}$ true\n$! echo oops; true\n"));
        assert_eq!(f.line, 5, "{f}");
        assert_eq!(
            f.reason,
            "shell step exited with status 0, expected non-zero: echo oops; true"
        );
        assert_eq!(f.notes, vec!["output: oops".to_string()]);
        let f = fails(&fake, "$ exit 3\n");
        assert_eq!(f.line, 1);
        assert_eq!(
            f.reason,
            "shell step exited with status 3, expected 0: exit 3"
        );
    }

    #[test]
    fn syntax_error_fails_before_the_server_starts() {
        let opts = RunOptions {
            server: "touch {tmp}/started; sleep 60".into(),
            ..RunOptions::default()
        };
        let outcome = run_script(
            "# ok\n> {\"execute\": \"x\"}\n< {\"a\": \"$wrong\"}\nnonsense\n",
            &opts,
        );
        let f = outcome.failure().expect("fails").clone();
        assert_eq!(f.line, 3, "{f}");
        assert!(f.reason.contains("unknown pattern word $wrong"), "{f}");
        assert!(f.notes.iter().any(|n| n == "(2 syntax error(s))"), "{f}");
    }

    #[test]
    fn empty_transcript_and_dead_server() {
        let opts = RunOptions {
            server: "echo dying; exit 4".into(),
            ..RunOptions::default()
        };
        let f = run_script("# nothing\n", &opts).failure().cloned().unwrap();
        assert_eq!((f.line, f.reason.as_str()), (0, "transcript has no steps"));
        let f = run_script("< {}\n", &opts).failure().cloned().unwrap();
        assert_eq!(f.line, 0);
        assert_eq!(
            f.reason,
            "server exited with status 4 before creating its socket"
        );
        assert_eq!(f.server_output, vec!["dying".to_string()]);
    }

    #[test]
    fn bare_lf_is_a_failure() {
        let fake = FakeServer::start().unwrap();
        let f = fails(
            &fake,
            &format!("{HELLO}> {{\"execute\": \"bare-lf\"}}\n< {{\"return\": {{}}}}\n"),
        );
        assert_eq!(f.line, 5, "{f}");
        assert!(f.reason.contains("bare LF"), "{f}");
    }

    #[test]
    fn server_is_stopped_and_scratch_removed() {
        let fake = FakeServer::start().unwrap();
        let marker = std::env::temp_dir().join(format!("bt-marker-{}", std::process::id()));
        let opts = RunOptions {
            server: format!("echo {{tmp}} > {}; {}", marker.display(), fake.template()),
            ..RunOptions::default()
        };
        let text = format!("{HELLO}$ sleep 100 &\n");
        assert_eq!(run_script(&text, &opts), Outcome::Pass);
        let tmp = std::fs::read_to_string(&marker).unwrap();
        let _ = std::fs::remove_file(&marker);
        assert!(
            !Path::new(tmp.trim()).exists(),
            "scratch folder left: {tmp}"
        );
    }

    #[test]
    fn quoting_like_shlex() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("/tmp/bt-x/qmp.sock"), "/tmp/bt-x/qmp.sock");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\"'\"'s'");
    }

    #[test]
    fn failure_display() {
        let f = Failure {
            line: 3,
            reason: "why".into(),
            expected: Some("E".into()),
            received: Some("R".into()),
            expected_absent: false,
            notes: vec!["n".into()],
            server_output: vec!["s".into()],
        };
        assert_eq!(
            f.to_string(),
            "line 3: why\n    expected: E\n    received: R\n    n\n    server output: s"
        );
    }
}
