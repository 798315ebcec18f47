//! The `nbd` block driver (QEMU's block/nbd.c): requests become NBD
//! commands on one connection; a supervisor task notices when the
//! connection is lost and reconnects (QEMU's `nbd_reconnect_attempt`).
//!
//! While the server is gone, a request waits for it only within
//! `reconnect-delay` seconds of the loss (QEMU's `reconnect_delay_timer`
//! moving the state from `CONNECTING_WAIT` to `CONNECTING_NOWAIT`);
//! afterwards, or without a delay, requests fail with EIO at once, while
//! the supervisor keeps trying, so a server that comes back later serves
//! later requests. A request the lost connection had in flight is resent
//! on the new one, as QEMU's `nbd_co_request` does.
//!
//! `NBD_CMD_CACHE` is never sent, even when the server offers it
//! (`NBD_FLAG_SEND_CACHE`): QEMU 10's client has no such request either
//! (block/nbd.c registers no prefetch callback; `BDRV_REQ_PREFETCH` is a
//! copy-on-read request that block/io.c serves by reading, so a prefetch
//! through an nbd node is an `NBD_CMD_READ`). blockd's server still
//! answers `NBD_CMD_CACHE` from clients that send it (libnbd's
//! `nbd_cache`).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockd_core::{BlockDriver, BlockStatus, IoFuture, IoLimits, ReqFlags};
use bytes::Bytes;
use tokio::sync::watch;

use super::conn::{ConnError, Connection, Reply};
use super::negotiate::{negotiate, negotiate_tls, ExportInfo};
use super::status_cache::StatusCache;
use super::{connect, filename, ClientOptions, RawStream, ServerAddr};
use crate::proto::*;

#[derive(Clone)]
enum State {
    /// Serving.
    Connected(Arc<Connection>),
    /// Lost, within reconnect-delay: requests wait.
    Waiting,
    /// Lost, requests fail (the supervisor keeps trying).
    Failing,
    /// Closed.
    Closed,
}

struct Inner {
    server: ServerAddr,
    export: String,
    bitmap: Option<String>,
    tls: Option<crate::tls::ClientTls>,
    delay: Duration,
    state: watch::Sender<State>,
}

/// An `nbd` node.
pub struct NbdDriver {
    inner: Arc<Inner>,
    info: ExportInfo,
    name: String,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// A range known to be data (`base:allocation` only).
    status: StatusCache,
}

impl std::fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDriver")
            .field("file", &self.name)
            .finish()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

async fn connect_once(inner: &Inner) -> Result<Arc<Connection>, String> {
    let raw = connect(&inner.server).await?;
    let (export, bitmap) = (inner.export.as_str(), inner.bitmap.as_deref());
    let (info, r, w) = match (&inner.tls, raw) {
        (None, raw) => {
            let (mut r, mut w) = raw.split();
            let info = {
                let mut s = tokio::io::join(&mut r, &mut w);
                negotiate(&mut s, export, bitmap).await?
            };
            (info, r, w)
        }
        (Some(t), RawStream::Unix(s)) => negotiate_tls(s, t, export, bitmap).await?,
        (Some(t), RawStream::Tcp(s)) => negotiate_tls(s, t, export, bitmap).await?,
    };
    Ok(Connection::start(info, r, w))
}

