//! The client's side of the handshake, as QEMU's `nbd_receive_negotiate`
//! (nbd/client.c) does it: fixed newstyle, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` (`base:allocation` and an optional
//! `x-dirty-bitmap` context), then `NBD_OPT_GO` asking for
//! `NBD_INFO_BLOCK_SIZE`.
//!
//! Without `x-dirty-bitmap`, `qemu:allocation-depth` is asked for as
//! well (QEMU's client asks for one context only): with it, what the
//! server's image leaves unallocated is unallocated in the node too, not
//! merely "reads as zeroes" (jobs that follow allocation skip it, and a
//! re-export reports it unallocated).
//! A server that does not know the context (nbdkit) does not select it,
//! and block status then follows `base:allocation` alone.
//!
//! Errors are worded as QEMU words them ("Bad initial magic received:
//! 0x...", "Requested export not available", ...).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;

/// The meta context that tells allocation in the server's chain.
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// What the server told about the export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Length in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended (64-bit) headers are in use (structured replies too).
    pub extended: bool,
    /// Minimum block size (1 if the server gave none).
    pub min_block: u32,
    /// Preferred block size.
    pub opt_block: u32,
    /// Maximum payload size.
    pub max_block: u32,
    /// Context id of `base:allocation`, if the server selected it.
    pub base_allocation: Option<u32>,
    /// Context id of the `x-dirty-bitmap` context, if asked and selected.
    pub dirty_bitmap: Option<u32>,
    /// Context id of `qemu:allocation-depth`, if the server selected it
    /// (asked for when no `x-dirty-bitmap` is): which ranges are
    /// allocated anywhere in the server's backing chain.
    pub allocation_depth: Option<u32>,
}

fn eof(what: &str, e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        format!("{what}: Unexpected end-of-file before all data were read")
    } else {
        format!("{what}: {e}")
    }
}

async fn send_opt<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> Result<(), String> {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)
        .await
        .map_err(|e| format!("Failed to send option request header: {e}"))?;
    w.flush()
        .await
        .map_err(|e| format!("Failed to send option request header: {e}"))
}

/// One option reply: its type and payload.
async fn read_rep<R: AsyncRead + Unpin>(r: &mut R, opt: u32) -> Result<(u32, Vec<u8>), String> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)
        .await
        .map_err(|e| eof("Failed to read option reply", e))?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
    let ropt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    if magic != REP_MAGIC {
        return Err("Unexpected option reply magic".into());
    }
    if ropt != opt {
        return Err(format!(
            "Unexpected option type {ropt} ({}), expected {opt} ({})",
            opt_name(ropt),
            opt_name(opt)
        ));
    }
    if len as usize > MAX_STRING_SIZE * 2 + 64 {
        return Err(format!("server reply for option {opt} is too long"));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)
        .await
        .map_err(|e| eof("Failed to read option reply", e))?;
    Ok((ty, data))
}

/// QEMU's `nbd_handle_reply_err` for an error reply to a required option
/// (the server's own message is only a hint there, not in the error).
fn rep_error(ty: u32, opt: u32, _data: &[u8]) -> String {
    let name = opt_name(opt);
    match ty {
        REP_ERR_UNKNOWN => "Requested export not available".to_string(),
        REP_ERR_POLICY => format!("Denied by server for option {opt} ({name})"),
        REP_ERR_INVALID => format!("Invalid parameters for option {opt} ({name})"),
        REP_ERR_PLATFORM => format!("Server lacks support for option {opt} ({name})"),
        REP_ERR_TLS_REQD => format!("TLS negotiation required before option {opt} ({name})"),
        REP_ERR_SHUTDOWN => format!("Server shutting down before option {opt} ({name})"),
        REP_ERR_BLOCK_SIZE_REQD => {
            format!("Server requires INFO_BLOCK_SIZE for option {opt} ({name})")
        }
        _ => format!("Unknown error code when asking for option {opt} ({name})"),
    }
}

/// Negotiates with a server on `stream` for `export`; `bitmap` is the
/// `x-dirty-bitmap` context to select as well.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    bitmap: Option<&str>,
) -> Result<ExportInfo, String> {
    greet(s).await?;
    options(s, export, bitmap).await
}

