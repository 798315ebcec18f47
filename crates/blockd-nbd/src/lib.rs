//! The NBD export server of blockd: the server side of the Network Block
//! Device protocol as QEMU 10's `nbd/server.c` speaks it, over Unix or TCP
//! sockets.
//!
//! * Fixed newstyle negotiation only (`NBD_FLAG_FIXED_NEWSTYLE |
//!   NBD_FLAG_NO_ZEROES`); options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//!   `GO`, `STARTTLS` (with [`ServerOptions::tls`]: required before any
//!   other option, see [`tls`]), `STRUCTURED_REPLY`,
//!   `EXTENDED_HEADERS`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`
//!   (`base:allocation`, `qemu:allocation-depth`).
//! * Commands `READ` (simple, or structured with holes as `OFFSET_HOLE`),
//!   `WRITE`, `DISC`, `FLUSH`, `TRIM`, `CACHE`, `WRITE_ZEROES` and
//!   `BLOCK_STATUS`, compact or extended headers.
//! * Each client has one reader that parses requests and starts each on
//!   its own task (at most [`MAX_REQUESTS_IN_FLIGHT`], and at most
//!   [`MAX_BYTES_IN_FLIGHT`] bytes of payload), and one writer that sends
//!   replies as they complete, coalescing those that are ready together.
//!
//! The server does not know about block nodes: an export reads and writes
//! through an [`ExportIo`], which the QMP layer implements over a node.
//!
//! Modules: [`proto`] (wire constants, errno mapping), [`client`] (the NBD
//! client and the `nbd` block driver); the rest is private:
//! `server` (listener, export table), `export` (one export and its
//! clients), `handshake` (option haggling), `starttls` (the options
//! before TLS), `transmission` (request
//! parsing and checks), `commands` (running requests), `reply` (reply
//! encoding and the writer task).

use std::path::PathBuf;
use std::sync::Arc;

pub use blockd_core::{BlockStatus, IoFuture};

pub mod client;
mod commands;
mod export;
mod handshake;
pub mod proto;
mod reply;
mod server;
mod starttls;
pub mod tls;
mod transmission;

pub use server::NbdServer;

/// Most requests one client may have in flight; the reader waits for a
/// slot before reading the next request.
pub const MAX_REQUESTS_IN_FLIGHT: u32 = 64;

/// Most payload bytes (write data, read replies, block status extents)
/// one client may hold in memory at once, replies not yet sent included.
pub const MAX_BYTES_IN_FLIGHT: u32 = 64 << 20;

/// How long a client may take to finish negotiation (QEMU 10's default
/// `handshake-max-seconds`).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What an export reads and writes (implemented by the QMP layer over a
/// block node or backend).
///
/// Offsets and lengths the server passes are always within
/// [`length`](ExportIo::length) (rounded down to 512 bytes, as QEMU
/// exports it). Errors are reported to the client by their errno
/// (`io::Error::raw_os_error`), mapped as [`proto::errno_to_nbd`] does.
pub trait ExportIo: Send + Sync + 'static {
    /// Size of the export in bytes, read once when the export is added.
    fn length(&self) -> u64;
    /// (minimum, preferred, maximum) block sizes to advertise
    /// (`NBD_INFO_BLOCK_SIZE`); a maximum of 0 means the server's limit.
    fn block_limits(&self) -> (u32, u32, u32);
    /// Reads `len` bytes at `offset`; the result must be exactly `len` bytes.
    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, bytes::Bytes>;
    /// Writes `data` at `offset`; with `fua`, the data is stable on return.
    fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> IoFuture<'_, ()>;
    /// Makes the range read as zeroes. `may_unmap`: it may be deallocated;
    /// `fast_only`: fail with `ENOTSUP` rather than write zeroes slowly.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> IoFuture<'_, ()>;
    /// Discards the range (advisory).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Makes completed writes stable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Status of the range at `offset` (at most `len` bytes); see
    /// [`blockd_core::BlockStatus`].
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, blockd_core::BlockStatus>;
    /// `qemu:allocation-depth`: (bytes it applies to, depth: 0 =
    /// unallocated in the whole chain, 1 = this layer, n = n-th backing
    /// layer).
    fn allocation_depth(&self, offset: u64, len: u64) -> IoFuture<'_, (u64, u32)>;
    /// Hint to pre-fetch (`NBD_CMD_CACHE`); by default it does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// One export to add to a running server.
pub struct ExportConfig {
    /// The name clients ask for (at most 4096 bytes).
    pub name: String,
    /// Text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (at most 4096 bytes).
    pub description: Option<String>,
    /// Where the data lives.
    pub io: Arc<dyn ExportIo>,
    /// Whether clients may write (otherwise `NBD_FLAG_READ_ONLY`).
    pub writable: bool,
    /// Whether to offer the `qemu:allocation-depth` metadata context.
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (at most
    /// [`proto::MAX_EXPORT_BITMAPS`]); the caller marks them busy.
    pub bitmaps: Vec<Arc<blockd_core::dirty::NamedBitmap>>,
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listen {
    /// A Unix socket at this path (an existing file there is replaced, as
    /// QEMU does; the socket file is removed again by [`NbdServer::stop`]).
    Unix(PathBuf),
    /// A TCP socket; `host` may be a name or an address (empty: all
    /// IPv4 addresses), `port` a number (0: any free port).
    Tcp {
        /// Host name or address to bind.
        host: String,
        /// Port number, as text.
        port: String,
    },
    /// An already listening socket (Unix or TCP), owned from now on.
    Fd(std::os::fd::OwnedFd),
}

/// Server-wide settings.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Most simultaneous client connections (0: unlimited). Further
    /// clients wait in the listen backlog. Exports advertise
    /// `NBD_FLAG_CAN_MULTI_CONN` unless this is 1 (as QEMU does).
    pub max_connections: u32,
    /// TLS required of every client (`tls-creds`, `tls-authz`).
    pub tls: Option<tls::ServerTls>,
}
