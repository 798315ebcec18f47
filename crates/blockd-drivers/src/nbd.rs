//! `nbd`: a node whose data is an NBD server's export (QEMU's
//! block/nbd.c). The protocol side lives in [`blockd_nbd::client`]; this
//! module turns `blockdev-add` options into it, with QEMU's checks
//! (`nbd_process_options`, `nbd_config`); TLS credentials come from the
//! [`Env`]'s registry.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use blockd_core::{BlockError, NodeOptions};
use blockd_nbd::client::{ClientOptions, NbdDriver, ServerAddr};
use blockd_nbd::tls::{ClientTls, Endpoint};

use crate::open::Env;

use crate::options::{NbdOptions, SocketAddr};

/// Checks the options before anything is opened.
pub fn check(o: &NbdOptions) -> Result<(), BlockError> {
    if let Some(e) = &o.export {
        if e.len() > blockd_nbd::proto::MAX_STRING_SIZE {
            return Err(BlockError::invalid(
                "export name too long to send to server",
            ));
        }
    }
    Ok(())
}

fn server_addr(s: &SocketAddr) -> Result<ServerAddr, BlockError> {
    Ok(match s {
        SocketAddr::Unix { path } => ServerAddr::Unix(path.into()),
        SocketAddr::Inet(i) => ServerAddr::Inet {
            host: i.host.clone(),
            port: i.port.clone(),
        },
        SocketAddr::Fd { str: name } => {
            // Only descriptor numbers: names passed with getfd belong to
            // a monitor session, which the driver cannot see.
            let n: i32 = name.parse().map_err(|_| {
                BlockError::not_found(format!("File descriptor named '{name}' has not been found"))
            })?;
            // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; an
            // invalid one fails with EBADF and is reported.
            let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(BlockError::invalid(format!(
                    "Invalid file descriptor number '{name}'"
                )));
            }
            // SAFETY: `dup` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(dup) };
            ServerAddr::Fd(std::sync::Mutex::new(Some(fd)))
        }
    })
}

/// QEMU's `nbd_get_tls_creds` and the `tls-hostname` default of
/// `nbd_process_options`: the credentials must be a client's; the host
/// name defaults to an inet server's host (a Unix socket has none, which
/// the certificate check refuses when it verifies the server).
fn tls(o: &NbdOptions, env: &Env) -> Result<Option<ClientTls>, BlockError> {
    let Some(id) = &o.tls_creds else {
        return Ok(None);
    };
    let creds = match &env.tls {
        Some(r) => r.lookup_creds(id).map_err(BlockError::not_found)?,
        None => {
            return Err(BlockError::not_found(format!(
                "No TLS credentials with id '{id}'"
            )))
        }
    };
    if creds.endpoint != Endpoint::Client {
        return Err(BlockError::invalid(
            "Expected TLS credentials for a client endpoint",
        ));
    }
    let hostname = o.tls_hostname.clone().or_else(|| match &o.server {
        SocketAddr::Inet(i) => Some(i.host.clone()),
        _ => None,
    });
    Ok(Some(ClientTls { creds, hostname }))
}

/// Opens an `nbd` node: connects, negotiates, and returns the driver and
/// whether the node is read-only.
pub async fn open(
    o: NbdOptions,
    node: &NodeOptions,
    env: &Env,
) -> Result<(NbdDriver, bool), BlockError> {
    check(&o)?;
    let tls = tls(&o, env)?;
    let opts = ClientOptions {
        tls,
        server: server_addr(&o.server)?,
        export: o.export,
        x_dirty_bitmap: o.x_dirty_bitmap,
        reconnect_delay: Duration::from_secs(o.reconnect_delay.unwrap_or(0).into()),
        open_timeout: Duration::from_secs(o.open_timeout.unwrap_or(0).into()),
    };
    NbdDriver::open(opts, node.read_only, node.auto_read_only)
        .await
        .map_err(|m| BlockError::new(blockd_core::ErrorKind::Io, m))
}
