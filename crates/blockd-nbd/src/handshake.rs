//! Option haggling: the fixed newstyle handshake up to the transmission
//! phase, with QEMU's choices for replies, error codes and limits.
//!
//! Options are parsed as they are read, tracking the bytes left in the
//! option (QEMU's `optlen`), so a client can make the server allocate at
//! most one string of [`MAX_STRING_SIZE`] bytes at a time. An option whose
//! contents do not add up is answered with `NBD_REP_ERR_INVALID` after its
//! remaining bytes are dropped; an option longer than [`MAX_BUFFER_SIZE`]
//! ends the connection, as in QEMU.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{ClientGuard, Export};
use crate::proto::*;
use crate::reply::Mode;
use crate::server::Shared;

/// Metadata contexts chosen for a request: which of the export's
/// contexts to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Contexts {
    /// `base:allocation`.
    pub base: bool,
    /// `qemu:allocation-depth`.
    pub depth: bool,
    /// `qemu:dirty-bitmap:NAME`: bit i for the export's i-th bitmap.
    pub bitmaps: u64,
}

impl Contexts {
    /// How many contexts are chosen.
    pub fn count(self) -> usize {
        self.base as usize + self.depth as usize + self.bitmaps.count_ones() as usize
    }

    /// The chosen bitmaps' indexes, in order.
    pub fn bitmap_indexes(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.bitmaps & (1 << i) != 0)
    }
}

/// The outcome of a successful negotiation.
pub(crate) struct Negotiated {
    /// The attached export.
    pub guard: ClientGuard,
    /// The reply style.
    pub mode: Mode,
    /// The contexts `NBD_OPT_SET_META_CONTEXT` selected on this export.
    pub contexts: Contexts,
}

/// Contexts selected by `NBD_OPT_SET_META_CONTEXT` (QEMU's `NBDMetaContexts`).
#[derive(Default)]
struct MetaState {
    export: Option<Arc<Export>>,
    sel: Contexts,
    count: usize,
}

/// How an option ended other than normally.
enum OptFail {
    /// Drop the rest of the option, answer with this error, go on.
    Reply(u32, String),
    /// End the connection.
    Fatal(io::Error),
}

impl From<io::Error> for OptFail {
    fn from(e: io::Error) -> Self {
        OptFail::Fatal(e)
    }
}

enum Step {
    Continue,
    Go(Negotiated),
    Abort,
}