impl NbdDriver {
    /// Connects (retrying for `open-timeout`), negotiates and starts the
    /// driver. `read_only`/`auto_read_only` are the node's options; the
    /// result says whether the node ends up read-only (QEMU's
    /// `bdrv_apply_auto_read_only` for a read-only export).
    pub async fn open(
        o: ClientOptions,
        read_only: bool,
        auto_read_only: bool,
    ) -> Result<(NbdDriver, bool), String> {
        let (tx, _) = watch::channel(State::Closed);
        let inner = Arc::new(Inner {
            server: o.server,
            export: o.export.clone().unwrap_or_default(),
            bitmap: o.x_dirty_bitmap,
            tls: o.tls,
            delay: o.reconnect_delay,
            state: tx,
        });
        let deadline = tokio::time::Instant::now() + o.open_timeout;
        let conn = loop {
            match connect_once(&inner).await {
                Ok(c) => break c,
                Err(e) => {
                    let fd = matches!(inner.server, ServerAddr::Fd(_));
                    if fd || tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let info = conn.info().clone();
        tracing::debug!(?info, "nbd client: negotiated");
        let mut ro = read_only;
        if info.flags & FLAG_READ_ONLY != 0 && !read_only {
            if !auto_read_only {
                conn.disconnect().await;
                // QEMU: bdrv_apply_auto_read_only fails with -EACCES, which
                // bdrv_open words as below (recorded against QSD 10.0.2).
                return Err("Could not open image: Permission denied".into());
            }
            ro = true;
        }
        inner.state.send_replace(State::Connected(conn.clone()));
        let sup = tokio::spawn(supervise(inner.clone(), conn));
        let name = filename(&inner.server, o.export.as_deref());
        Ok((
            NbdDriver {
                inner,
                info,
                name,
                supervisor: Mutex::new(Some(sup)),
                status: StatusCache::default(),
            },
            ro,
        ))
    }

    /// Runs one request, waiting for a reconnect where QEMU would.
    async fn run(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
        context: u32,
    ) -> io::Result<Reply> {
        let mut rx = self.inner.state.subscribe();
        loop {
            let st = rx.borrow_and_update().clone();
            match st {
                State::Connected(c) if !c.is_dead() => {
                    match c
                        .request(cmd, flags, offset, len, payload.clone(), context)
                        .await
                    {
                        Ok(r) => return Ok(r),
                        Err(ConnError::Server(e)) => return Err(e),
                        Err(ConnError::Lost) if self.inner.delay.is_zero() => return Err(eio()),
                        Err(ConnError::Lost) => {}
                    }
                }
                State::Connected(_) if self.inner.delay.is_zero() => return Err(eio()),
                State::Connected(_) | State::Waiting => {
                    rx.changed().await.map_err(|_| eio())?;
                }
                State::Failing | State::Closed => return Err(eio()),
            }
        }
    }

    fn flag_if(&self, server_flag: u16, cmd_flag: u16, want: bool) -> u16 {
        if want && self.info.flags & server_flag != 0 {
            cmd_flag
        } else {
            0
        }
    }

    /// The largest length one command may carry for trim/zeroes/status.
    fn max_len(&self) -> u64 {
        let a = self.info.min_block.max(1) as u64;
        (1u64 << 31) / a * a
    }
}

/// Watches the connection; when it is lost, lets requests wait for
/// `reconnect-delay`, and reconnects (every second, as QEMU retries
/// with a backoff up to that order).
async fn supervise(inner: Arc<Inner>, mut conn: Arc<Connection>) {
    let first = conn.info().clone();
    loop {
        conn.closed().await;
        if matches!(*inner.state.borrow(), State::Closed) {
            return;
        }
        if matches!(inner.server, ServerAddr::Fd(_)) {
            inner.state.send_replace(State::Failing);
            return;
        }
        if inner.delay.is_zero() {
            inner.state.send_replace(State::Failing);
        } else {
            inner.state.send_replace(State::Waiting);
            let i2 = inner.clone();
            tokio::spawn(async move {
                tokio::time::sleep(i2.delay).await;
                i2.state.send_if_modified(|s| {
                    if matches!(s, State::Waiting) {
                        *s = State::Failing;
                        true
                    } else {
                        false
                    }
                });
            });
        }
        tracing::info!(export = %inner.export, "nbd client: connection lost, reconnecting");
        loop {
            if matches!(*inner.state.borrow(), State::Closed) {
                return;
            }
            match connect_once(&inner).await {
                // The export must still be the one the node was opened on
                // (its size and writability), else keep trying.
                Ok(c)
                    if c.info().size != first.size
                        || (c.info().flags & FLAG_READ_ONLY) > (first.flags & FLAG_READ_ONLY) =>
                {
                    tracing::warn!(
                        export = %inner.export,
                        "nbd client: the server came back with a different export"
                    );
                    c.disconnect().await;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Ok(c) => {
                    conn = c;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "nbd client: reconnect failed");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        let closed = inner.state.send_if_modified(|s| {
            if matches!(s, State::Closed) {
                false
            } else {
                *s = State::Connected(conn.clone());
                true
            }
        });
        if !closed {
            conn.disconnect().await;
            return;
        }
        tracing::info!(export = %inner.export, "nbd client: reconnected");
    }
}

impl BlockDriver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn limits(&self) -> IoLimits {
        let a = self.info.min_block.max(1);
        let max = self.info.max_block.clamp(a, MAX_BUFFER_SIZE);
        IoLimits {
            request_alignment: a,
            max_transfer: max / a * a,
            pwrite_zeroes_alignment: a,
            pdiscard_alignment: a,
        }
    }

    fn length(&self) -> u64 {
        self.info.size
    }

    fn filename(&self) -> Option<String> {
        Some(self.name.clone())
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            if len == 0 {
                return Ok(Bytes::new());
            }
            let r = self.run(CMD_READ, 0, offset, len as u64, None, 0).await?;
            r.data.filter(|d| d.len() == len).ok_or_else(eio)
        })
    }

    fn write(&self, offset: u64, data: Bytes, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.info.flags & FLAG_READ_ONLY != 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let f = self.flag_if(FLAG_SEND_FUA, CMD_FLAG_FUA, flags.fua);
            let len = data.len() as u64;
            self.run(CMD_WRITE, f, offset, len, Some(data), 0).await?;
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.info.flags & FLAG_SEND_WRITE_ZEROES == 0 {
                if flags.no_fallback {
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                let chunk = self.limits().max_transfer.min(1 << 20) as u64;
                let zeroes = Bytes::from(vec![0u8; len.min(chunk) as usize]);
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(chunk);
                    self.write(offset + done, zeroes.slice(..n as usize), flags)
                        .await?;
                    done += n;
                }
                return Ok(());
            }
            let mut f = self.flag_if(FLAG_SEND_FUA, CMD_FLAG_FUA, flags.fua);
            if !flags.may_unmap {
                f |= CMD_FLAG_NO_HOLE;
            }
            if flags.no_fallback {
                if self.info.flags & FLAG_SEND_FAST_ZERO == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                f |= CMD_FLAG_FAST_ZERO;
            }
            self.status.invalidate(offset, len);
            let mut done = 0;
            let r = async {
                while done < len {
                    let n = (len - done).min(self.max_len());
                    self.run(CMD_WRITE_ZEROES, f, offset + done, n, None, 0)
                        .await?;
                    done += n;
                }
                Ok(())
            }
            .await;
            // A status request in flight meanwhile may have filled it.
            self.status.invalidate(offset, len);
            r
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.info.flags & FLAG_SEND_TRIM == 0 {
                return Ok(());
            }
            self.status.invalidate(offset, len);
            let mut done = 0;
            let r = async {
                while done < len {
                    let n = (len - done).min(self.max_len());
                    self.run(CMD_TRIM, 0, offset + done, n, None, 0).await?;
                    done += n;
                }
                Ok(())
            }
            .await;
            self.status.invalidate(offset, len);
            r
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.info.flags & FLAG_SEND_FLUSH == 0 {
                return Ok(());
            }
            self.run(CMD_FLUSH, 0, 0, 0, None, 0).await?;
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let ctx = match (&self.inner.bitmap, self.info.dirty_bitmap) {
                (Some(_), Some(id)) => Some(id),
                _ => self.info.base_allocation,
            };
            let Some(ctx) = ctx else {
                return Ok(BlockStatus {
                    len,
                    data: true,
                    zero: false,
                    allocated: true,
                });
            };
            let n = len.min(self.max_len());
            // base:allocation: answered from the cache, or asked about the
            // rest of the export (see `status_cache`).
            let cache = self.inner.bitmap.is_none();
            if cache {
                if let Some(d) = self.status.data_at(offset, n) {
                    return Ok(BlockStatus {
                        len: d,
                        data: true,
                        zero: false,
                        allocated: true,
                    });
                }
            }
            let ask = if cache {
                self.info
                    .size
                    .saturating_sub(offset)
                    .min(self.max_len())
                    .max(n)
            } else {
                n
            };
            let r = self
                .run(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, ask, None, ctx)
                .await?;
            let Some(&(elen, flags)) = r.extents.first() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "server did not reply with any status extents",
                ));
            };
            if elen == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "server sent an empty status extent",
                ));
            }
            let data = flags & STATE_HOLE == 0;
            let zero = flags & STATE_ZERO != 0;
            if cache && data && !zero {
                self.status.fill(offset, elen.min(ask));
            }
            let mut len = elen.min(n);
            let mut allocated = data || zero;
            // qemu:allocation-depth, when negotiated: depth 0 is a range
            // no layer of the server's chain allocates (data there would
            // be a server's bug: base:allocation wins then).
            let depth = self.info.allocation_depth.filter(|_| cache);
            if let Some(&(dlen, d)) = depth.and_then(|id| first_extent(&r.others, id)) {
                if dlen > 0 {
                    len = len.min(dlen);
                    allocated = d != 0 || data;
                }
            }
            Ok(BlockStatus {
                len,
                data,
                zero,
                allocated,
            })
        })
    }

    /// QEMU's `nbd_client_reopen_prepare`: a read-only export stays
    /// read-only.
    fn reopen_prepare<'a>(
        &'a self,
        req: &'a blockd_core::reopen::ReopenRequest<'a>,
    ) -> blockd_core::driver::PrepareFuture<'a> {
        Box::pin(async move {
            if !req.new.read_only && self.info.flags & FLAG_READ_ONLY != 0 {
                return Err(blockd_core::BlockError::new(
                    blockd_core::ErrorKind::PermissionConflict,
                    "Can't reopen read-only NBD mount as read/write",
                ));
            }
            Ok(Box::new(()) as blockd_core::Staged)
        })
    }

    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let prev = self.shut_down();
            if let State::Connected(c) = prev {
                if c.info().flags & FLAG_SEND_FLUSH != 0 && !c.is_dead() {
                    let _ = c.request(CMD_FLUSH, 0, 0, 0, None, 0).await;
                }
                c.disconnect().await;
            }
            Ok(())
        })
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl NbdDriver {
    /// Marks the driver closed and stops the reconnect supervisor;
    /// returns the state it was in.
    fn shut_down(&self) -> State {
        let prev = self.inner.state.send_replace(State::Closed);
        if let Some(s) = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.abort();
        }
        prev
    }
}

/// The first extent a reply carries for context `id`.
fn first_extent(others: &[(u32, Vec<(u64, u32)>)], id: u32) -> Option<&(u64, u32)> {
    others.iter().find(|o| o.0 == id).and_then(|o| o.1.first())
}
