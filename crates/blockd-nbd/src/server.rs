//! The server: listening socket, accept loop, export table, and the life
//! of one connection (handshake, then transmission).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::export::Export;
use crate::handshake::Negotiated;
use crate::tls::{verify, ServerTls, TlsIo};
use crate::{
    handshake, starttls, transmission, ExportConfig, Listen, ServerOptions, HANDSHAKE_TIMEOUT,
};

/// State shared by the server handle, the accept loop and the connections.
pub(crate) struct Shared {
    exports: Mutex<Vec<Arc<Export>>>,
    /// Cancelled by [`NbdServer::stop`]; every export's token is a child.
    cancel: CancellationToken,
    /// Every connection and request task.
    tracker: TaskTracker,
    multi_conn: bool,
    /// TLS required of every client (`tls-creds`).
    tls: Option<ServerTls>,
}

impl Shared {
    /// Whether clients must start TLS.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn table(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The export called `name`, if it exists and is not being removed.
    pub fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.table()
            .iter()
            .find(|e| e.name.as_bytes() == name)
            .cloned()
    }

    /// The exports, in the order they were added.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.table().clone()
    }

    /// Tracks a task so that [`NbdServer::stop`] waits for it.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

struct Inner {
    shared: Arc<Shared>,
    local_addr: String,
    /// The socket file to remove on stop (only for [`Listen::Unix`]).
    unix_path: Option<PathBuf>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

/// A running NBD server. Clones share the server; it runs until
/// [`stop`](NbdServer::stop) (dropping every handle does not stop it).
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Binds the listening socket and starts accepting clients.
    ///
    /// A Unix socket path that exists already is unlinked first (QEMU does
    /// the same); a TCP socket gets `SO_REUSEADDR`. A passed descriptor
    /// must be a listening Unix or TCP socket.
    pub async fn start(listen: Listen, opts: ServerOptions) -> io::Result<NbdServer> {
        let (listeners, local_addr, unix_path) = bind(listen).await?;
        let shared = Arc::new(Shared {
            exports: Mutex::new(Vec::new()),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            multi_conn: opts.max_connections != 1,
            tls: opts.tls.clone(),
        });
        let limit = match opts.max_connections {
            0 => None,
            n => Some(Arc::new(Semaphore::new(n as usize))),
        };
        let task = tokio::spawn(accept_loop(shared.clone(), listeners, limit));
        tracing::debug!(addr = %local_addr, "NBD server listening");
        Ok(NbdServer {
            inner: Arc::new(Inner {
                shared,
                local_addr,
                unix_path,
                accept_task: Mutex::new(Some(task)),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// Adds an export. Fails if the name is taken (by an export not being
    /// removed), too long, or the server is stopped.
    pub fn add_export(&self, cfg: ExportConfig) -> Result<(), String> {
        let shared = &self.inner.shared;
        if shared.cancel.is_cancelled() {
            return Err("NBD server not running".into());
        }
        let mut table = shared.table();
        if table.iter().any(|e| e.name == cfg.name) {
            return Err(format!(
                "NBD server already has export named '{}'",
                cfg.name
            ));
        }
        let exp = Export::new(cfg, shared.multi_conn, shared.cancel.child_token())?;
        table.push(Arc::new(exp));
        Ok(())
    }

    /// Removes an export: new clients cannot reach it from now on; with
    /// `hard`, its clients are disconnected at once (their in-flight
    /// requests finish unanswered). The receiver fires when its last client
    /// and that client's last request are gone (at once if it has none).
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<oneshot::Receiver<()>, String> {
        let exp = {
            let mut table = self.inner.shared.table();
            let Some(pos) = table.iter().position(|e| e.name == name) else {
                return Err(format!("Export '{name}' is not found"));
            };
            table.remove(pos)
        };
        Ok(exp.remove(hard))
    }

    /// Number of clients attached to the export `name` (0 if there is none).
    pub fn export_clients(&self, name: &str) -> usize {
        self.inner
            .shared
            .find(name.as_bytes())
            .map_or(0, |e| e.clients())
    }

    /// Number of clients attached to the export `name` once those whose
    /// connection is ending have gone, waiting up to `limit` for that.
    ///
    /// QEMU handles a client's hang-up in the main loop before it runs a
    /// QMP command that arrived later, so `block-export-del` right after a
    /// client disconnected finds the export unused; here the connection's
    /// task runs on another thread and may not have seen the hang-up yet.
    pub async fn export_clients_settled(&self, name: &str, limit: Duration) -> usize {
        match self.inner.shared.find(name.as_bytes()) {
            Some(e) => e.wait_unused(limit).await,
            None => 0,
        }
    }

    /// Whether an export called `name` exists (and is not being removed).
    pub fn has_export(&self, name: &str) -> bool {
        self.inner.shared.find(name.as_bytes()).is_some()
    }

    /// Stops the server: closes the listener (removing the Unix socket
    /// file it created), disconnects every client and waits until all
    /// connection and request tasks are finished. The export table is left
    /// as it is (removing the exports is the caller's business, as QEMU's
    /// `nbd-server-stop` does it in the QMP layer). Safe to call twice.
    pub async fn stop(&self) {
        let inner = &self.inner;
        inner.shared.cancel.cancel();
        let task = inner
            .accept_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        if !inner.stopped.swap(true, Ordering::SeqCst) {
            if let Some(p) = &inner.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        inner.shared.tracker.close();
        inner.shared.tracker.wait().await;
    }

    /// The address the server listens on: the socket path for Unix
    /// sockets, `ip:port` for TCP.
    pub fn local_addr(&self) -> String {
        self.inner.local_addr.clone()
    }
}

/// Binds the listening sockets: one, except for a TCP host name that
/// resolves to several addresses, where (like QEMU) every address that can
/// be bound is listened on (only the first with port 0).
async fn bind(listen: Listen) -> io::Result<(Vec<Listener>, String, Option<PathBuf>)> {
    match listen {
        Listen::Unix(path) => {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let l = UnixListener::bind(&path)?;
            let addr = path.display().to_string();
            Ok((vec![Listener::Unix(l)], addr, Some(path)))
        }
        Listen::Tcp { host, port } => {
            let port: u16 = port.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid port '{port}'"),
                )
            })?;
            let host = if host.is_empty() { "0.0.0.0" } else { &host };
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for a in tokio::net::lookup_host((host, port)).await? {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            if port == 0 {
                addrs.truncate(1);
            }
            let (mut ls, mut first, mut last) = (Vec::new(), None, None);
            for addr in addrs {
                match bind_tcp(addr) {
                    Ok(l) => {
                        first.get_or_insert(l.local_addr()?.to_string());
                        ls.push(Listener::Tcp(l));
                    }
                    Err(e) => last = Some(e),
                }
            }
            match first {
                Some(a) => Ok((ls, a, None)),
                None => Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("no address for '{host}'"))
                })),
            }
        }
        Listen::Fd(fd) => from_fd(fd).map(|(l, a)| (vec![l], a, None)),
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(libc::SOMAXCONN as u32)
}

fn from_fd(fd: OwnedFd) -> io::Result<(Listener, String)> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor we own; the option buffer and its
    // length describe a valid c_int that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if accepting == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "file descriptor is not a listening socket",
        ));
    }
    let unix = std::os::unix::net::UnixListener::from(fd);
    if let Ok(addr) = unix.local_addr() {
        unix.set_nonblocking(true)?;
        let name = addr
            .as_pathname()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unix:<unnamed>".into());
        return Ok((Listener::Unix(UnixListener::from_std(unix)?), name));
    }
    let tcp = std::net::TcpListener::from(OwnedFd::from(unix));
    let addr = tcp.local_addr()?.to_string();
    tcp.set_nonblocking(true)?;
    Ok((Listener::Tcp(TcpListener::from_std(tcp)?), addr))
}