pub(crate) fn fatal(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Cuts a client-supplied name for an error message (QEMU's `nbd_sanitize_name`).
fn sanitize(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    if s.chars().count() < 80 {
        s.into_owned()
    } else {
        format!("{}...", s.chars().take(80).collect::<String>())
    }
}

/// The unread part of the current option.
struct Opt<'a, R> {
    r: &'a mut R,
    code: u32,
    left: u32,
}

impl<R: AsyncRead + Unpin> Opt<'_, R> {
    fn inconsistent(&self) -> OptFail {
        OptFail::Reply(
            REP_ERR_INVALID,
            format!("Inconsistent lengths in option {}", opt_name(self.code)),
        )
    }

    fn unexpected_length(&self) -> OptFail {
        OptFail::Reply(
            REP_ERR_INVALID,
            format!("option '{}' has unexpected length", opt_name(self.code)),
        )
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<(), OptFail> {
        if buf.len() > self.left as usize {
            return Err(self.inconsistent());
        }
        self.left -= buf.len() as u32;
        self.r.read_exact(buf).await?;
        Ok(())
    }

    async fn read_u16(&mut self) -> Result<u16, OptFail> {
        let mut b = [0u8; 2];
        self.read(&mut b).await?;
        Ok(u16::from_be_bytes(b))
    }

    async fn read_u32(&mut self) -> Result<u32, OptFail> {
        let mut b = [0u8; 4];
        self.read(&mut b).await?;
        Ok(u32::from_be_bytes(b))
    }

    /// Reads `len` bytes of string, refusing embedded NULs.
    async fn read_str(&mut self, len: u32) -> Result<Vec<u8>, OptFail> {
        if len > self.left {
            return Err(self.inconsistent());
        }
        let mut v = vec![0u8; len as usize];
        self.read(&mut v).await?;
        if v.contains(&0) {
            return Err(OptFail::Reply(
                REP_ERR_INVALID,
                format!("Unexpected embedded NUL in option {}", opt_name(self.code)),
            ));
        }
        Ok(v)
    }

    /// Reads a 32-bit length and a name of at most [`MAX_STRING_SIZE`] bytes.
    async fn read_name(&mut self) -> Result<Vec<u8>, OptFail> {
        let len = self.read_u32().await?;
        if len as usize > MAX_STRING_SIZE {
            return Err(OptFail::Reply(
                REP_ERR_INVALID,
                format!("Invalid name length: {len}"),
            ));
        }
        self.read_str(len).await
    }

    async fn skip(&mut self, n: u32) -> Result<(), OptFail> {
        if n > self.left {
            return Err(self.inconsistent());
        }
        self.left -= n;
        drain(self.r, n as u64).await?;
        Ok(())
    }

    /// Drops whatever is left of the option.
    async fn drain(&mut self) -> io::Result<()> {
        let n = std::mem::take(&mut self.left);
        drain(self.r, n as u64).await
    }
}

/// Reads and discards `n` bytes.
pub(crate) async fn drain<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Writes one option reply.
pub(crate) async fn send_rep<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    ty: u32,
    parts: &[&[u8]],
) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = Vec::with_capacity(20 + len);
    buf.extend_from_slice(&REP_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&ty.to_be_bytes());
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
    w.write_all(&buf).await?;
    // A TLS stream keeps what it could not send until flushed.
    w.flush().await
}

/// Per-connection negotiation state.
struct Haggle<'a, R, W> {
    shared: &'a Shared,
    r: &'a mut R,
    w: &'a mut W,
    mode: Mode,
    no_zeroes: bool,
    meta: MetaState,
}

/// What the client said in its flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hello {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

/// Sends the greeting and reads the client's flags. `Ok(None)`: a port
/// probe that went away (QEMU says nothing about those).
pub(crate) async fn greet<R, W>(r: &mut R, w: &mut W) -> io::Result<Option<Hello>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    if w.write_all(&greeting).await.is_err() || w.flush().await.is_err() {
        return Ok(None);
    }
    let mut b = [0u8; 4];
    if r.read_exact(&mut b).await.is_err() {
        return Ok(None);
    }
    let mut flags = u32::from_be_bytes(b);
    let fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    flags &= !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if flags != 0 {
        return Err(fatal(format!("Unknown client flags 0x{flags:x} received")));
    }
    Ok(Some(Hello { fixed, no_zeroes }))
}

/// Reads one option header: (code, length).
pub(crate) async fn opt_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u32, u32)> {
    let mut hdr = [0u8; 16];
    r.read_exact(&mut hdr).await?;
    let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(fatal("Bad magic received"));
    }
    let code = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or_default());
    let length = u32::from_be_bytes(hdr[12..16].try_into().unwrap_or_default());
    if length > MAX_BUFFER_SIZE {
        return Err(fatal(format!(
            "len ({length}) is larger than max len ({MAX_BUFFER_SIZE})"
        )));
    }
    Ok((code, length))
}

/// Runs the handshake. `Ok(None)`: the client left cleanly (`NBD_OPT_ABORT`,
/// or a port probe that closed before sending anything); `Err`: the client
/// broke the protocol or the connection failed.
pub(crate) async fn negotiate<R, W>(
    shared: &Shared,
    r: &mut R,
    w: &mut W,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(hello) = greet(r, w).await? else {
        return Ok(None);
    };
    haggle(shared, r, w, hello).await
}

