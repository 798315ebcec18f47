//! NBD server and block export commands.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use blockd_core::qapi::id_wellformed;
use blockd_core::BlockBackend;
use blockd_nbd::tls::{Endpoint, ServerTls};
use blockd_nbd::{ExportConfig, Listen, NbdServer, ServerOptions};
use blockd_qmp::{Ctx, Dispatcher, Empty, NoArgs, QmpError};
use serde::Deserialize;
use serde_json::Value;

use crate::bitmaps::Source;
use crate::exports::{
    begin_removal, export_perm, release_backend, stop_server, BackendIo, ExportEntry,
};
use crate::state::State;

type R<T> = Result<T, QmpError>;

fn gen(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum LegacyAddr {
    Inet { data: InetAddr },
    Unix { data: UnixAddr },
    Fd { data: FdAddr },
}

#[derive(Deserialize)]
struct InetAddr {
    host: String,
    port: String,
}

#[derive(Deserialize)]
struct UnixAddr {
    path: String,
}

#[derive(Deserialize)]
struct FdAddr {
    str: String,
}

#[derive(Deserialize)]
struct ServerStart {
    addr: LegacyAddr,
    #[serde(rename = "tls-creds")]
    tls_creds: Option<String>,
    #[serde(rename = "tls-authz")]
    tls_authz: Option<String>,
    #[serde(rename = "max-connections")]
    max_connections: Option<u32>,
}

#[derive(Deserialize)]
struct ExportAdd {
    id: String,
    #[serde(rename = "node-name")]
    node_name: String,
    writable: Option<bool>,
    writethrough: Option<bool>,
    iothread: Option<String>,
    #[serde(rename = "fixed-iothread")]
    _fixed_iothread: Option<bool>,
    name: Option<String>,
    description: Option<String>,
    bitmaps: Option<Vec<BitmapOrStr>>,
    #[serde(rename = "allocation-depth")]
    allocation_depth: Option<bool>,
}

/// `BlockDirtyBitmap`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedBitmap {
    node: String,
    name: String,
}

/// `BlockDirtyBitmapOrStr`.
#[derive(Deserialize)]
#[serde(untagged)]
enum BitmapOrStr {
    Local(String),
    External(NamedBitmap),
}

impl From<BitmapOrStr> for Source {
    fn from(b: BitmapOrStr) -> Source {
        match b {
            BitmapOrStr::Local(n) => Source::Local(n),
            BitmapOrStr::External(NamedBitmap { node, name }) => Source::External { node, name },
        }
    }
}

#[derive(Deserialize)]
struct ServerAdd {
    device: String,
    name: Option<String>,
    description: Option<String>,
    writable: Option<bool>,
    bitmap: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Safe,
    Hard,
}

#[derive(Deserialize)]
struct ExportDel {
    id: String,
    mode: Option<Mode>,
}

#[derive(Deserialize)]
struct ServerRemove {
    name: String,
    mode: Option<Mode>,
}

/// What block-export-add and nbd-server-add share.
struct NewExport {
    id: String,
    node_name: String,
    name: Option<String>,
    description: Option<String>,
    writable: bool,
    writethrough: bool,
    allocation_depth: bool,
    /// Dirty bitmaps to offer.
    bitmaps: Vec<Source>,
    /// `node_name` may name a backend (nbd-server-add's `device`).
    by_device: bool,
}

