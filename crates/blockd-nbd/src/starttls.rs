//! The server's options before TLS, on a server that requires it (QEMU's
//! `nbd_negotiate_options` while `client->ioc` is still the plain
//! socket, and `nbd_negotiate_handle_starttls`'s acknowledgement).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::handshake::{drain, fatal, opt_header, send_rep, Hello};
use crate::proto::*;

/// The options before TLS on a server that requires it (QEMU's
/// `nbd_negotiate_options` while `client->ioc` is the plain socket):
/// every option but `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_TLS_REQD`
/// (so no export name or size leaks), `NBD_OPT_EXPORT_NAME`, which cannot
/// be answered, ends the connection. `Ok(true)`: STARTTLS was
/// acknowledged, the TLS handshake comes next; `Ok(false)`: the client
/// sent `NBD_OPT_ABORT`.
pub(crate) async fn before_tls<R, W>(r: &mut R, w: &mut W, hello: Hello) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let (code, length) = opt_header(r).await?;
        if !hello.fixed {
            return Err(fatal(format!("Unsupported option 0x{code:x}")));
        }
        match code {
            OPT_STARTTLS if length > 0 => {
                // A client that cannot start TLS right is dropped.
                drain(r, length.into()).await?;
                let msg = format!("option '{}' has unexpected length", opt_name(code));
                send_rep(w, code, REP_ERR_INVALID, &[msg.as_bytes()]).await?;
                return Err(fatal(msg));
            }
            OPT_STARTTLS => {
                send_rep(w, code, REP_ACK, &[]).await?;
                return Ok(true);
            }
            OPT_EXPORT_NAME => {
                return Err(fatal(format!("Option 0x{code:x} not permitted before TLS")))
            }
            _ => {
                drain(r, length.into()).await?;
                let msg = format!("Option 0x{code:x} not permitted before TLS");
                let sent = send_rep(w, code, REP_ERR_TLS_REQD, &[msg.as_bytes()]).await;
                if code == OPT_ABORT {
                    // The client may hang up before reading the answer.
                    return Ok(false);
                }
                sent?;
            }
        }
    }
}
