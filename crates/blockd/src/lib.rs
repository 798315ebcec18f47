//! blockd, the server: command line, listeners, state and QMP handlers.
//!
//! `main` is a thin wrapper around [`main_with_args`]; tests can start a
//! server in-process with [`Server::start`].

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockd_qmp::json::Limits;
use blockd_qmp::schema::schema_info;
use blockd_qmp::{EventBus, QmpServer, ServerConfig, ShutdownCause};
use serde_json::{json, Value};
use tokio::net::UnixListener;

pub mod bitmaps;
pub mod cli;
pub mod events;
pub mod exports;
pub mod fds;
pub mod keyval;
pub mod machine;
pub mod objects;
pub mod qmp;
pub mod qom;
pub mod schema;
pub mod secret;
pub mod state;
pub mod tls_objects;

use state::State;

/// The QEMU version whose QMP blockd follows.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 0);

/// The `VersionInfo` of this build.
pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("blockd {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A running server: its QMP server, state and sockets.
pub struct Server {
    /// The QMP server.
    pub qmp: Arc<QmpServer<State>>,
    /// Shared state.
    pub state: Arc<State>,
    sockets: Vec<PathBuf>,
}

/// Why start-up failed; printed to stderr, exit status 1.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Server {
    /// Builds the server, binds every socket and applies `--blockdev`s.
    pub async fn start(
        sockets: &[PathBuf],
        blockdevs: &[cli::OptionArgs],
    ) -> Result<Server, StartError> {
        Self::start_with(sockets, blockdevs, None, &[]).await
    }

    /// [`Server::start`] with the NBD server and exports of the command line.
    pub async fn start_with(
        sockets: &[PathBuf],
        blockdevs: &[cli::OptionArgs],
        nbd_server: Option<&cli::OptionArgs>,
        exports: &[cli::OptionArgs],
    ) -> Result<Server, StartError> {
        let opts = StartOptions {
            blockdevs,
            nbd_server,
            exports,
            ..StartOptions::default()
        };
        Self::start_opts(sockets, &opts).await
    }

    /// Builds the server and applies the command line, in this order:
    /// `--object`, `--blockdev`, `--drive`, `--device`, `--nbd-server`,
    /// `--export`.
    pub async fn start_opts(
        sockets: &[PathBuf],
        opts: &StartOptions<'_>,
    ) -> Result<Server, StartError> {
        let StartOptions {
            objects,
            blockdevs,
            drives,
            devices,
            nbd_server,
            exports,
            no_inline_writes,
        } = *opts;
        let schema = schema::load();
        let events = EventBus::new(schema.clone());
        let dispatcher = qmp::dispatcher(schema.clone());
        let missing = dispatcher.missing_handlers();
        if !missing.is_empty() {
            return Err(StartError(format!(
                "commands without handlers: {missing:?}"
            )));
        }
        let commands: Vec<Value> = schema
            .commands()
            .iter()
            .map(|c| json!({"name": c.name}))
            .collect();
        let state = Arc::new(State::new(
            events.clone(),
            version_info(),
            Value::Array(schema_info(&schema)),
            Value::Array(commands),
            no_inline_writes,
        ));
        let config = ServerConfig {
            version: version_info(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(10),
        };
        let qmp = QmpServer::new(dispatcher, state.clone(), events, config);
        let mut listeners = Vec::new();
        for path in sockets {
            listeners.push(bind(path)?);
        }
        let server = Server {
            qmp,
            state,
            sockets: sockets.to_vec(),
        };
        for o in objects {
            let added = match keyval_args(&schema, "object-add", o) {
                Ok(args) => server.qmp.execute("object-add", args).await,
                Err(e) => Err(e),
            };
            if let Err(e) = added {
                server.shutdown(ShutdownCause::HostSignal).await;
                return Err(StartError(format!("--object: {}", e.desc)));
            }
        }
        for b in blockdevs {
            let added = match keyval_args(&schema, "blockdev-add", b) {
                Ok(args) => server.qmp.execute("blockdev-add", args).await,
                Err(e) => Err(e),
            };
            if let Err(e) = added {
                server.shutdown(ShutdownCause::HostSignal).await;
                return Err(StartError(format!("--blockdev: {}", e.desc)));
            }
        }
        if let Err(e) = server.start_machine(drives, devices).await {
            server.shutdown(ShutdownCause::HostSignal).await;
            return Err(StartError(e));
        }
        if let Some(n) = nbd_server {
            if let Err(e) = server.start_nbd_option(&schema, n).await {
                server.shutdown(ShutdownCause::HostSignal).await;
                return Err(StartError(format!("--nbd-server: {e}")));
            }
        }
        for x in exports {
            let added = match keyval_args(&schema, "block-export-add", x) {
                Ok(args) => server.qmp.execute("block-export-add", args).await,
                Err(e) => Err(e),
            };
            if let Err(e) = added {
                server.shutdown(ShutdownCause::HostSignal).await;
                return Err(StartError(format!("--export: {}", e.desc)));
            }
        }
        for l in listeners {
            server.qmp.serve(l);
        }
        Ok(server)
    }

    /// `--drive` and `--device`, in order.
    async fn start_machine(&self, drives: &[String], devices: &[String]) -> Result<(), String> {
        let st = &self.state;
        for d in drives {
            let spec = machine::drive::parse(d).map_err(|e| format!("--drive {d}: {e}"))?;
            st.machine
                .drive_new(&st.graph, &st.env, spec)
                .await
                .map_err(|e| format!("--drive {d}: {e}"))?;
        }
        for d in devices {
            let args = cli::device_arg(d).map_err(|e| format!("--device {d}: {e}"))?;
            st.machine
                .device_add(&st.graph, &args, false)
                .map_err(|e| format!("--device {d}: {}", e.desc))?;
        }
        Ok(())
    }

    /// `--nbd-server`: NbdServerOptions (flat address) to `nbd-server-start`.
    async fn start_nbd_option(
        &self,
        schema: &blockd_qmp::schema::Schema,
        n: &cli::OptionArgs,
    ) -> Result<(), String> {
        let mut v = if n.keyval {
            schema.check_value_keyval("NbdServerOptions", &n.value)
        } else {
            schema.check_value("NbdServerOptions", &n.value)
        }
        .map_err(|e| e.desc)?;
        // The flat address becomes the legacy {type, data} form.
        if let Some(Value::Object(mut addr)) = v.get_mut("addr").map(Value::take) {
            let ty = addr.remove("type").unwrap_or(Value::Null);
            v["addr"] = json!({"type": ty, "data": Value::Object(addr)});
        }
        self.qmp
            .execute("nbd-server-start", v)
            .await
            .map(|_| ())
            .map_err(|e| e.desc)
    }

    /// Waits for `quit` or a signal from `signals`, then shuts down cleanly.
    pub async fn run_until_shutdown(self, mut signals: Signals) {
        let reason = tokio::select! {
            r = self.state.shutdown_requested() => r,
            _ = signals.recv() => ShutdownCause::HostSignal,
        };
        tracing::info!(?reason, "shutting down");
        self.shutdown(reason).await;
    }

    /// Shuts down: answers received commands, cancels the jobs (their
    /// events still reach the clients, as qemu-storage-daemon's do), sends
    /// `SHUTDOWN`, closes clients, removes the sockets.
    pub async fn shutdown(self, reason: ShutdownCause) {
        self.qmp.stop_input().await;
        // Nothing waits out a throttle on the way out (jobs being
        // cancelled, exports closing): QEMU's drain-all disables limits.
        self.state.throttle_groups.lift_all();
        // Takes the control-plane lock around each cancel only: cancelled
        // jobs finalize under it on their own tasks, so it must not be held
        // here while they do.
        self.state.jobs.cancel_sync_all().await;
        self.qmp.close(reason).await;
        exports::stop_server(&self.state).await;
        self.state.machine.clear(&self.state.graph);
        // Flush and close every image: parents (created later) first.
        let mut nodes = self.state.graph.clear();
        nodes.reverse();
        qmp::close_nodes(nodes).await;
        self.remove_sockets();
    }

    fn remove_sockets(&self) {
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The arguments of `command` from a command-line option: `key=value`
/// options are checked (and typed) in keyval mode, as qemu-storage-daemon
/// visits them, before the command checks them again as JSON.
fn keyval_args(
    schema: &blockd_qmp::schema::Schema,
    command: &str,
    o: &cli::OptionArgs,
) -> Result<Value, blockd_qmp::QmpError> {
    match &o.value {
        Value::Object(m) if o.keyval => schema.check_command_args_keyval(command, m),
        v => Ok(v.clone()),
    }
}

/// What the command line asks for at start-up (see [`Server::start_opts`]).
#[derive(Default, Clone, Copy)]
pub struct StartOptions<'a> {
    /// `--object`s.
    pub objects: &'a [cli::OptionArgs],
    /// `--blockdev`s.
    pub blockdevs: &'a [cli::OptionArgs],
    /// `--drive`s, in QEMU's `-drive` syntax.
    pub drives: &'a [String],
    /// `--device`s, in QEMU's `-device` syntax.
    pub devices: &'a [String],
    /// `--nbd-server`.
    pub nbd_server: Option<&'a cli::OptionArgs>,
    /// `--export`s.
    pub exports: &'a [cli::OptionArgs],
    /// `--inline-writes off`.
    pub no_inline_writes: bool,
}

/// SIGTERM and SIGINT, installed before any socket exists so that a
/// signal arriving during start-up still shuts down cleanly.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (inside the runtime).
    pub fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Waits for either signal.
    pub async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = one(&mut self.term) => {}
            _ = one(&mut self.int) => {}
        }
    }
}

