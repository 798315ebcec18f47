//! Running requests and building their replies (QEMU's
//! `nbd_handle_request` and the reply helpers around it).
//!
//! Each request runs on its own task; its replies go to the client's
//! writer in order, and the reply that completes it carries its permits.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc::UnboundedSender;

use crate::export::ClientGuard;
use crate::handshake::{Contexts, Negotiated};
use crate::proto::*;
use crate::reply::{Mode, Permits, Reply};
use crate::ExportIo;
use blockd_core::dirty::NamedBitmap;

/// A parsed, checked request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub ty: u16,
    /// The client's cookie.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length (payload length for writes).
    pub len: u64,
    /// Contexts to report (block status).
    pub contexts: Contexts,
}

/// A failed request: the NBD error and a message for structured replies.
#[derive(Debug)]
pub(crate) struct Failure {
    /// NBD error number.
    pub error: u32,
    /// Human-readable text.
    pub msg: String,
}

impl Failure {
    fn io(what: &str, e: &io::Error) -> Failure {
        Failure {
            error: io_error_to_nbd(e),
            msg: format!("{what}: {e}"),
        }
    }
}

/// What every request task of one connection shares.
pub(crate) struct Conn {
    /// Keeps the client attached to its export while anything runs.
    guard: ClientGuard,
    /// Reply style.
    pub mode: Mode,
    /// Contexts negotiated with `NBD_OPT_SET_META_CONTEXT`.
    pub contexts: Contexts,
    /// Export size.
    pub size: u64,
    /// Whether the export accepts writes.
    pub writable: bool,
    tx: UnboundedSender<Reply>,
}

impl Conn {
    /// The state of a newly negotiated client, replying through `tx`.
    pub fn new(neg: Negotiated, tx: UnboundedSender<Reply>) -> Conn {
        let exp = neg.guard.export();
        Conn {
            size: exp.size(),
            writable: exp.writable(),
            mode: neg.mode,
            contexts: neg.contexts,
            guard: neg.guard,
            tx,
        }
    }

    fn io(&self) -> &dyn ExportIo {
        &*self.guard.export().io
    }

    fn send(&self, r: Reply) {
        // The writer is gone only when the connection is being torn down.
        let _ = self.tx.send(r);
    }

    fn chunk(&self, req: &Request, flags: u16, ty: u16, prefix: &[u8], payload: Bytes) -> Reply {
        Reply::chunk(
            self.mode, req.cookie, req.offset, flags, ty, prefix, payload,
        )
    }

    /// Sends a final error chunk.
    fn error_chunk(&self, req: &Request, f: Failure, permits: Option<Permits>) {
        let mut msg = f.msg.into_bytes();
        msg.truncate(MAX_STRING_SIZE);
        let mut prefix = [0u8; 6];
        prefix[..4].copy_from_slice(&f.error.to_be_bytes());
        prefix[4..].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        let r = self.chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &prefix, msg.into());
        self.send(r.with_permits(permits));
    }

    /// The reply of a request without data (QEMU's `nbd_send_generic_reply`):
    /// errors as structured error chunks when structured replies are on,
    /// success as a `NONE` chunk with extended headers, else simple replies.
    pub fn generic(&self, req: &Request, res: Result<(), Failure>, permits: Option<Permits>) {
        match res {
            Err(f) if self.mode >= Mode::Structured => self.error_chunk(req, f, permits),
            Ok(()) if self.mode == Mode::Extended => {
                let r = self.chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[], Bytes::new());
                self.send(r.with_permits(permits));
            }
            res => {
                let error = res.err().map_or(0, |f| f.error);
                let r = Reply::simple(req.cookie, error, Bytes::new());
                self.send(r.with_permits(permits));
            }
        }
    }
}

/// Bytes to reserve for the extents of a block status reply.
pub(crate) fn extents_budget(req: &Request, ext: bool) -> u64 {
    let per_ctx = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_BLOCK_STATUS_EXTENTS as u64
    };
    let size = if ext { 16 } else { 8 };
    req.contexts.count() as u64 * per_ctx * size
}

/// Runs a checked request and sends its reply.
pub(crate) async fn run(conn: Arc<Conn>, req: Request, data: Bytes, permits: Option<Permits>) {
    let c = &*conn;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let res = match req.ty {
        CMD_READ => return read(c, &req, permits).await,
        CMD_BLOCK_STATUS => return block_status(c, &req, permits).await,
        CMD_WRITE => c
            .io()
            .write(req.offset, data, fua)
            .await
            .map_err(|e| Failure::io("writing to file failed", &e)),
        CMD_WRITE_ZEROES => {
            let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            c.io()
                .write_zeroes(req.offset, req.len, may_unmap, fast, fua)
                .await
                .map_err(|e| Failure::io("writing to file failed", &e))
        }
        CMD_FLUSH => c
            .io()
            .flush()
            .await
            .map_err(|e| Failure::io("flush failed", &e)),
        CMD_TRIM => {
            let mut r = c.io().discard(req.offset, req.len).await;
            if r.is_ok() && fua {
                r = c.io().flush().await;
            }
            r.map_err(|e| Failure::io("discard failed", &e))
        }
        CMD_CACHE => c
            .io()
            .cache(req.offset, req.len)
            .await
            .map_err(|e| Failure::io("caching data failed", &e)),
        ty => Err(Failure {
            error: NBD_EINVAL,
            msg: format!("invalid request type ({ty}) received"),
        }),
    };
    c.generic(&req, res, permits);
}