async fn add_export(state: &Arc<State>, n: NewExport) -> R<()> {
    // Lock order: control-plane lock, then the exports.
    let _g = state.control.lock().await;
    let mut ex = state.exports.lock().await;
    if !id_wellformed(&n.id) {
        return Err(gen("Invalid block export id"));
    }
    if ex.list.iter().any(|e| e.id == n.id) {
        return Err(gen(format!("Block export id '{}' is already in use", n.id)));
    }
    // nbd-server-add looks up a backend name first, then a node-name
    // (QEMU's bdrv_lookup_bs(device, device)); block-export-add only
    // node-names. A backend's export goes through the backend: the export
    // is its front end.
    let backend = if n.by_device {
        state.machine.backend_by_name(&n.node_name)
    } else {
        None
    };
    let shown_device = if n.by_device {
        n.node_name.as_str()
    } else {
        ""
    };
    let node = match &backend {
        Some(b) => b
            .root()
            .ok_or_else(|| gen(format!("Device '{}' has no medium", n.node_name)))?,
        None => state.graph.get(&n.node_name).ok_or_else(|| {
            gen(format!(
                "Cannot find device='{shown_device}' nor node-name='{}'",
                n.node_name
            ))
        })?,
    };
    let read_only = match &backend {
        Some(b) => !b.is_writable(),
        None => node.read_only(),
    };
    if read_only && n.writable {
        return Err(gen("Cannot export read-only node as writable"));
    }
    let server = ex
        .server
        .clone()
        .ok_or_else(|| gen("NBD server not running"))?;
    let name = n.name.unwrap_or_else(|| n.node_name.clone());
    if name.len() > 4096 {
        return Err(gen(format!("export name '{name}' too long")));
    }
    if let Some(d) = &n.description {
        if d.len() > 4096 {
            return Err(gen(format!("description '{d}' too long")));
        }
    }
    if server.has_export(&name) {
        return Err(gen(format!("NBD server already has export named '{name}'")));
    }
    let bitmaps = crate::bitmaps::export_bitmaps(state, &node, &n.bitmaps, !n.writable)
        .map_err(crate::qmp::qerr)?;
    let (blk, own) = match backend {
        Some(b) => {
            state.machine.export_ref(&b);
            (b, false)
        }
        None => {
            let blk = Arc::new(BlockBackend::new_export(
                export_perm(n.writable),
                state.run.clone(),
            ));
            blk.set_write_cache(!n.writethrough);
            blk.insert(&state.graph, node.clone())
                .map_err(crate::qmp::qerr)?;
            (blk, true)
        }
    };
    // A device backend keeps its own cache mode; the export adds FUA.
    let fua = !own && n.writethrough;
    let cfg = ExportConfig {
        name: name.clone(),
        description: n.description,
        io: Arc::new(BackendIo::new(blk.clone(), fua)),
        writable: n.writable,
        allocation_depth: n.allocation_depth,
        bitmaps: bitmaps.clone(),
    };
    let entry = ExportEntry {
        id: n.id,
        name,
        blk,
        own,
        shutting_down: false,
        bitmaps: Vec::new(),
    };
    if let Err(e) = server.add_export(cfg) {
        release_backend(state, &entry).await;
        return Err(gen(e));
    }
    // Busy while exported (QEMU's nbd_export_create).
    for b in &bitmaps {
        b.set_busy(true);
    }
    let entry = ExportEntry { bitmaps, ..entry };
    ex.list.push(entry);
    Ok(())
}

/// How long `block-export-del` (safe mode) waits for clients whose
/// connection is closing (see `NbdServer::export_clients_settled`).
const CLIENT_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

async fn del_export(state: &Arc<State>, id: &str, mode: Option<Mode>) -> R<()> {
    let mut ex = state.exports.lock().await;
    let entry = ex
        .list
        .iter()
        .find(|e| e.id == id)
        .ok_or_else(|| gen(format!("Export '{id}' is not found")))?;
    if entry.shutting_down {
        return Err(gen(format!("Export '{id}' is already shutting down")));
    }
    let hard = mode == Some(Mode::Hard);
    let clients = match ex.server.as_ref() {
        Some(s) if !hard => {
            s.export_clients_settled(&entry.name, CLIENT_CLOSE_WAIT)
                .await
        }
        _ => 0,
    };
    if clients > 0 {
        return Err(gen(format!("export '{id}' still in use")));
    }
    begin_removal(state, &mut ex, id, hard);
    Ok(())
}

fn listen_addr(cx: &Ctx<State>, addr: LegacyAddr) -> R<Listen> {
    Ok(match addr {
        LegacyAddr::Unix { data } => Listen::Unix(data.path.into()),
        LegacyAddr::Inet { data } => Listen::Tcp {
            host: data.host,
            port: data.port,
        },
        LegacyAddr::Fd { data } => {
            let name = data.str;
            if name.starts_with(|c: char| c.is_ascii_digit()) {
                let n: i32 = name
                    .parse()
                    .map_err(|_| gen(format!("Invalid file descriptor number '{name}'")))?;
                // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; an
                // invalid one fails with EBADF and is reported.
                let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(gen(format!("Invalid file descriptor number '{name}'")));
                }
                // SAFETY: `dup` is a fresh descriptor that nothing else owns.
                Listen::Fd(unsafe { OwnedFd::from_raw_fd(dup) })
            } else {
                let fd = cx
                    .session
                    .named_fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name)
                    .ok_or_else(|| {
                        gen(format!("File descriptor named '{name}' has not been found"))
                    })?;
                Listen::Fd(fd)
            }
        }
    })
}

