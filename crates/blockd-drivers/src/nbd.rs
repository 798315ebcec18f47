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

fn server_addr(s: &SocketAddr, env: &Env) -> Result<ServerAddr, BlockError> {
    Ok(match s {
        SocketAddr::Unix { path } => ServerAddr::Unix(path.into()),
        SocketAddr::Inet(i) => ServerAddr::Inet {
            host: i.host.clone(),
            port: i.port.clone(),
        },
        SocketAddr::Fd { str: name } => {
            let fd = if name.starts_with(|c: char| c.is_ascii_digit()) {
                // A number (QEMU takes it outside a monitor, on the
                // command line; blockd in QMP too, as its NBD server does).
                let n: i32 = name.parse().map_err(|_| {
                    BlockError::not_found(format!(
                        "File descriptor named '{name}' has not been found"
                    ))
                })?;
                // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number;
                // an invalid one fails with EBADF and is reported.
                let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(BlockError::invalid(format!(
                        "Invalid file descriptor number '{name}'"
                    )));
                }
                // SAFETY: `dup` is a fresh descriptor that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(dup) }
            } else {
                // A name given with `getfd` on the requesting monitor.
                env.named_fds
                    .as_ref()
                    .and_then(|f| f.take(name))
                    .ok_or_else(|| {
                        BlockError::not_found(format!(
                            "File descriptor named '{name}' has not been found"
                        ))
                    })?
            };
            if !is_socket(&fd) {
                return Err(BlockError::invalid(format!(
                    "File descriptor '{name}' is not a socket"
                )));
            }
            ServerAddr::Fd(std::sync::Mutex::new(Some(fd)))
        }
    })
}

/// QEMU's `fd_is_socket`.
fn is_socket(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer for a valid descriptor.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    // SAFETY: fstat succeeded, so the buffer is initialised.
    r == 0 && unsafe { st.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFSOCK
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
        server: server_addr(&o.server, env)?,
        export: o.export,
        x_dirty_bitmap: o.x_dirty_bitmap,
        reconnect_delay: Duration::from_secs(o.reconnect_delay.unwrap_or(0).into()),
        open_timeout: Duration::from_secs(o.open_timeout.unwrap_or(0).into()),
    };
    NbdDriver::open(opts, node.read_only, node.auto_read_only)
        .await
        .map_err(|m| BlockError::new(blockd_core::ErrorKind::Io, m))
}