/// Reads `len` bytes, insisting on the length.
async fn read_exact(c: &Conn, offset: u64, len: usize) -> Result<Bytes, Failure> {
    match c.io().read(offset, len).await {
        Ok(d) if d.len() == len => Ok(d),
        Ok(d) => Err(Failure {
            error: NBD_EIO,
            msg: format!("reading from file failed: got {} of {len} bytes", d.len()),
        }),
        Err(e) => Err(Failure::io("reading from file failed", &e)),
    }
}

/// `NBD_CMD_READ`. With structured replies and without `DF`, zero ranges
/// are sent as `OFFSET_HOLE` chunks (QEMU's sparse read).
async fn read(c: &Conn, req: &Request, permits: Option<Permits>) {
    // QEMU flushes first when a read asks for FUA.
    if req.flags & CMD_FLAG_FUA != 0 {
        if let Err(e) = c.io().flush().await {
            return c.generic(req, Err(Failure::io("flush failed", &e)), permits);
        }
    }
    if c.mode >= Mode::Structured && req.flags & CMD_FLAG_DF == 0 && req.len > 0 {
        return sparse_read(c, req, permits).await;
    }
    let data = match read_exact(c, req.offset, req.len as usize).await {
        Ok(d) => d,
        Err(f) => return c.generic(req, Err(f), permits),
    };
    let r = if c.mode >= Mode::Structured {
        if data.is_empty() {
            c.chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[], Bytes::new())
        } else {
            let prefix = req.offset.to_be_bytes();
            c.chunk(req, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &prefix, data)
        }
    } else {
        Reply::simple(req.cookie, 0, data)
    };
    c.send(r.with_permits(permits));
}

async fn sparse_read(c: &Conn, req: &Request, mut permits: Option<Permits>) {
    let mut done = 0u64;
    while done < req.len {
        let off = req.offset + done;
        let left = req.len - done;
        let st = match c.io().block_status(off, left).await {
            Ok(s) if s.len > 0 => s,
            Ok(_) => {
                let f = Failure {
                    error: NBD_EIO,
                    msg: "unable to check for holes: empty extent".into(),
                };
                return c.error_chunk(req, f, permits);
            }
            Err(e) => {
                return c.error_chunk(req, Failure::io("unable to check for holes", &e), permits)
            }
        };
        let n = st.len.min(left);
        let last = done + n == req.len;
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let r = if st.zero {
            let mut prefix = [0u8; 12];
            prefix[..8].copy_from_slice(&off.to_be_bytes());
            prefix[8..].copy_from_slice(&(n as u32).to_be_bytes());
            c.chunk(req, flags, REPLY_TYPE_OFFSET_HOLE, &prefix, Bytes::new())
        } else {
            // Unlike QEMU, which drops the connection here, report it.
            let data = match read_exact(c, off, n as usize).await {
                Ok(d) => d,
                Err(f) => return c.error_chunk(req, f, permits),
            };
            c.chunk(req, flags, REPLY_TYPE_OFFSET_DATA, &off.to_be_bytes(), data)
        };
        let p = if last { permits.take() } else { None };
        c.send(r.with_permits(p));
        done += n;
    }
}

/// Extents of one context, merged as QEMU's `nbd_extent_array_add` does.
struct Extents {
    list: Vec<(u64, u32)>,
    max: usize,
    ext: bool,
}

impl Extents {
    /// Adds an extent; false when the array is full.
    fn add(&mut self, len: u64, flags: u32) -> bool {
        if len == 0 {
            return true;
        }
        if let Some(last) = self.list.last_mut() {
            let sum = last.0 + len;
            if last.1 == flags && (self.ext || sum <= u32::MAX as u64) {
                last.0 = sum;
                return true;
            }
        }
        if self.list.len() >= self.max {
            return false;
        }
        self.list.push((len, flags));
        true
    }

    /// The chunk payload after the context id (and count).
    fn encode(&self) -> Bytes {
        let size = if self.ext { 16 } else { 8 };
        let mut b = BytesMut::with_capacity(self.list.len() * size);
        for &(len, flags) in &self.list {
            if self.ext {
                b.put_u64(len);
                b.put_u64(flags as u64);
            } else {
                b.put_u32(len as u32);
                b.put_u32(flags);
            }
        }
        b.freeze()
    }
}

