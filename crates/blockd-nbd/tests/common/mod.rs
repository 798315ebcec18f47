//! Shared test support: an in-memory export, servers on short Unix socket
//! paths, and a hand-written NBD client.

#![allow(dead_code)]

pub mod mem;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockd_nbd::proto::*;
use blockd_nbd::{ExportConfig, ExportIo, Listen, NbdServer, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub use mem::MemDisk;

/// A fresh socket path short enough for `sun_path`.
pub fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    PathBuf::from(format!("/tmp/nbdt-{}-{tag}-{n}.sock", std::process::id()))
}

/// An export config over `io`.
pub fn export(name: &str, io: Arc<dyn ExportIo>, writable: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        description: None,
        io,
        writable,
        allocation_depth: false,
        bitmaps: Vec::new(),
    }
}

/// A server on a new Unix socket with one export `name` over `io`.
pub async fn serve(tag: &str, name: &str, io: Arc<dyn ExportIo>, writable: bool) -> NbdServer {
    let s = NbdServer::start(Listen::Unix(sock_path(tag)), ServerOptions::default())
        .await
        .unwrap();
    s.add_export(export(name, io, writable)).unwrap();
    s
}

/// One option reply.
#[derive(Debug)]
pub struct Rep {
    pub opt: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// One transmission reply (a simple reply or one chunk).
#[derive(Debug)]
pub enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: Option<u64>,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The NBD error of a simple reply or error chunk (0 otherwise).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { ty, payload, .. } if ty & (1 << 15) != 0 => {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            }
            _ => 0,
        }
    }

    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// Reply style negotiated by the test client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Simple,
    Structured,
    Extended,
}

/// A raw NBD client.
pub struct Client {
    pub s: UnixStream,
    pub style: Style,
    pub size: u64,
    pub flags: u16,
}

impl Client {
    /// Connects and reads the greeting; sends fixed newstyle + no zeroes.
    pub async fn connect(path: &str) -> Client {
        Self::connect_flags(path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await
    }

    /// Connects and sends `cflags`.
    pub async fn connect_flags(path: &str, cflags: u32) -> Client {
        let mut s = UnixStream::connect(path).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        s.write_all(&cflags.to_be_bytes()).await.unwrap();
        Client {
            s,
            style: Style::Simple,
            size: 0,
            flags: 0,
        }
    }

    /// Sends an option.
    pub async fn opt(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads an option reply.
    pub async fn rep(&mut self) -> Rep {
        self.try_rep().await.expect("option reply")
    }

    /// Reads an option reply, or None if the server closed.
    pub async fn try_rep(&mut self) -> Option<Rep> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.ok()?;
        assert_eq!(&h[..8], &REP_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).await.ok()?;
        Some(Rep { opt, ty, data })
    }

    /// Sends an option and expects a bare ACK.
    pub async fn opt_ack(&mut self, code: u32) {
        self.opt(code, &[]).await;
        let r = self.rep().await;
        assert_eq!((r.opt, r.ty), (code, REP_ACK), "{r:?}");
        match code {
            OPT_STRUCTURED_REPLY => self.style = Style::Structured,
            OPT_EXTENDED_HEADERS => self.style = Style::Extended,
            _ => {}
        }
    }

    /// Sends INFO or GO; returns the replies up to and including the final one.
    pub async fn info(&mut self, code: u32, name: &str, requests: &[u16]) -> Vec<Rep> {
        self.opt(code, &info_payload(name, requests)).await;
        let mut reps = Vec::new();
        loop {
            let r = self.rep().await;
            let last = r.ty != REP_INFO;
            if r.ty == REP_INFO && u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_EXPORT {
                self.size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                self.flags = u16::from_be_bytes([r.data[10], r.data[11]]);
            }
            reps.push(r);
            if last {
                return reps;
            }
        }
    }

    /// GO to `name`, asserting success.
    pub async fn go(&mut self, name: &str) {
        let reps = self.info(OPT_GO, name, &[]).await;
        assert_eq!(reps.last().unwrap().ty, REP_ACK, "{reps:?}");
    }

    /// SET_META_CONTEXT; returns (id, name) pairs.
    pub async fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta(OPT_SET_META_CONTEXT, name, queries)
            .await
            .unwrap()
    }

