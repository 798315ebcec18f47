//! One negotiated connection in transmission phase (QEMU's
//! `nbd_co_send_request` / `nbd_receive_replies` in block/nbd.c): any
//! number of callers send requests, each with its own cookie; one reader
//! task reads replies and hands each to the request that waits for it, so
//! many requests are in flight at once.
//!
//! Requests go out through one writer task, which sends every request
//! queued meanwhile in one vectored write: at depth 16 a syscall carries
//! several requests (QEMU sends each under its send mutex, with the
//! socket corked). A caller that gives up after queueing its request does
//! not cut a frame in half, as it would if it wrote itself.
//!
//! At most [`MAX_REQUESTS`] requests are in flight on a connection (QEMU's
//! `MAX_NBD_REQUESTS`, 16): a request beyond that waits until one of them
//! has its reply (`nbd_co_send_request` waits on `free_sema`).
//!
//! When the connection breaks (or the server breaks the protocol), every
//! waiting request fails with [`ConnError::Lost`] and so does every later
//! one; the caller decides whether to reconnect.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use super::negotiate::ExportInfo;
use crate::proto::*;

/// Boxed read half.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// Boxed write half.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Why a request failed.
#[derive(Debug)]
pub enum ConnError {
    /// The server answered with an error (an errno).
    Server(io::Error),
    /// The connection is gone; the request may be retried on a new one.
    Lost,
}

/// A request's answer.
#[derive(Debug, Default)]
pub struct Reply {
    /// Read data (`NBD_CMD_READ`).
    pub data: Option<Bytes>,
    /// Block status extents of the context asked for: (length, flags).
    pub extents: Vec<(u64, u32)>,
    /// Block status extents of the other contexts the server replied
    /// for (every negotiated one: NBD_CMD_BLOCK_STATUS cannot choose),
    /// by context id.
    pub others: Vec<(u32, Vec<(u64, u32)>)>,
}

struct Pending {
    cmd: u16,
    offset: u64,
    len: u64,
    buf: Option<BytesMut>,
    context: u32,
    extents: Vec<(u64, u32)>,
    others: Vec<(u32, Vec<(u64, u32)>)>,
    error: Option<i32>,
    tx: oneshot::Sender<Result<Reply, ConnError>>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
    died: Notify,
}

impl Shared {
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let all: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in all {
            let _ = p.tx.send(Err(ConnError::Lost));
        }
        self.died.notify_waiters();
    }
}

/// Requests in flight on one connection at most (QEMU's
/// `MAX_NBD_REQUESTS`).
pub const MAX_REQUESTS: usize = 16;