/// Errors of `accept` that concern one connection only.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

async fn accept_loop(shared: Arc<Shared>, listeners: Vec<Listener>, limit: Option<Arc<Semaphore>>) {
    let cancel = shared.cancel.clone();
    loop {
        let permit = match &limit {
            None => None,
            Some(sem) => tokio::select! {
                _ = cancel.cancelled() => break,
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
            },
        };
        let res = tokio::select! {
            _ = cancel.cancelled() => break,
            r = accept(&listeners) => r,
        };
        match res {
            Ok(Conn::Unix(s)) if shared.tls.is_some() => {
                shared.spawn(tls_client(shared.clone(), s, permit));
            }
            Ok(Conn::Tcp(s)) if shared.tls.is_some() => {
                let _ = s.set_nodelay(true);
                shared.spawn(tls_client(shared.clone(), s, permit));
            }
            Ok(Conn::Unix(s)) => {
                let (r, w) = s.into_split();
                shared.spawn(client(shared.clone(), r, w, permit));
            }
            Ok(Conn::Tcp(s)) => {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                shared.spawn(client(shared.clone(), r, w, permit));
            }
            Err(e) if transient(&e) => {
                tracing::warn!("NBD server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::error!("NBD server: accept failed, no longer accepting: {e}");
                break;
            }
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// Accepts a connection on whichever listener has one first.
async fn accept(ls: &[Listener]) -> io::Result<Conn> {
    std::future::poll_fn(|cx| {
        for l in ls {
            let r = match l {
                Listener::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| Conn::Unix(s)),
                Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Conn::Tcp(s)),
            };
            if r.is_ready() {
                return r;
            }
        }
        Poll::Pending
    })
    .await
}

/// One connection, from greeting to close.
async fn client<R, W>(shared: Arc<Shared>, r: R, mut w: W, _permit: Option<OwnedSemaphorePermit>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(64 << 10, r);
    let neg = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        n = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&shared, &mut r, &mut w)) => n,
    };
    let neg = match neg {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!("NBD client: option negotiation failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("NBD client: handshake timed out");
            return;
        }
    };
    if let Err(e) = transmission::serve(&shared, r, w, neg).await {
        tracing::warn!("NBD client: disconnected, due to: {e}");
    }
}