/// QEMU's `nbd_receive_starttls`: `NBD_OPT_STARTTLS`, which the server
/// must acknowledge.
async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), String> {
    send_opt(s, OPT_STARTTLS, &[]).await?;
    let (ty, d) = read_rep(s, OPT_STARTTLS).await?;
    match ty {
        REP_ACK if d.is_empty() => Ok(()),
        REP_ACK => Err(format!(
            "Option {OPT_STARTTLS} ('starttls') response length is {} (it should be zero)",
            d.len()
        )),
        REP_ERR_UNSUP => Err("Server don't support STARTTLS option".into()),
        t if t & REP_FLAG_ERROR != 0 => Err(rep_error(t, OPT_STARTTLS, &d)),
        t => Err(format!(
            "Server answered option {OPT_STARTTLS} (starttls) with unexpected reply {t}"
        )),
    }
}

/// Negotiates over TLS: greeting and STARTTLS in the clear, the TLS
/// handshake, the server's certificate checked (QEMU's messages), then
/// the options over TLS. Returns the export and the TLS stream's halves.
pub async fn negotiate_tls<S>(
    mut s: S,
    tls: &crate::tls::ClientTls,
    export: &str,
    bitmap: Option<&str>,
) -> Result<(ExportInfo, super::conn::ReadHalf, super::conn::WriteHalf), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use rustls::pki_types::ServerName;
    greet(&mut s).await?;
    starttls(&mut s).await?;
    let Some(cfg) = tls.creds.client.clone() else {
        return Err("Expected TLS credentials for a client endpoint".into());
    };
    // Names are checked after the handshake: this one only goes into SNI.
    let name = tls
        .hostname
        .as_deref()
        .and_then(|h| ServerName::try_from(h.to_string()).ok())
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, s)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let certs = stream.get_ref().1.peer_certificates();
    crate::tls::verify::check_server(&tls.creds, certs, tls.hostname.as_deref())?;
    let mut s = crate::tls::TlsIo(stream);
    let info = options(&mut s, export, bitmap).await?;
    let (r, w) = tokio::io::split(s);
    Ok((info, Box::new(r), Box::new(w)))
}

/// The greeting and the client's flags.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), String> {
    let mut b8 = [0u8; 8];
    s.read_exact(&mut b8)
        .await
        .map_err(|e| eof("Failed to read initial magic", e))?;
    let magic = u64::from_be_bytes(b8);
    if magic != NBDMAGIC {
        return Err(format!("Bad initial magic received: 0x{magic:x}"));
    }
    s.read_exact(&mut b8)
        .await
        .map_err(|e| eof("Failed to read server magic", e))?;
    let magic = u64::from_be_bytes(b8);
    if magic != IHAVEOPT {
        // Oldstyle servers cannot name exports; QEMU refuses them too
        // once an export name is given, blockd always.
        return Err(format!("Bad server magic received: 0x{magic:x}"));
    }
    let mut b2 = [0u8; 2];
    s.read_exact(&mut b2)
        .await
        .map_err(|e| eof("Failed to read server flags", e))?;
    let gflags = u16::from_be_bytes(b2);
    if gflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("Server does not support fixed newstyle negotiation".into());
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if gflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| format!("Failed to send clientflags field: {e}"))?;
    Ok(())
}