/// The option haggling after the flags (after STARTTLS with TLS).
pub(crate) async fn haggle<R, W>(
    shared: &Shared,
    r: &mut R,
    w: &mut W,
    hello: Hello,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Hello { fixed, no_zeroes } = hello;
    let mut h = Haggle {
        shared,
        r,
        w,
        mode: if fixed {
            Mode::Simple
        } else {
            Mode::ExportName
        },
        no_zeroes,
        meta: MetaState::default(),
    };
    loop {
        let (code, length) = opt_header(h.r).await?;
        if !fixed && code != OPT_EXPORT_NAME {
            return Err(fatal(format!(
                "Unsupported option {code} ({})",
                opt_name(code)
            )));
        }
        match h.option(code, length).await? {
            Step::Continue => {}
            Step::Go(n) => return Ok(Some(n)),
            Step::Abort => return Ok(None),
        }
    }
}

impl<R, W> Haggle<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Handles one option; soft errors are answered here, so what comes
    /// back is the next step or the error that ends the connection.
    async fn option(&mut self, code: u32, length: u32) -> io::Result<Step> {
        let mut opt = Opt {
            r: &mut *self.r,
            code,
            left: length,
        };
        let res = match code {
            // Fails only fatally: there is no way to answer an error.
            OPT_EXPORT_NAME => {
                Self::export_name(
                    self.shared,
                    &mut opt,
                    self.w,
                    self.mode,
                    self.no_zeroes,
                    &mut self.meta,
                )
                .await
            }
            OPT_ABORT => {
                // Reply, but tolerate clients that hang up first.
                let _ = send_rep(self.w, code, REP_ACK, &[]).await;
                return Ok(Step::Abort);
            }
            OPT_LIST if length > 0 => Err(opt.unexpected_length()),
            OPT_LIST => Self::list(self.shared, self.w).await,
            OPT_INFO | OPT_GO => {
                Self::info(self.shared, &mut opt, self.w, self.mode, &mut self.meta).await
            }
            OPT_STARTTLS if length > 0 => Err(opt.unexpected_length()),
            // Only reached over TLS when the server has TLS.
            OPT_STARTTLS if self.shared.has_tls() => Err(OptFail::Reply(
                REP_ERR_INVALID,
                "TLS already enabled".into(),
            )),
            OPT_STARTTLS => Err(OptFail::Reply(REP_ERR_POLICY, "TLS not configured".into())),
            OPT_STRUCTURED_REPLY if length > 0 => Err(opt.unexpected_length()),
            OPT_STRUCTURED_REPLY => match self.mode {
                Mode::Extended => Err(OptFail::Reply(
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers already negotiated".into(),
                )),
                Mode::Structured => Err(OptFail::Reply(
                    REP_ERR_INVALID,
                    "structured reply already negotiated".into(),
                )),
                _ => {
                    send_rep(self.w, code, REP_ACK, &[]).await?;
                    self.mode = Mode::Structured;
                    Ok(Step::Continue)
                }
            },
            OPT_EXTENDED_HEADERS if length > 0 => Err(opt.unexpected_length()),
            OPT_EXTENDED_HEADERS => {
                if self.mode == Mode::Extended {
                    Err(OptFail::Reply(
                        REP_ERR_INVALID,
                        "extended headers already negotiated".into(),
                    ))
                } else {
                    send_rep(self.w, code, REP_ACK, &[]).await?;
                    self.mode = Mode::Extended;
                    Ok(Step::Continue)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                Self::meta_queries(self.shared, &mut opt, self.w, self.mode, &mut self.meta).await
            }
            _ => Err(OptFail::Reply(
                REP_ERR_UNSUP,
                format!("Unsupported option {code} ({})", opt_name(code)),
            )),
        };
        match res {
            Ok(step) => Ok(step),
            Err(OptFail::Fatal(e)) => Err(e),
            Err(OptFail::Reply(ty, msg)) => {
                opt.drain().await?;
                send_rep(self.w, code, ty, &[msg.as_bytes()]).await?;
                Ok(Step::Continue)
            }
        }
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
    async fn list(shared: &Shared, w: &mut W) -> Result<Step, OptFail> {
        for exp in shared.exports() {
            let name = exp.name.as_bytes();
            let desc = exp.description.as_deref().unwrap_or("").as_bytes();
            let len = (name.len() as u32).to_be_bytes();
            send_rep(w, OPT_LIST, REP_SERVER, &[&len, name, desc]).await?;
        }
        send_rep(w, OPT_LIST, REP_ACK, &[]).await?;
        Ok(Step::Continue)
    }

    /// Attaches to `exp`, dropping a meta context selection made for
    /// another export (QEMU's `nbd_check_meta_export`).
    fn attach(exp: &Arc<Export>, meta: &mut MetaState) -> Option<(ClientGuard, Contexts)> {
        let guard = exp.attach()?;
        let same = meta.export.as_ref().is_some_and(|e| Arc::ptr_eq(e, exp));
        if !same {
            meta.count = 0;
        }
        let sel = if meta.count > 0 {
            meta.sel
        } else {
            Contexts::default()
        };
        Some((guard, sel))
    }

    /// Transmission flags for a client of `exp`.
    fn tx_flags(exp: &Export, mode: Mode, stat_payload: bool) -> u16 {
        let mut f = exp.flags;
        if mode >= Mode::Structured {
            f |= FLAG_SEND_DF;
        }
        if mode >= Mode::Extended && stat_payload {
            f |= FLAG_BLOCK_STAT_PAYLOAD;
        }
        f
    }

    /// `NBD_OPT_EXPORT_NAME`: no way to report errors but disconnecting.
    async fn export_name(
        shared: &Shared,
        opt: &mut Opt<'_, R>,
        w: &mut W,
        mode: Mode,
        no_zeroes: bool,
        meta: &mut MetaState,
    ) -> Result<Step, OptFail> {
        if mode >= Mode::Extended {
            return Err(fatal("Extended headers already negotiated").into());
        }
        if opt.left as usize > MAX_STRING_SIZE {
            return Err(fatal("Bad length received").into());
        }
        let mut name = vec![0u8; opt.left as usize];
        opt.r.read_exact(&mut name).await?;
        opt.left = 0;
        let Some((guard, sel)) = shared.find(&name).and_then(|e| Self::attach(&e, meta)) else {
            return Err(fatal("export not found").into());
        };
        let exp = guard.export();
        let mut buf = [0u8; 134];
        buf[..8].copy_from_slice(&exp.size().to_be_bytes());
        buf[8..10].copy_from_slice(&Self::tx_flags(exp, mode, sel.count() > 0).to_be_bytes());
        let n = if no_zeroes { 10 } else { buf.len() };
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        Ok(Step::Go(Negotiated {
            guard,
            mode,
            contexts: sel,
        }))
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`.
    async fn info(
        shared: &Shared,
        opt: &mut Opt<'_, R>,
        w: &mut W,
        mode: Mode,
        meta: &mut MetaState,
    ) -> Result<Step, OptFail> {
        let code = opt.code;
        let name = opt.read_name().await?;
        let requests = opt.read_u16().await?;
        let (mut send_name, mut blocksize) = (false, false);
        for _ in 0..requests {
            match opt.read_u16().await? {
                INFO_NAME => send_name = true,
                INFO_BLOCK_SIZE => blocksize = true,
                _ => {}
            }
        }
        if opt.left > 0 {
            return Err(opt.unexpected_length());
        }
        let Some(exp) = shared.find(&name) else {
            return Err(OptFail::Reply(
                REP_ERR_UNKNOWN,
                format!("export '{}' not present", sanitize(&name)),
            ));
        };
        // For GO, attach before answering so a removal cannot slip in
        // between the answer and the attachment.
        let attached = if code == OPT_GO {
            match Self::attach(&exp, meta) {
                Some(a) => Some(a),
                None => {
                    return Err(OptFail::Reply(
                        REP_ERR_UNKNOWN,
                        format!("export '{}' not present", sanitize(&name)),
                    ))
                }
            }
        } else {
            None
        };
        let info = |ty: u16| ty.to_be_bytes();
        if send_name {
            send_rep(w, code, REP_INFO, &[&info(INFO_NAME), &name]).await?;
        }
        if let Some(d) = &exp.description {
            send_rep(w, code, REP_INFO, &[&info(INFO_DESCRIPTION), d.as_bytes()]).await?;
        }
        // Minimum block size: 1 unless the client promised to honour it.
        let (min, pref, max) = exp.block_limits();
        let adv_min = if code == OPT_INFO || blocksize {
            min
        } else {
            1
        };
        let mut sizes = [0u8; 12];
        sizes[0..4].copy_from_slice(&adv_min.to_be_bytes());
        sizes[4..8].copy_from_slice(&pref.to_be_bytes());
        sizes[8..12].copy_from_slice(&max.to_be_bytes());
        send_rep(w, code, REP_INFO, &[&info(INFO_BLOCK_SIZE), &sizes]).await?;
        let stat_payload = match &attached {
            Some((_, sel)) => sel.count() > 0,
            None => true,
        };
        let mut ex = [0u8; 10];
        ex[..8].copy_from_slice(&exp.size().to_be_bytes());
        ex[8..].copy_from_slice(&Self::tx_flags(&exp, mode, stat_payload).to_be_bytes());
        send_rep(w, code, REP_INFO, &[&info(INFO_EXPORT), &ex]).await?;
        if code == OPT_INFO && !blocksize && min > 1 {
            return Err(OptFail::Reply(
                REP_ERR_BLOCK_SIZE_REQD,
                "request NBD_INFO_BLOCK_SIZE to use this export".into(),
            ));
        }
        send_rep(w, code, REP_ACK, &[]).await?;
        Ok(match attached {
            Some((guard, contexts)) => Step::Go(Negotiated {
                guard,
                mode,
                contexts,
            }),
            None => Step::Continue,
        })
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    async fn meta_queries(
        shared: &Shared,
        opt: &mut Opt<'_, R>,
        w: &mut W,
        mode: Mode,
        meta: &mut MetaState,
    ) -> Result<Step, OptFail> {
        let code = opt.code;
        let list = code == OPT_LIST_META_CONTEXT;
        if !list && mode < Mode::Structured {
            return Err(OptFail::Reply(
                REP_ERR_INVALID,
                format!(
                    "request option '{}' when structured reply is not negotiated",
                    opt_name(code)
                ),
            ));
        }
        let mut local = MetaState::default();
        // SET starts from nothing, even if it fails later.
        let st = if list { &mut local } else { meta };
        *st = MetaState::default();
        let name = opt.read_name().await?;
        let Some(exp) = shared.find(&name) else {
            return Err(OptFail::Reply(
                REP_ERR_UNKNOWN,
                format!("export '{}' not present", sanitize(&name)),
            ));
        };
        let queries = opt.read_u32().await?;
        let mut sel = Contexts::default();
        let names: Vec<&str> = exp.bitmaps.iter().map(|b| b.name()).collect();
        if list && queries == 0 {
            sel.base = true;
            sel.depth = exp.allocation_depth;
            sel.bitmaps = all_bitmaps(names.len());
        } else {
            for _ in 0..queries {
                let len = opt.read_u32().await?;
                if len as usize > MAX_STRING_SIZE {
                    opt.skip(len).await?;
                    continue;
                }
                let q = opt.read_str(len).await?;
                match_query(&q, list, exp.allocation_depth, &names, &mut sel);
            }
        }
        let mut count = 0;
        let id = |real: u32| if list { 0 } else { real };
        if sel.base {
            let cid = id(META_ID_BASE_ALLOCATION).to_be_bytes();
            send_rep(w, code, REP_META_CONTEXT, &[&cid, b"base:allocation"]).await?;
            count += 1;
        }
        if sel.depth {
            let cid = id(META_ID_ALLOCATION_DEPTH).to_be_bytes();
            send_rep(w, code, REP_META_CONTEXT, &[&cid, b"qemu:allocation-depth"]).await?;
            count += 1;
        }
        for i in sel.bitmap_indexes() {
            let cid = id(META_ID_DIRTY_BITMAP + i as u32).to_be_bytes();
            let name = format!("{DIRTY_BITMAP_PREFIX}{}", names[i]);
            send_rep(w, code, REP_META_CONTEXT, &[&cid, name.as_bytes()]).await?;
            count += 1;
        }
        send_rep(w, code, REP_ACK, &[]).await?;
        *st = MetaState {
            export: Some(exp),
            sel,
            count,
        };
        Ok(Step::Continue)
    }
}

/// The mask selecting the first `n` bitmaps.
fn all_bitmaps(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Applies one context query (QEMU's `nbd_meta_base_query` and
/// `nbd_meta_qemu_query`): an empty leaf (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`) means every context under it, for LIST only;
/// unknown names are ignored. `bitmaps`: the export's bitmap names.
fn match_query(q: &[u8], list: bool, has_depth: bool, bitmaps: &[&str], sel: &mut Contexts) {
    if let Some(rest) = q.strip_prefix(b"base:") {
        if (rest.is_empty() && list) || rest == b"allocation" {
            sel.base = true;
        }
    } else if let Some(rest) = q.strip_prefix(b"qemu:") {
        if rest.is_empty() && list {
            sel.depth |= has_depth;
            sel.bitmaps = all_bitmaps(bitmaps.len());
        } else if rest == b"allocation-depth" {
            sel.depth |= has_depth;
        } else if let Some(name) = rest.strip_prefix(b"dirty-bitmap:") {
            if name.is_empty() {
                if list {
                    sel.bitmaps = all_bitmaps(bitmaps.len());
                }
            } else if let Some(i) = bitmaps.iter().position(|b| b.as_bytes() == name) {
                sel.bitmaps |= 1 << i;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_follow_qemu() {
        let mut s = Contexts::default();
        match_query(b"base:", false, true, &[], &mut s);
        match_query(b"qemu:", false, true, &[], &mut s);
        assert_eq!(s.count(), 0);
        match_query(b"base:", true, true, &[], &mut s);
        match_query(b"qemu:", true, false, &[], &mut s);
        assert_eq!(
            s,
            Contexts {
                base: true,
                depth: false,
                bitmaps: 0,
            }
        );
        match_query(b"qemu:allocation-depth", false, true, &[], &mut s);
        assert!(s.depth);
        let mut s = Contexts::default();
        match_query(b"base:allocationx", true, true, &[], &mut s);
        match_query(b"other:thing", true, true, &[], &mut s);
        match_query(b"qemu:dirty-bitmap:x", true, true, &[], &mut s);
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn bitmap_queries() {
        let names = ["a", "b", "c"];
        let mut s = Contexts::default();
        match_query(b"qemu:dirty-bitmap:", false, false, &names, &mut s);
        match_query(b"qemu:dirty-bitmap:zz", false, false, &names, &mut s);
        assert_eq!(s.count(), 0);
        match_query(b"qemu:dirty-bitmap:b", false, false, &names, &mut s);
        assert_eq!(s.bitmaps, 0b010);
        match_query(b"qemu:dirty-bitmap:", true, false, &names, &mut s);
        assert_eq!(s.bitmap_indexes().collect::<Vec<_>>(), [0, 1, 2]);
        let mut s = Contexts::default();
        match_query(b"qemu:", true, false, &names, &mut s);
        assert_eq!(s.count(), 3);
        assert_eq!(all_bitmaps(64), u64::MAX);
    }

    #[test]
    fn names_are_cut_for_messages() {
        assert_eq!(sanitize(b"abc"), "abc");
        let long = vec![b'x'; 200];
        assert_eq!(sanitize(&long).len(), 83);
    }
}