/// Binds a QMP socket with mode 0600. A stale socket file is replaced; a
/// live one (a server answers there) is refused.
fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let shown = path.display();
    // sun_path holds 108 bytes including the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(StartError(format!(
            "QMP socket path '{shown}' is too long ({} bytes; Unix sockets allow at most 107)",
            path.as_os_str().len()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path)
        {
            Ok(_) => {
                return Err(StartError(format!(
                    "QMP socket '{shown}' is in use by another server"
                )))
            }
            Err(_) => {
                std::fs::remove_file(path).map_err(|e| {
                    StartError(format!("cannot remove stale socket '{shown}': {e}"))
                })?;
            }
        },
        Ok(_) => {
            return Err(StartError(format!(
                "'{shown}' exists and is not a socket; not replacing it"
            )))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(StartError(format!("cannot use '{shown}': {e}"))),
    }
    // Bind with a umask that leaves the socket owner-only from its first
    // instant, so there is no window in which others could connect.
    // SAFETY: umask only swaps the process mask; nothing else in this
    // process creates files while the server is starting.
    let old = unsafe { libc::umask(0o177) };
    // Listen under a temporary name, then move the socket into place: a
    // client that sees the path can connect at once (bind creates the
    // file before listen, so waiting for the file alone could meet
    // ECONNREFUSED). Where the temporary name would be too long, bind in
    // place.
    let tmp = path.with_file_name(format!(
        ".{}.{}.bind",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let staged = tmp.as_os_str().len() <= 107;
    if staged {
        let _ = std::fs::remove_file(&tmp);
    }
    let r = UnixListener::bind(if staged { &tmp } else { path });
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = r.map_err(|e| StartError(format!("cannot listen on '{shown}': {e}")))?;
    if staged {
        if let Err(e) = rename_noreplace(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StartError(if e.kind() == ErrorKind::AlreadyExists {
                format!("QMP socket '{shown}' is in use by another server")
            } else {
                format!("cannot listen on '{shown}': {e}")
            }));
        }
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// `renameat2(RENAME_NOREPLACE)`: another server that bound `to` since
/// the check above keeps it.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket used when no `--qmp`/`--monitor` is given:
/// `$XDG_RUNTIME_DIR/blockd/qmp.sock`, else `<tmp>/blockd-<uid>/qmp.sock`.
pub fn default_socket() -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("blockd"),
        // SAFETY: getuid has no preconditions and cannot fail.
        _ => std::env::temp_dir().join(format!("blockd-{}", unsafe { libc::getuid() })),
    };
    dir.join("qmp.sock")
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|e| {
            eprintln!("blockd: bad --log filter '{f}': {e}; using 'warn'");
            EnvFilter::new("warn")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs blockd with the given command line; returns the exit status.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match cli::parse(args) {
        Ok(a) => a,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return code;
        }
    };
    init_logging(args.log.as_deref());
    let mut sockets = args.qmp.clone();
    match cli::monitor_sockets(&args.chardev, &args.monitor) {
        Ok(s) => sockets.extend(s),
        Err(e) => {
            eprintln!("blockd: {e}");
            return 1;
        }
    }
    let mut announce = false;
    if sockets.is_empty() {
        let p = default_socket();
        if let Some(dir) = p.parent() {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        sockets.push(p);
        announce = true;
    }
    let mut objects = Vec::new();
    for o in &args.object {
        match cli::object_arg(o) {
            Ok(v) => objects.push(v),
            Err(e) => {
                // (The value is not echoed: it may hold a secret.)
                eprintln!("blockd: --object: {e}");
                return 1;
            }
        }
    }
    let mut blockdevs = Vec::new();
    for b in &args.blockdev {
        match cli::blockdev_arg(b) {
            Ok(v) => blockdevs.push(v),
            Err(e) => {
                eprintln!("blockd: --blockdev {b}: {e}");
                return 1;
            }
        }
    }
    // Big stacks (virtual memory; only touched pages cost anything): QMP
    // arguments may nest 1024 levels deep, and decoding and opening such a
    // tree recurses once per level.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockd: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let signals = Signals::install();
        // The pidfile exists before the sockets do: whoever waits for a
        // socket can read the pid at once.
        if let Some(p) = &args.pidfile {
            if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
                eprintln!("blockd: cannot write pidfile '{}': {e}", p.display());
                return 1;
            }
        }
        let remove_pidfile = || {
            if let Some(p) = &args.pidfile {
                let _ = std::fs::remove_file(p);
            }
        };
        let nbd_server = match args
            .nbd_server
            .as_deref()
            .map(cli::nbd_server_arg)
            .transpose()
        {
            Ok(n) => n,
            Err(e) => {
                eprintln!("blockd: --nbd-server: {e}");
                remove_pidfile();
                return 1;
            }
        };
        let mut exports = Vec::new();
        for x in &args.export {
            match cli::export_arg(x) {
                Ok(v) => exports.push(v),
                Err(e) => {
                    eprintln!("blockd: --export {x}: {e}");
                    remove_pidfile();
                    return 1;
                }
            }
        }
        let opts = StartOptions {
            objects: &objects,
            blockdevs: &blockdevs,
            drives: &args.drive,
            devices: &args.device,
            nbd_server: nbd_server.as_ref(),
            exports: &exports,
            no_inline_writes: !args.inline_writes,
        };
        let server = match Server::start_opts(&sockets, &opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("blockd: {e}");
                remove_pidfile();
                return 1;
            }
        };
        if announce {
            use std::io::Write;
            let p = sockets[0].display();
            // A closed stdout must not stop the server: ignore write errors.
            let mut out = std::io::stdout();
            let _ = writeln!(
                out,
                "blockd {} listening for QMP on {p}",
                env!("CARGO_PKG_VERSION")
            );
            let _ = writeln!(out, "connect with:  socat - UNIX-CONNECT:{p}");
            let _ = out.flush();
        }
        server.run_until_shutdown(signals).await;
        remove_pidfile();
        0
    })
}