/// The options after the flags (after STARTTLS with TLS).
async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    bitmap: Option<&str>,
) -> Result<ExportInfo, String> {
    let mut info = ExportInfo::default();
    // Extended headers if the server has them (they imply structured
    // replies), else structured replies (optional too: without them,
    // reads use simple replies and block status is unknown).
    send_opt(s, OPT_EXTENDED_HEADERS, &[]).await?;
    let (ty, _) = read_rep(s, OPT_EXTENDED_HEADERS).await?;
    info.extended = ty == REP_ACK;
    info.structured = info.extended;
    if !info.extended {
        send_opt(s, OPT_STRUCTURED_REPLY, &[]).await?;
        let (ty, _) = read_rep(s, OPT_STRUCTURED_REPLY).await?;
        info.structured = ty == REP_ACK;
    }

    if info.structured {
        let mut queries: Vec<&str> = vec!["base:allocation"];
        match bitmap {
            Some(b) => queries.push(b),
            None => queries.push(ALLOCATION_DEPTH),
        }
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in &queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        send_opt(s, OPT_SET_META_CONTEXT, &data).await?;
        loop {
            let (ty, d) = read_rep(s, OPT_SET_META_CONTEXT).await?;
            match ty {
                REP_ACK => break,
                REP_META_CONTEXT if d.len() >= 4 => {
                    let id = u32::from_be_bytes(d[0..4].try_into().unwrap());
                    let name = String::from_utf8_lossy(&d[4..]);
                    if name == "base:allocation" {
                        info.base_allocation = Some(id);
                    } else if Some(name.as_ref()) == bitmap {
                        info.dirty_bitmap = Some(id);
                    } else if bitmap.is_none() && name == ALLOCATION_DEPTH {
                        info.allocation_depth = Some(id);
                    }
                }
                REP_META_CONTEXT => return Err("Unexpected meta context reply".into()),
                // A server without meta contexts: block status stays unknown.
                t if t & REP_FLAG_ERROR != 0 => break,
                _ => return Err(format!("Unexpected reply type {ty} to set meta context")),
            }
        }
        if bitmap.is_some() && info.dirty_bitmap.is_none() {
            // QEMU's nbd_client_handshake: the server did not select the
            // bitmap context (QSD reports -EINVAL so).
            return Err("Could not open image: Invalid argument".into());
        }
    } else if bitmap.is_some() {
        return Err("Could not open image: Invalid argument".into());
    }

    // NBD_OPT_GO with NBD_INFO_BLOCK_SIZE.
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_opt(s, OPT_GO, &data).await?;
    let mut have_export = false;
    loop {
        let (ty, d) = read_rep(s, OPT_GO).await?;
        match ty {
            REP_ACK => break,
            REP_INFO if d.len() >= 2 => {
                let it = u16::from_be_bytes([d[0], d[1]]);
                match it {
                    INFO_EXPORT if d.len() == 12 => {
                        info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        info.flags = u16::from_be_bytes([d[10], d[11]]);
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE if d.len() == 14 => {
                        let g = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                        let (min, opt, max) = (g(2), g(6), g(10));
                        if !min.is_power_of_two() || min > 1 << 16 {
                            return Err(format!(
                                "server minimum block size {min} is not a power of two"
                            ));
                        }
                        if !opt.is_power_of_two() || opt < min {
                            return Err(format!("server preferred block size {opt} is not valid"));
                        }
                        if max < min.min(MAX_BUFFER_SIZE) || max % min != 0 {
                            return Err(format!("server maximum block size {max} is not valid"));
                        }
                        info.min_block = min;
                        info.opt_block = opt;
                        info.max_block = max;
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(format!(
                            "remaining export info type {it} has unexpected length"
                        ))
                    }
                    _ => {}
                }
            }
            t if t & REP_FLAG_ERROR != 0 => return Err(rep_error(t, OPT_GO, &d)),
            _ => return Err(format!("unexpected reply type {ty} to option go")),
        }
    }
    if !have_export {
        return Err("broken server omitted NBD_INFO_EXPORT".into());
    }
    // QEMU's nbd_refresh_limits for a server without NBD_INFO_BLOCK_SIZE:
    // byte granularity with structured replies (reads cannot be short),
    // else sectors; the largest request is NBD_MAX_BUFFER_SIZE.
    if info.min_block == 0 {
        info.min_block = if info.structured { 1 } else { 512 };
        info.opt_block = info.opt_block.max(4096);
    }
    if info.max_block == 0 {
        info.max_block = MAX_BUFFER_SIZE;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn opt(s: &mut (impl AsyncRead + Unpin)) -> (u32, Vec<u8>) {
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let o = s.read_u32().await.unwrap();
        let n = s.read_u32().await.unwrap();
        let mut d = vec![0u8; n as usize];
        s.read_exact(&mut d).await.unwrap();
        (o, d)
    }

    async fn rep(s: &mut (impl AsyncWrite + Unpin), o: u32, ty: u32, d: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(&REP_MAGIC.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&(d.len() as u32).to_be_bytes());
        v.extend_from_slice(d);
        s.write_all(&v).await.unwrap();
    }

    /// A fake server: structured replies, base:allocation as id 7 (and
    /// qemu:allocation-depth as id 9 if `depth`), GO with block sizes; or
    /// `unknown` for a missing export.
    async fn fake(s: tokio::io::DuplexStream, unknown: bool) {
        fake_with(s, unknown, true).await
    }

    async fn fake_with(mut s: tokio::io::DuplexStream, unknown: bool, depth: bool) {
        s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
        s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        assert_eq!(
            s.read_u32().await.unwrap(),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        let (o, _) = opt(&mut s).await;
        assert_eq!(o, OPT_EXTENDED_HEADERS);
        rep(&mut s, o, REP_ERR_UNSUP, &[]).await;
        let (o, _) = opt(&mut s).await;
        assert_eq!(o, OPT_STRUCTURED_REPLY);
        rep(&mut s, o, REP_ACK, &[]).await;
        let (o, d) = opt(&mut s).await;
        assert_eq!(o, OPT_SET_META_CONTEXT);
        // export name, 2 queries: base:allocation, qemu:allocation-depth
        assert_eq!(&d[7..11], &2u32.to_be_bytes());
        assert_eq!(&d[15..30], b"base:allocation");
        assert!(d.ends_with(b"qemu:allocation-depth"));
        let mut m = 7u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"base:allocation");
        rep(&mut s, o, REP_META_CONTEXT, &m).await;
        if depth {
            let mut m = 9u32.to_be_bytes().to_vec();
            m.extend_from_slice(b"qemu:allocation-depth");
            rep(&mut s, o, REP_META_CONTEXT, &m).await;
        }
        rep(&mut s, o, REP_ACK, &[]).await;
        let (o, d) = opt(&mut s).await;
        assert_eq!(o, OPT_GO);
        assert_eq!(&d[4..7], b"exp");
        if unknown {
            rep(&mut s, o, REP_ERR_UNKNOWN, &[]).await;
            return;
        }
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(1u64 << 20).to_be_bytes());
        e.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
        rep(&mut s, o, REP_INFO, &e).await;
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        rep(&mut s, o, REP_INFO, &b).await;
        rep(&mut s, o, REP_ACK, &[]).await;
    }

    #[tokio::test]
    async fn negotiates_go_with_block_sizes_and_base_allocation() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(fake(s, false));
        let info = negotiate(&mut c, "exp", None).await.unwrap();
        srv.await.unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(info.structured);
        assert_eq!(info.base_allocation, Some(7));
        assert_eq!(info.allocation_depth, Some(9));
        assert_eq!(
            (info.min_block, info.opt_block, info.max_block),
            (512, 4096, 1 << 20)
        );
        assert_ne!(info.flags & FLAG_SEND_FLUSH, 0);
    }

    #[tokio::test]
    async fn a_server_without_allocation_depth_leaves_it_unused() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(fake_with(s, false, false));
        let info = negotiate(&mut c, "exp", None).await.unwrap();
        srv.await.unwrap();
        assert_eq!(info.base_allocation, Some(7));
        assert_eq!(info.allocation_depth, None);
    }

    #[tokio::test]
    async fn a_missing_export_is_qemus_message() {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(fake(s, true));
        let e = negotiate(&mut c, "exp", None).await.unwrap_err();
        srv.await.unwrap();
        assert_eq!(e, "Requested export not available");
    }

    #[tokio::test]
    async fn not_nbd_and_eof_are_qemus_messages() {
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        s.write_all(b"HELLO, this is not NBD").await.unwrap();
        let e = negotiate(&mut c, "exp", None).await.unwrap_err();
        assert_eq!(e, "Bad initial magic received: 0x48454c4c4f2c2074");
        let (mut c, s) = tokio::io::duplex(1 << 16);
        drop(s);
        let e = negotiate(&mut c, "exp", None).await.unwrap_err();
        assert_eq!(
            e,
            "Failed to read initial magic: Unexpected end-of-file before all data were read"
        );
    }
}
