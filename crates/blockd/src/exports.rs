//! Block exports: the NBD server and the exports on it (QEMU's
//! `block/export/export.c` and `blockdev-nbd.c`).
//!
//! An export is a user of its node (holding `consistent-read`, and `write`
//! if writable, sharing everything, as QEMU's exports do), so the node
//! cannot be deleted while exported. Deleting an export stops new clients
//! at once; `BLOCK_EXPORT_DELETED` is sent when its last client is gone.

use std::sync::Arc;

use blockd_core::{BlockNode, BlockStatus, IoFuture, Perm, PermPair, ReqFlags};
use blockd_nbd::{ExportIo, NbdServer};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::state::State;

/// An export's I/O: straight to its node.
pub struct NodeIo {
    node: Arc<BlockNode>,
    writethrough: bool,
}

impl NodeIo {
    /// I/O on `node`; with `writethrough`, every write is flushed before it completes.
    pub fn new(node: Arc<BlockNode>, writethrough: bool) -> Self {
        NodeIo { node, writethrough }
    }
}

impl ExportIo for NodeIo {
    fn length(&self) -> u64 {
        self.node.length()
    }

    fn block_limits(&self) -> (u32, u32, u32) {
        let l = self.node.driver().limits();
        let min = l.request_alignment.max(1);
        let max = match l.max_transfer {
            0 => 32 << 20,
            m => m.min(32 << 20),
        };
        (min, min.max(4096), max)
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.node.read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let flags = ReqFlags {
                fua: fua && !self.writethrough,
                ..ReqFlags::default()
            };
            self.node.write(offset, data, flags).await?;
            if self.writethrough {
                self.node.flush().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    ) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let flags = ReqFlags {
                fua: fua && !self.writethrough,
                may_unmap,
                no_fallback: fast_only,
            };
            self.node.write_zeroes(offset, len, flags).await?;
            if self.writethrough {
                self.node.flush().await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.node.discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.node.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.node.block_status(offset, len))
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> IoFuture<'_, (u64, u32)> {
        Box::pin(self.node.allocation_depth(offset, len))
    }
}

/// One export.
pub struct ExportEntry {
    /// The export id.
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// The exported node (for a backend: its medium when the export was
    /// added).
    pub node: Arc<BlockNode>,
    /// The backend whose I/O the export goes through, if it exports a
    /// backend rather than a node.
    pub backend: Option<Arc<blockd_core::BlockBackend>>,
    /// Deletion was requested; waiting for clients to go.
    pub shutting_down: bool,
}

/// The NBD server slot and the exports.
#[derive(Default)]
pub struct Exports {
    /// The running server, if any.
    pub server: Option<NbdServer>,
    /// Exports in creation order.
    pub list: Vec<ExportEntry>,
}

impl Exports {
    /// `query-block-exports`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.list
                .iter()
                .map(|e| {
                    let node = match &e.backend {
                        Some(b) => b.root().map(|n| n.name().to_string()).unwrap_or_default(),
                        None => e.node.name().to_string(),
                    };
                    json!({"id": e.id, "type": "nbd", "node-name": node,
                           "shutting-down": e.shutting_down})
                })
                .collect(),
        )
    }
}

/// The key under which an export uses its node.
pub fn user_key(id: &str) -> String {
    format!("export:{id}")
}

/// The permissions an export takes on its node (QEMU's `blk_exp_add`).
pub fn export_perm(writable: bool) -> PermPair {
    PermPair {
        perm: if writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        },
        shared: Perm::ALL,
    }
}

/// Starts removing an export: no new clients; existing ones are
/// disconnected if `hard`. When the last client is gone, the export
/// leaves the list, releases its node and `BLOCK_EXPORT_DELETED` is sent.
/// The caller holds the exports lock and passes it in.
pub fn begin_removal(state: &Arc<State>, ex: &mut Exports, id: &str, hard: bool) {
    let Some(entry) = ex.list.iter_mut().find(|e| e.id == id) else {
        return;
    };
    if entry.shutting_down {
        return;
    }
    entry.shutting_down = true;
    let done = ex
        .server
        .as_ref()
        .and_then(|s| s.remove_export(&entry.name, hard).ok());
    let state = state.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        if let Some(done) = done {
            let _ = done.await;
        }
        finish_removal(&state, &id).await;
    });
}

async fn finish_removal(state: &Arc<State>, id: &str) {
    let entry = {
        let mut ex = state.exports.lock().await;
        let Some(pos) = ex.list.iter().position(|e| e.id == id) else {
            return;
        };
        ex.list.remove(pos)
    };
    match &entry.backend {
        Some(b) => {
            let nodes = state.machine.export_unref(&state.graph, b);
            crate::machine::close_nodes(nodes).await;
        }
        None => state.graph.remove_user(&entry.node, &user_key(id)),
    }
    state
        .events
        .emit("BLOCK_EXPORT_DELETED", Some(json!({"id": id})));
}

/// Removes every export (hard) and stops the server; waits until all are
/// gone. Used by `nbd-server-stop` and at shutdown.
pub async fn stop_server(state: &Arc<State>) -> bool {
    let (server, waits) = {
        let mut ex = state.exports.lock().await;
        let Some(server) = ex.server.take() else {
            return false;
        };
        ex.server = Some(server.clone());
        let ids: Vec<String> = ex.list.iter().map(|e| e.id.clone()).collect();
        let mut waits = Vec::new();
        for id in ids {
            if let Some(e) = ex.list.iter_mut().find(|e| e.id == id) {
                if !e.shutting_down {
                    e.shutting_down = true;
                    if let Ok(rx) = server.remove_export(&e.name, true) {
                        waits.push((id.clone(), Some(rx)));
                        continue;
                    }
                }
            }
            waits.push((id, None));
        }
        ex.server = None;
        (server, waits)
    };
    for (id, rx) in waits {
        if let Some(rx) = rx {
            let _ = rx.await;
            finish_removal(state, &id).await;
        }
    }
    server.stop().await;
    // Exports whose removal was already under way finish on their own tasks;
    // wait for the list to drain so callers see a clean state.
    for _ in 0..500 {
        if state.exports.lock().await.list.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}