/// Collects the extents of one context over the request's range.
async fn collect(c: &Conn, req: &Request, id: u32) -> io::Result<Extents> {
    let mut ex = Extents {
        list: Vec::new(),
        max: if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_BLOCK_STATUS_EXTENTS
        },
        ext: c.mode == Mode::Extended,
    };
    if id >= META_ID_DIRTY_BITMAP {
        let i = (id - META_ID_DIRTY_BITMAP) as usize;
        let bm = c.guard.export().bitmaps[i].clone();
        bitmap_extents(&bm, req.offset, req.len, &mut ex);
        return Ok(ex);
    }
    let (mut off, mut left) = (req.offset, req.len);
    while left > 0 {
        let (n, flags) = if id == META_ID_BASE_ALLOCATION {
            let s = c.io().block_status(off, left).await?;
            let flags = if s.data { 0 } else { STATE_HOLE } | if s.zero { STATE_ZERO } else { 0 };
            (s.len, flags)
        } else {
            c.io().allocation_depth(off, left).await?
        };
        let n = n.min(left);
        if n == 0 {
            return Err(io::Error::other("empty extent"));
        }
        if !ex.add(n, flags) {
            break;
        }
        off += n;
        left -= n;
    }
    Ok(ex)
}

/// The extents of a dirty bitmap over `[offset, offset + len)` (QEMU's
/// `bitmap_to_extents`): clean runs with flags 0, dirty ones with
/// [`STATE_DIRTY`], up to the array's capacity.
fn bitmap_extents(bm: &NamedBitmap, offset: u64, len: u64, ex: &mut Extents) {
    let end = offset + len;
    let mut start = offset;
    while start < end {
        let Some((s, n)) = bm.bits().next_dirty_run(start, u64::MAX) else {
            break;
        };
        let (ds, de) = (s.max(start), (s + n).min(end));
        if ds >= end {
            break;
        }
        if !ex.add(ds - start, 0) || !ex.add(de - ds, STATE_DIRTY) {
            return;
        }
        start = de;
    }
    ex.add(end - start, 0);
}

/// `NBD_CMD_BLOCK_STATUS`: one chunk per chosen context, the last one final.
async fn block_status(c: &Conn, req: &Request, mut permits: Option<Permits>) {
    if req.contexts.count() == 0 {
        let msg = if c.contexts.count() > 0 {
            "CMD_BLOCK_STATUS payload not valid"
        } else {
            "CMD_BLOCK_STATUS not negotiated"
        };
        let f = Failure {
            error: NBD_EINVAL,
            msg: msg.into(),
        };
        return c.generic(req, Err(f), permits);
    }
    if req.len == 0 {
        let f = Failure {
            error: NBD_EINVAL,
            msg: "need non-zero length".into(),
        };
        return c.generic(req, Err(f), permits);
    }
    let mut ids = Vec::with_capacity(2);
    if req.contexts.base {
        ids.push(META_ID_BASE_ALLOCATION);
    }
    if req.contexts.depth {
        ids.push(META_ID_ALLOCATION_DEPTH);
    }
    ids.extend(
        req.contexts
            .bitmap_indexes()
            .map(|i| META_ID_DIRTY_BITMAP + i as u32),
    );
    for (i, &id) in ids.iter().enumerate() {
        let last = i + 1 == ids.len();
        let ex = match collect(c, req, id).await {
            Ok(ex) => ex,
            Err(e) => {
                let f = Failure::io("can't get block status", &e);
                return c.error_chunk(req, f, permits);
            }
        };
        let mut prefix = [0u8; 8];
        prefix[..4].copy_from_slice(&id.to_be_bytes());
        let (ty, plen) = if ex.ext {
            prefix[4..].copy_from_slice(&(ex.list.len() as u32).to_be_bytes());
            (REPLY_TYPE_BLOCK_STATUS_EXT, 8)
        } else {
            (REPLY_TYPE_BLOCK_STATUS, 4)
        };
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let r = c.chunk(req, flags, ty, &prefix[..plen], ex.encode());
        let p = if last { permits.take() } else { None };
        c.send(r.with_permits(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_within_32_bits() {
        let mut ex = Extents {
            list: Vec::new(),
            max: 2,
            ext: false,
        };
        assert!(ex.add(u32::MAX as u64 - 10, 0));
        assert!(ex.add(10, 0));
        assert_eq!(ex.list, vec![(u32::MAX as u64, 0)]);
        assert!(ex.add(1, 0));
        assert_eq!(ex.list.len(), 2);
        assert!(!ex.add(5, 3));
        assert!(ex.add(0, 3));
        let mut ex = Extents {
            list: Vec::new(),
            max: 1,
            ext: true,
        };
        assert!(ex.add(u32::MAX as u64, 1));
        assert!(ex.add(u32::MAX as u64, 1));
        assert_eq!(ex.list, vec![(2 * u32::MAX as u64, 1)]);
        assert_eq!(ex.encode().len(), 16);
    }
}