    /// LIST or SET_META_CONTEXT; Err(reply type) on an error reply.
    pub async fn meta(
        &mut self,
        code: u32,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, u32> {
        self.opt(code, &meta_payload(name, queries)).await;
        let mut out = Vec::new();
        loop {
            let r = self.rep().await;
            match r.ty {
                REP_META_CONTEXT => out.push((
                    u32::from_be_bytes(r.data[..4].try_into().unwrap()),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return Ok(out),
                t => return Err(t),
            }
        }
    }

    /// Sends one request.
    pub async fn cmd(
        &mut self,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let b = encode_request(self.style, flags, ty, cookie, offset, len, payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one reply; simple read replies carry `read_len` bytes of data
    /// when their error is 0.
    pub async fn reply(&mut self, read_len: usize) -> Reply {
        self.try_reply(read_len).await.expect("reply")
    }

    /// Reads one reply, or None at end of stream.
    pub async fn try_reply(&mut self, read_len: usize) -> Option<Reply> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.ok()?;
        let magic = u32::from_be_bytes(m);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).await.ok()?;
                let error = u32::from_be_bytes(h[..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = vec![0; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).await.ok()?;
                Some(Reply::Simple {
                    cookie,
                    error,
                    data,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).await.ok()?;
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut payload = vec![0; len as usize];
                self.s.read_exact(&mut payload).await.ok()?;
                Some(Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    ty: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    offset: None,
                    payload,
                })
            }
            EXTENDED_REPLY_MAGIC => {
                let mut h = [0u8; 28];
                self.s.read_exact(&mut h).await.ok()?;
                let len = u64::from_be_bytes(h[20..28].try_into().unwrap());
                let mut payload = vec![0; len as usize];
                self.s.read_exact(&mut payload).await.ok()?;
                Some(Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    ty: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    offset: Some(u64::from_be_bytes(h[12..20].try_into().unwrap())),
                    payload,
                })
            }
            m => panic!("bad reply magic 0x{m:x}"),
        }
    }

    /// Reads chunks until the final one.
    pub async fn chunks(&mut self) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.reply(0).await;
            let done = r.done();
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Reads `len` bytes at `offset` with whatever style is negotiated
    /// (no DF): assembles data and hole chunks. Err(NBD error) on failure.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.cmd(0, CMD_READ, 77, offset, len as u64, &[]).await;
        if self.style == Style::Simple {
            let r = self.reply(len as usize).await;
            return match r {
                Reply::Simple { error: 0, data, .. } => Ok(data),
                r => Err(r.error()),
            };
        }
        let mut buf = vec![0xeeu8; len as usize];
        for c in self.chunks().await {
            let Reply::Chunk { ty, payload, .. } = &c else {
                panic!()
            };
            match *ty {
                REPLY_TYPE_OFFSET_DATA => {
                    let o = u64::from_be_bytes(payload[..8].try_into().unwrap()) - offset;
                    buf[o as usize..o as usize + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let o = u64::from_be_bytes(payload[..8].try_into().unwrap()) - offset;
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                    buf[o as usize..(o + n as u64) as usize].fill(0);
                }
                REPLY_TYPE_NONE => {}
                _ => return Err(c.error()),
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `offset`; returns the NBD error (0 on success).
    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let flags = if self.style == Style::Extended {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        self.cmd(flags, CMD_WRITE, 78, offset, data.len() as u64, data)
            .await;
        self.simple_cmd_reply().await
    }

    /// Sends a command without payload and returns its NBD error.
    pub async fn simple_cmd(&mut self, flags: u16, ty: u16, offset: u64, len: u64) -> u32 {
        self.cmd(flags, ty, 79, offset, len, &[]).await;
        self.simple_cmd_reply().await
    }

    async fn simple_cmd_reply(&mut self) -> u32 {
        let r = self.reply(0).await;
        assert!(r.done(), "{r:?}");
        if self.style == Style::Extended {
            assert!(
                matches!(r, Reply::Chunk { .. }),
                "no simple replies with extended headers"
            );
        }
        r.error()
    }

    /// Block status; returns per context (id, extents).
    pub async fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u32, Vec<(u64, u64)>)>, u32> {
        self.cmd(flags, CMD_BLOCK_STATUS, 80, offset, len, &[])
            .await;
        self.block_status_reply().await
    }

    pub async fn block_status_reply(&mut self) -> Result<Vec<(u32, Vec<(u64, u64)>)>, u32> {
        let mut out = Vec::new();
        for c in self.chunks().await {
            let Reply::Chunk { ty, payload, .. } = &c else {
                return Err(c.error());
            };
            let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
            match *ty {
                REPLY_TYPE_BLOCK_STATUS => {
                    let ex = payload[4..]
                        .chunks(8)
                        .map(|e| {
                            (
                                u32::from_be_bytes(e[..4].try_into().unwrap()) as u64,
                                u32::from_be_bytes(e[4..].try_into().unwrap()) as u64,
                            )
                        })
                        .collect();
                    out.push((id, ex));
                }
                REPLY_TYPE_BLOCK_STATUS_EXT => {
                    let n = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    let ex: Vec<_> = payload[8..]
                        .chunks(16)
                        .map(|e| {
                            (
                                u64::from_be_bytes(e[..8].try_into().unwrap()),
                                u64::from_be_bytes(e[8..].try_into().unwrap()),
                            )
                        })
                        .collect();
                    assert_eq!(ex.len(), n as usize);
                    out.push((id, ex));
                }
                _ => return Err(c.error()),
            }
        }
        Ok(out)
    }

    /// Whether the server closed the connection (reads EOF within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Payload of INFO/GO.
pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Payload of LIST/SET_META_CONTEXT.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Encodes a request (compact unless `style` is extended).
pub fn encode_request(
    style: Style,
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + payload.len());
    if style == Style::Extended {
        b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if style == Style::Extended {
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b.extend_from_slice(payload);
    b
}

/// Connects to `server`'s export `name` with the given style.
pub async fn open(server: &NbdServer, name: &str, style: Style) -> Client {
    let mut c = Client::connect(&server.local_addr()).await;
    match style {
        Style::Simple => {}
        Style::Structured => c.opt_ack(OPT_STRUCTURED_REPLY).await,
        Style::Extended => c.opt_ack(OPT_EXTENDED_HEADERS).await,
    }
    c.go(name).await;
    c
}

/// A pattern buffer.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