/// The handshake of a client of a server with TLS, up to transmission:
/// options before TLS, STARTTLS, the TLS handshake, the peer checks, then
/// the rest of the options over TLS. `Ok(None)`: the client left, or was
/// refused (dropped without a word, as QEMU does).
async fn tls_handshake<S>(
    shared: &Shared,
    tls: &ServerTls,
    mut s: S,
) -> io::Result<Option<(Negotiated, TlsHalves<S>)>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    {
        // Unbuffered: nothing of the TLS handshake may be read here.
        let (mut r, mut w) = tokio::io::split(&mut s);
        let Some(hello) = handshake::greet(&mut r, &mut w).await? else {
            return Ok(None);
        };
        if !starttls::before_tls(&mut r, &mut w, hello).await? {
            return Ok(None);
        }
        let Some(cfg) = tls.creds.server.clone() else {
            return Err(io::Error::other("no server credentials"));
        };
        drop((r, w));
        let stream = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(s)
            .await
            .map_err(|e| io::Error::other(format!("TLS handshake failed: {e}")))?;
        let certs = stream.get_ref().1.peer_certificates();
        if let Err(e) = verify::check_client(&tls.creds, certs, tls.authz.as_ref()) {
            tracing::warn!("NBD client: option negotiation failed: {e}");
            refuse(stream.into_inner().0).await;
            return Ok(None);
        }
        let (r, mut w) = tokio::io::split(TlsIo(stream));
        let mut r = BufReader::with_capacity(64 << 10, r);
        Ok(handshake::haggle(shared, &mut r, &mut w, hello)
            .await?
            .map(|n| (n, (r, w))))
    }
}

/// Drops a refused client without a word: its side of the socket is shut
/// down and what it sends meanwhile (its first option, right after the
/// handshake) is read and dropped until it hangs up, for a while at most,
/// so that it learns of the refusal when it reads, as QEMU's clients do
/// from QEMU's server, rather than by a failed write.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    use tokio::io::AsyncWriteExt;
    let _ = s.shutdown().await;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(Duration::from_secs(2), tokio::io::copy(&mut s, &mut sink)).await;
}

type TlsStream<S> = TlsIo<tokio_rustls::server::TlsStream<S>>;
type TlsHalves<S> = (
    BufReader<tokio::io::ReadHalf<TlsStream<S>>>,
    tokio::io::WriteHalf<TlsStream<S>>,
);

/// One connection of a server with TLS, from greeting to close.
async fn tls_client<S>(shared: Arc<Shared>, s: S, _permit: Option<OwnedSemaphorePermit>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(tls) = shared.tls.clone() else {
        return;
    };
    let neg = tokio::select! {
        _ = shared.cancel.cancelled() => return,
        n = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_handshake(&shared, &tls, s)) => n,
    };
    let (neg, (r, w)) = match neg {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!("NBD client: option negotiation failed: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("NBD client: handshake timed out");
            return;
        }
    };
    if let Err(e) = transmission::serve(&shared, r, w, neg).await {
        tracing::warn!("NBD client: disconnected, due to: {e}");
    }
}