/// QEMU's `nbd_get_tls_creds` for the server: the object must exist, be
/// TLS credentials, and be a server's.
fn server_tls(state: &State, id: &str, authz: Option<&str>) -> R<ServerTls> {
    let creds = state.objects.tls().lookup_creds(id).map_err(gen)?;
    if creds.endpoint != Endpoint::Server {
        return Err(gen("Expected TLS credentials for a server endpoint"));
    }
    Ok(ServerTls {
        creds,
        authz: authz.map(|a| (a.to_string(), state.objects.tls())),
    })
}

/// Registers the export commands.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "nbd-server-start",
        |cx: Ctx<State>, a: ServerStart| async move {
            let state = cx.state.clone();
            let mut ex = state.exports.lock().await;
            if ex.server.is_some() {
                return Err(gen("NBD server already running"));
            }
            // (Without tls-creds, QEMU accepts and ignores tls-authz.)
            let tls = match &a.tls_creds {
                Some(id) => Some(server_tls(&state, id, a.tls_authz.as_deref())?),
                None => None,
            };
            let listen = listen_addr(&cx, a.addr)?;
            let opts = ServerOptions {
                max_connections: a.max_connections.unwrap_or(0),
                tls,
            };
            let server = NbdServer::start(listen, opts).await.map_err(|e| {
                gen(format!(
                    "Failed to start NBD server: {}",
                    blockd_core::error::strerror(&e)
                ))
            })?;
            ex.server = Some(server);
            R::Ok(Empty {})
        },
    );
    d.register("nbd-server-stop", |cx: Ctx<State>, _: NoArgs| async move {
        if !stop_server(&cx.state).await {
            return Err(gen("NBD server not running"));
        }
        R::Ok(Empty {})
    });
    d.register(
        "block-export-add",
        |cx: Ctx<State>, a: ExportAdd| async move {
            // An iothread must exist; the export then runs on blockd's
            // multi-threaded executor like any other.
            if let Some(t) = a
                .iothread
                .as_ref()
                .filter(|t| !cx.state.objects.has_iothread(t))
            {
                return Err(gen(format!("iothread \"{t}\" not found")));
            }
            let n = NewExport {
                id: a.id,
                node_name: a.node_name,
                name: a.name,
                description: a.description,
                writable: a.writable.unwrap_or(false),
                writethrough: a.writethrough.unwrap_or(false),
                allocation_depth: a.allocation_depth.unwrap_or(false),
                bitmaps: a
                    .bitmaps
                    .unwrap_or_default()
                    .into_iter()
                    .map(Source::from)
                    .collect(),
                by_device: false,
            };
            add_export(&cx.state, n).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "block-export-del",
        |cx: Ctx<State>, a: ExportDel| async move {
            del_export(&cx.state, &a.id, a.mode).await?;
            R::Ok(Empty {})
        },
    );
    d.register("query-block-exports", |cx: Ctx<State>, _: NoArgs| async move {
        R::<Value>::Ok(cx.state.exports.lock().await.query())
    });
    d.register(
        "nbd-server-add",
        |cx: Ctx<State>, a: ServerAdd| async move {
            if cx.state.exports.lock().await.server.is_none() {
                return Err(gen("NBD server not running"));
            }
            // The export name is also the export id (QEMU's legacy command).
            let name = a.name.unwrap_or_else(|| a.device.clone());
            let n = NewExport {
                id: name.clone(),
                node_name: a.device,
                name: Some(name),
                description: a.description,
                writable: a.writable.unwrap_or(false),
                writethrough: false,
                allocation_depth: false,
                bitmaps: a.bitmap.into_iter().map(Source::Local).collect(),
                by_device: true,
            };
            add_export(&cx.state, n).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "nbd-server-remove",
        |cx: Ctx<State>, a: ServerRemove| async move {
            if cx.state.exports.lock().await.server.is_none() {
                return Err(gen("NBD server not running"));
            }
            del_export(&cx.state, &a.name, a.mode).await?;
            R::Ok(Empty {})
        },
    );
}
