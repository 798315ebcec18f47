//! The NBD client: the `nbd` block driver (QEMU's block/nbd.c over
//! nbd/client.c).
//!
//! * [`negotiate`]: the handshake (`nbd_receive_negotiate`).
//! * [`conn`]: one connection in transmission, many requests in flight.
//! * [`driver`]: the block driver over a connection that comes back
//!   (`reconnect-delay`, QEMU's `nbd_reconnect_attempt` and
//!   `reconnect_delay_timer`).

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

pub mod conn;
pub mod driver;
pub mod negotiate;
mod status_cache;

pub use driver::NbdDriver;
pub use negotiate::ExportInfo;

/// Where the server is (QAPI `SocketAddress`).
#[derive(Debug)]
pub enum ServerAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (number or service name).
        port: String,
    },
    /// A connected socket passed by the client (usable once: no reconnect).
    Fd(std::sync::Mutex<Option<OwnedFd>>),
}

impl ServerAddr {
    /// The address as QEMU's messages show it (`'path'`, `'host:port'`).
    pub fn describe(&self) -> String {
        match self {
            ServerAddr::Unix(p) => p.display().to_string(),
            ServerAddr::Inet { host, port } => format!("{host}:{port}"),
            ServerAddr::Fd(_) => "fd".to_string(),
        }
    }
}

/// Options of an `nbd` node.
#[derive(Debug)]
pub struct ClientOptions {
    /// The server.
    pub server: ServerAddr,
    /// Export name (`""` if absent).
    pub export: Option<String>,
    /// Meta context to report as block status instead of `base:allocation`.
    pub x_dirty_bitmap: Option<String>,
    /// How long requests wait for a lost server to come back.
    pub reconnect_delay: Duration,
    /// How long the first connection may be retried.
    pub open_timeout: Duration,
    /// TLS (`tls-creds`, `tls-hostname`): redone on every reconnect.
    pub tls: Option<crate::tls::ClientTls>,
}

/// A connected, not yet negotiated stream, split.
pub(crate) type Halves = (conn::ReadHalf, conn::WriteHalf);

/// A connected, not yet negotiated stream.
pub(crate) enum RawStream {
    /// Over a Unix socket (or a passed descriptor).
    Unix(tokio::net::UnixStream),
    /// Over TCP.
    Tcp(tokio::net::TcpStream),
}

impl RawStream {
    /// The stream's halves, boxed.
    pub fn split(self) -> Halves {
        match self {
            RawStream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            RawStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Connects to `addr` (QEMU's `socket_connect`), with QEMU's message on
/// failure: "Failed to connect to 'ADDR': STRERROR".
pub(crate) async fn connect(addr: &ServerAddr) -> Result<RawStream, String> {
    let fail = |e: io::Error| {
        format!(
            "Failed to connect to '{}': {}",
            addr.describe(),
            crate::client::strerror(&e)
        )
    };
    match addr {
        ServerAddr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(fail)?;
            Ok(RawStream::Unix(s))
        }
        ServerAddr::Inet { host, port } => {
            let port_n: u16 = port.parse().map_err(|_| {
                format!("Failed to connect to '{host}:{port}': Invalid port '{port}'")
            })?;
            let s = tokio::net::TcpStream::connect((host.as_str(), port_n))
                .await
                .map_err(fail)?;
            let _ = s.set_nodelay(true);
            Ok(RawStream::Tcp(s))
        }
        ServerAddr::Fd(fd) => {
            let fd = fd
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .ok_or_else(|| "The passed socket was already used".to_string())?;
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true).map_err(fail)?;
            let s = tokio::net::UnixStream::from_std(std).map_err(fail)?;
            Ok(RawStream::Unix(s))
        }
    }
}

/// `strerror` of an I/O error without Rust's " (os error N)" suffix.
pub(crate) fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let s = io::Error::from_raw_os_error(n).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

/// The node's file name as QEMU's `nbd_refresh_filename` writes it:
/// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`.
pub fn filename(addr: &ServerAddr, export: Option<&str>) -> String {
    let exp = export.map(|e| format!("/{e}")).unwrap_or_default();
    match addr {
        ServerAddr::Unix(p) => format!("nbd+unix://{exp}?socket={}", p.display()),
        ServerAddr::Inet { host, port } => {
            if host.contains(':') {
                format!("nbd://[{host}]:{port}{exp}")
            } else {
                format!("nbd://{host}:{port}{exp}")
            }
        }
        ServerAddr::Fd(_) => format!("nbd://fd{exp}"),
    }
}