/// A connection in transmission phase.
pub struct Connection {
    info: ExportInfo,
    /// One permit per request in flight.
    slots: Semaphore,
    /// To the writer task.
    frames: mpsc::UnboundedSender<Frame>,
    shared: Arc<Shared>,
    next_cookie: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

/// What the writer task sends.
enum Frame {
    /// A request: its header and, for a write, its data.
    Request {
        head: [u8; 32],
        len: usize,
        payload: Option<Bytes>,
    },
    /// `NBD_CMD_DISC`'s header, then the write half is shut down; the
    /// sender learns when that is done.
    Disconnect {
        head: [u8; 32],
        len: usize,
        done: oneshot::Sender<()>,
    },
}

/// Most frames one write carries.
const BATCH: usize = 32;

/// The writer task: waits for a frame, takes every frame queued
/// meanwhile, and writes them all with vectored writes.
async fn write_loop(mut w: WriteHalf, mut rx: mpsc::UnboundedReceiver<Frame>, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for f in &batch {
            match f {
                Frame::Request { head, len, payload } => {
                    slices.push(io::IoSlice::new(&head[..*len]));
                    if let Some(p) = payload {
                        slices.push(io::IoSlice::new(p));
                    }
                }
                Frame::Disconnect { head, len, .. } => slices.push(io::IoSlice::new(&head[..*len])),
            }
        }
        let sent = async {
            write_all_vectored(&mut w, &mut slices).await?;
            w.flush().await
        }
        .await;
        drop(slices);
        if let Err(e) = sent {
            tracing::debug!(error = %e, "nbd client: send failed");
            shared.kill();
            return;
        }
        for f in batch.drain(..) {
            if let Frame::Disconnect { done, .. } = f {
                let _ = w.shutdown().await;
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Writes every byte of `slices` (`write_all` for vectored writes).
async fn write_all_vectored(
    w: &mut WriteHalf,
    mut slices: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// NBD errors to errnos (QEMU's `nbd_errno_to_system_errno`).
fn nbd_to_errno(e: u32) -> i32 {
    match e {
        NBD_EPERM => libc::EPERM,
        NBD_EIO => libc::EIO,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::ENOTSUP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

impl Connection {
    /// Starts transmission on a negotiated connection.
    pub fn start(info: ExportInfo, r: ReadHalf, w: WriteHalf) -> Arc<Connection> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            died: Notify::new(),
        });
        let (frames, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(w, rx, shared.clone()));
        let s2 = shared.clone();
        let reader = tokio::spawn(async move {
            // Reply headers are small reads: buffer them.
            let r: ReadHalf = Box::new(tokio::io::BufReader::with_capacity(256 << 10, r));
            let res = read_loop(r, &s2).await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "nbd client: connection lost");
            }
            s2.kill();
        });
        Arc::new(Connection {
            info,
            slots: Semaphore::new(MAX_REQUESTS),
            frames,
            shared,
            next_cookie: AtomicU64::new(1),
            reader,
            writer,
        })
    }

    /// The export as negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether the connection is gone.
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Waits until the connection is gone.
    pub async fn closed(&self) {
        loop {
            let n = self.shared.died.notified();
            if self.is_dead() {
                return;
            }
            n.await;
        }
    }

    /// Sends one request and waits for its reply. `context` is the meta
    /// context whose extents a block status request returns.
    pub async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
        context: u32,
    ) -> Result<Reply, ConnError> {
        if self.is_dead() {
            return Err(ConnError::Lost);
        }
        // Held until the reply is in (or the connection is gone).
        let _slot = match self.slots.try_acquire() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = self.slots.acquire() => p.map_err(|_| ConnError::Lost)?,
                _ = self.closed() => return Err(ConnError::Lost),
            },
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Filled as data arrives (see `fill_at`); not zeroed up front.
        let buf = (cmd == CMD_READ).then(|| BytesMut::with_capacity(len as usize));
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                cookie,
                Pending {
                    cmd,
                    offset,
                    len,
                    buf,
                    context,
                    extents: Vec::new(),
                    others: Vec::new(),
                    error: None,
                    tx,
                },
            );
        // The reader may have died between the check and the insert.
        if self.is_dead() {
            self.shared.kill();
        }
        let (head, len) = header(self.info.extended, flags, cmd, cookie, offset, len);
        if self
            .frames
            .send(Frame::Request { head, len, payload })
            .is_err()
        {
            // The writer is gone: so is the connection.
            self.reader.abort();
            self.shared.kill();
        }
        rx.await.unwrap_or(Err(ConnError::Lost))
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub async fn disconnect(&self) {
        if !self.is_dead() {
            let (head, len) = header(self.info.extended, 0, CMD_DISC, 0, 0, 0);
            let (done, sent) = oneshot::channel();
            if self
                .frames
                .send(Frame::Disconnect { head, len, done })
                .is_ok()
            {
                let _ = sent.await;
            }
            // The server closes its end after NBD_CMD_DISC: wait for that
            // (briefly), so that the server has let the client go when the
            // node's removal returns.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.closed()).await;
        }
        self.reader.abort();
        self.shared.kill();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A request header, compact (28 bytes) or extended (32 bytes).
fn header(
    ext: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> ([u8; 32], usize) {
    let mut h = [0u8; 32];
    let magic = if ext {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    h[0..4].copy_from_slice(&magic.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    if ext {
        h[24..32].copy_from_slice(&len.to_be_bytes());
        (h, 32)
    } else {
        h[24..28].copy_from_slice(&(len as u32).to_be_bytes());
        (h, 28)
    }
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn take(shared: &Shared, cookie: u64) -> io::Result<Pending> {
    shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&cookie)
        .ok_or_else(|| proto_err(format!("unexpected cookie {cookie:#x}")))
}

fn put(shared: &Shared, cookie: u64, p: Pending) {
    shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(cookie, p);
}

impl Pending {
    /// Keeps a block status chunk: the asked context's extents, or
    /// another context's (the last chunk of an id wins).
    fn status_chunk(&mut self, id: u32, ext: Vec<(u64, u32)>) {
        if id == self.context {
            self.extents = ext;
        } else if let Some(o) = self.others.iter_mut().find(|o| o.0 == id) {
            o.1 = ext;
        } else if self.others.len() < 8 {
            self.others.push((id, ext));
        }
    }
}

fn finish(p: Pending) {
    let r = match p.error {
        Some(e) => Err(ConnError::Server(io::Error::from_raw_os_error(e))),
        None => Ok(Reply {
            data: p.buf.map(|mut b| {
                // What no chunk covered is a hole: zeroes.
                b.resize(p.len as usize, 0);
                b.freeze()
            }),
            extents: p.extents,
            others: p.others,
        }),
    };
    let _ = p.tx.send(r);
}

async fn read_loop(mut r: ReadHalf, shared: &Shared) -> io::Result<()> {
    loop {
        let magic = r.read_u32().await?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let err = r.read_u32().await?;
                let cookie = r.read_u64().await?;
                let mut p = take(shared, cookie)?;
                if err != 0 {
                    p.error = Some(nbd_to_errno(err));
                    p.buf = None;
                } else if let Some(b) = p.buf.as_mut() {
                    fill_at(&mut r, b, 0, p.len as usize).await?;
                }
                finish(p);
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let flags = r.read_u16().await?;
                let ty = r.read_u16().await?;
                let cookie = r.read_u64().await?;
                let len = if magic == EXTENDED_REPLY_MAGIC {
                    let _offset = r.read_u64().await?;
                    let l = r.read_u64().await?;
                    if l > u32::MAX as u64 {
                        return Err(proto_err(format!("server sent a {l}-byte chunk")));
                    }
                    l as usize
                } else {
                    r.read_u32().await? as usize
                };
                let mut p = take(shared, cookie)?;
                // Data chunks are bounded by the request; anything else
                // this large is a broken server (QEMU's limit).
                if ty != REPLY_TYPE_OFFSET_DATA && len > MAX_BUFFER_SIZE as usize {
                    return Err(proto_err(format!("server sent a {len}-byte chunk")));
                }
                chunk(&mut r, &mut p, ty, len).await?;
                if flags & REPLY_FLAG_DONE != 0 {
                    finish(p);
                } else {
                    put(shared, cookie, p);
                }
            }
            m => return Err(proto_err(format!("invalid reply magic {m:#x}"))),
        }
    }
}

/// Reads `n` bytes from `r` into `b[at..at + n]`. `b` holds what earlier
/// chunks filled; data that continues it (the usual case: one chunk, or
/// chunks in order) is read into its spare capacity without zeroing it
/// first; a gap before `at` is zeroed (a hole, or a chunk still to come,
/// which overwrites it).
async fn fill_at(r: &mut ReadHalf, b: &mut BytesMut, at: usize, n: usize) -> io::Result<()> {
    if at > b.len() {
        b.resize(at, 0);
    }
    let end = at + n;
    let inside = end.min(b.len());
    if at < inside {
        r.read_exact(&mut b[at..inside]).await?;
    }
    while b.len() < end {
        let want = end - b.len();
        let got = r.read_buf(&mut (&mut *b).limit(want)).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Reads one structured chunk's payload into the request it answers.
async fn chunk(r: &mut ReadHalf, p: &mut Pending, ty: u16, len: usize) -> io::Result<()> {
    match ty {
        REPLY_TYPE_NONE if len == 0 => Ok(()),
        REPLY_TYPE_OFFSET_DATA if p.cmd == CMD_READ && len >= 8 => {
            let off = r.read_u64().await?;
            let n = (len - 8) as u64;
            if off < p.offset || off + n > p.offset + p.len {
                return Err(proto_err("server sent data outside the request"));
            }
            let s = (off - p.offset) as usize;
            let b = p.buf.as_mut().expect("read buffer");
            fill_at(r, b, s, n as usize).await
        }
        REPLY_TYPE_OFFSET_HOLE if p.cmd == CMD_READ && len == 12 => {
            let off = r.read_u64().await?;
            let n = r.read_u32().await? as u64;
            if off < p.offset || off + n > p.offset + p.len {
                return Err(proto_err("server sent a hole outside the request"));
            }
            // Past what is filled, the final resize zeroes it.
            let b = p.buf.as_mut().expect("read buffer");
            let s = (off - p.offset) as usize;
            let e = (s + n as usize).min(b.len());
            if s < e {
                b[s..e].fill(0);
            }
            Ok(())
        }
        REPLY_TYPE_BLOCK_STATUS if p.cmd == CMD_BLOCK_STATUS && len >= 12 && (len - 4) % 8 == 0 => {
            let id = r.read_u32().await?;
            let mut ext = Vec::with_capacity((len - 4) / 8);
            for _ in 0..(len - 4) / 8 {
                let l = r.read_u32().await? as u64;
                let f = r.read_u32().await?;
                ext.push((l, f));
            }
            p.status_chunk(id, ext);
            Ok(())
        }
        REPLY_TYPE_BLOCK_STATUS_EXT
            if p.cmd == CMD_BLOCK_STATUS && len >= 24 && (len - 8) % 16 == 0 =>
        {
            let id = r.read_u32().await?;
            let _count = r.read_u32().await?;
            let mut ext = Vec::with_capacity((len - 8) / 16);
            for _ in 0..(len - 8) / 16 {
                let l = r.read_u64().await?;
                let f = r.read_u64().await?;
                ext.push((l, f as u32));
            }
            p.status_chunk(id, ext);
            Ok(())
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if len >= 6 => {
            let mut d = vec![0u8; len];
            r.read_exact(&mut d).await?;
            let e = u32::from_be_bytes(d[0..4].try_into().unwrap());
            let msglen = u16::from_be_bytes([d[4], d[5]]) as usize;
            if 6 + msglen > len {
                return Err(proto_err("invalid error chunk"));
            }
            if msglen > 0 {
                tracing::debug!(
                    msg = %String::from_utf8_lossy(&d[6..6 + msglen]),
                    "nbd client: server error"
                );
            }
            p.error.get_or_insert(nbd_to_errno(e));
            Ok(())
        }
        t if t & (1 << 15) != 0 => {
            // Unknown error chunk type: an error all the same.
            let mut d = vec![0u8; len];
            r.read_exact(&mut d).await?;
            p.error.get_or_insert(libc::EINVAL);
            Ok(())
        }
        _ => Err(proto_err(format!(
            "unexpected reply chunk type {ty} of length {len} for {}",
            cmd_name(p.cmd)
        ))),
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
