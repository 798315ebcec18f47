//! Block exports: the NBD server and the exports on it (QEMU's
//! `block/export/export.c` and `blockdev-nbd.c`).
//!
//! Every export does its I/O through a block backend, and every export
//! request takes the same path ([`BackendIo`]): an export of a node gets a
//! backend of its own ([`BlockBackend::new_export`], QEMU's
//! `BlockExport.blk`), whose root is a user of the node (holding
//! `consistent-read`, and `write` if writable, sharing all but `resize`, as
//! QEMU's exports do), so the node cannot be deleted while exported, and a
//! graph change can move the export to another node under its clients.
//! `nbd-server-add` of a backend name exports that backend itself: the
//! export is its front end (run state, medium and tray, accounting, error
//! policy apply). Writethrough is the root's write cache turned off (every
//! write carries FUA), as QEMU does; an export of a device backend adds FUA
//! itself, leaving the device's cache mode alone.
//!
//! Every [`WRITEBACK_BYTES`] written through an export, writeback of the
//! node's data starts in the background (`start_writeback`, as the mirror
//! does for its target): a disk filled over NBD, such as a migration's
//! destination, then has little left for the client's final flush, which
//! would otherwise write all of it back at once. QEMU leaves writeback to
//! the kernel.
//!
//! Deleting an export stops new clients at once; `BLOCK_EXPORT_DELETED` is
//! sent when its last client is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use blockd_core::{BlockBackend, BlockStatus, IoFuture, Perm, PermPair, ReqFlags};
use blockd_nbd::{ExportIo, NbdServer};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::events::BlockExportDeleted;
use crate::state::State;

/// Bytes written through an export between two writeback starts.
pub const WRITEBACK_BYTES: u64 = 64 << 20;

/// The one export I/O path: requests through a backend.
pub struct BackendIo {
    blk: Arc<BlockBackend>,
    fua: bool,
    /// Bytes written since the last writeback start.
    unwritten: AtomicU64,
    /// Whether a writeback start is in flight.
    writeback: Arc<AtomicBool>,
}

impl BackendIo {
    /// I/O through `blk`; with `fua`, every write carries FUA (an export
    /// of a device backend with `writethrough`).
    pub fn new(blk: Arc<BlockBackend>, fua: bool) -> Self {
        BackendIo {
            blk,
            fua,
            unwritten: AtomicU64::new(0),
            writeback: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts `n` written bytes; past [`WRITEBACK_BYTES`], starts
    /// writeback in the background unless one is in flight.
    fn written(&self, n: u64) {
        let total = self.unwritten.fetch_add(n, Ordering::Relaxed) + n;
        if total < WRITEBACK_BYTES || self.writeback.swap(true, Ordering::AcqRel) {
            return;
        }
        self.unwritten.store(0, Ordering::Relaxed);
        let (blk, busy) = (self.blk.clone(), self.writeback.clone());
        tokio::spawn(async move {
            // Errors show at the next flush, which reports them.
            let _ = blk.start_writeback().await;
            busy.store(false, Ordering::Release);
        });
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.blk
    }
}

impl ExportIo for BackendIo {
    fn length(&self) -> u64 {
        self.blk.length()
    }

    fn block_limits(&self) -> (u32, u32, u32) {
        let (min, max) = match self.blk.root() {
            Some(n) => {
                let l = n.driver().limits();
                (l.request_alignment.max(1), l.max_transfer)
            }
            None => (1, 0),
        };
        let max = match max {
            0 => 32 << 20,
            m => m.min(32 << 20),
        };
        (min, min.max(4096), max)
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.blk.read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let flags = ReqFlags {
            fua: fua || self.fua,
            ..ReqFlags::default()
        };
        Box::pin(async move {
            let n = data.len() as u64;
            self.blk.write(offset, data, flags).await?;
            if !flags.fua {
                self.written(n);
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
        let flags = ReqFlags {
            fua: fua || self.fua,
            may_unmap,
            no_fallback: fast_only,
        };
        Box::pin(self.blk.write_zeroes(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blk.discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.blk.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.blk.block_status(offset, len))
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> IoFuture<'_, (u64, u32)> {
        Box::pin(self.blk.allocation_depth(offset, len))
    }
}

/// One export.
pub struct ExportEntry {
    /// The export id.
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// The backend the export's I/O goes through.
    pub blk: Arc<BlockBackend>,
    /// Whether `blk` is the export's own (an export of a node) rather
    /// than a device backend (`nbd-server-add` of a backend name).
    pub own: bool,
    /// Deletion was requested; waiting for clients to go.
    pub shutting_down: bool,
    /// The dirty bitmaps it offers, busy until it is gone.
    pub bitmaps: Vec<Arc<blockd_core::dirty::NamedBitmap>>,
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
                    let node = e
                        .blk
                        .root()
                        .map(|n| n.name().to_string())
                        .unwrap_or_default();
                    json!({"id": e.id, "type": "nbd", "node-name": node,
                           "shutting-down": e.shutting_down})
                })
                .collect(),
        )
    }
}

/// The permissions an export takes on its node (QEMU's `blk_exp_add`:
/// everything but `resize` is shared).
pub fn export_perm(writable: bool) -> PermPair {
    PermPair {
        perm: if writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        },
        shared: Perm::ALL & !Perm::RESIZE,
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
    release_backend(state, &entry).await;
    state
        .events
        .send(&BlockExportDeleted { id: id.to_string() });
}

/// Lets go of an export's backend: its own leaves its node; a device
/// backend loses an export reference (and, if it was deleted meanwhile,
/// its medium).
pub async fn release_backend(state: &Arc<State>, e: &ExportEntry) {
    for b in &e.bitmaps {
        b.set_busy(false);
    }
    if e.own {
        // One synchronous graph step (the graph's own lock orders it with
        // other changes); no drained section needed. A node nobody else
        // holds (an overlay a snapshot opened) goes with it, as QEMU's
        // last bdrv_unref.
        if let Some(node) = e.blk.remove(&state.graph) {
            crate::machine::close_nodes(state.graph.release(&node)).await;
        }
    } else {
        let nodes = state.machine.export_unref(&state.graph, &e.blk);
        crate::machine::close_nodes(nodes).await;
    }
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
