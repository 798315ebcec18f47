//! One export: its fixed properties, its attached clients, and removal.
//!
//! A client attaches when it enters transmission (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`) and holds a [`ClientGuard`] that every request
//! task of the connection shares, so the export counts a client as gone
//! only when its connection and all its requests are finished. Removing
//! an export refuses new attachments at once; the removal waiters fire
//! when the count drops to zero.

use std::sync::{Arc, Mutex, MutexGuard};

use blockd_core::dirty::NamedBitmap;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::proto::{
    FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_FAST_ZERO,
    FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, MAX_BUFFER_SIZE,
    MAX_EXPORT_BITMAPS, MAX_STRING_SIZE,
};
use crate::{ExportConfig, ExportIo};

/// An export on the server.
pub(crate) struct Export {
    /// The export name.
    pub name: String,
    /// The description, if any.
    pub description: Option<String>,
    /// The I/O backend.
    pub io: Arc<dyn ExportIo>,
    /// Transmission flags common to every client.
    pub flags: u16,
    /// Whether `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
    /// The dirty bitmaps offered, in context id order.
    pub bitmaps: Vec<Arc<NamedBitmap>>,
    /// Cancelled to disconnect every client of this export (a child of the
    /// server's token).
    pub kill: CancellationToken,
    state: Mutex<ExportState>,
    /// Signalled whenever a client detaches.
    detached: Notify,
}

#[derive(Default)]
struct ExportState {
    clients: usize,
    removed: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

impl Export {
    /// Checks `cfg` and builds the export (`multi_conn`: the server allows
    /// more than one connection).
    pub fn new(
        cfg: ExportConfig,
        multi_conn: bool,
        kill: CancellationToken,
    ) -> Result<Export, String> {
        if cfg.name.len() > MAX_STRING_SIZE {
            return Err(format!("export name '{}' too long", cfg.name));
        }
        if let Some(d) = &cfg.description {
            if d.len() > MAX_STRING_SIZE {
                return Err(format!("description '{d}' too long"));
            }
        }
        if cfg.bitmaps.len() > MAX_EXPORT_BITMAPS {
            return Err(format!(
                "An export offers at most {MAX_EXPORT_BITMAPS} dirty bitmaps"
            ));
        }
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        if cfg.writable {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        } else {
            flags |= FLAG_READ_ONLY;
        }
        Ok(Export {
            name: cfg.name,
            description: cfg.description,
            io: cfg.io,
            flags,
            allocation_depth: cfg.allocation_depth,
            bitmaps: cfg.bitmaps,
            kill,
            state: Mutex::new(ExportState::default()),
            detached: Notify::new(),
        })
    }

    /// The size clients are told at negotiation: read from the I/O at
    /// every handshake (a backend's medium may have changed), in whole
    /// sectors as QEMU exports.
    pub fn size(&self) -> u64 {
        self.io.length() & !511
    }

    /// Whether the export accepts writes.
    pub fn writable(&self) -> bool {
        self.flags & FLAG_READ_ONLY == 0
    }

    /// The block sizes to advertise, sanitised: (minimum, preferred,
    /// maximum) with the minimum a power of two up to 64 KiB, the
    /// preferred a power of two at least the minimum, and the maximum a
    /// multiple of the minimum no larger than 32 MiB.
    pub fn block_limits(&self) -> (u32, u32, u32) {
        let (min, pref, max) = self.io.block_limits();
        let min = min.clamp(1, 64 << 10).next_power_of_two();
        let pref = if pref == 0 { 4096 } else { pref };
        let pref = pref.clamp(min, 32 << 20).next_power_of_two();
        let max = match max {
            0 => MAX_BUFFER_SIZE,
            m => m.min(MAX_BUFFER_SIZE),
        };
        let max = (max / min * min).max(min);
        (min, pref, max)
    }

    fn state(&self) -> MutexGuard<'_, ExportState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a client, unless the export is being removed.
    pub fn attach(self: &Arc<Self>) -> Option<ClientGuard> {
        let mut st = self.state();
        if st.removed {
            return None;
        }
        st.clients += 1;
        Some(ClientGuard {
            export: self.clone(),
        })
    }

    /// Number of attached clients.
    pub fn clients(&self) -> usize {
        self.state().clients
    }

    /// Waits up to `limit` for the export to have no clients; returns how
    /// many are left.
    pub async fn wait_unused(&self, limit: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let n = self.detached.notified();
            let left = self.clients();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return self.clients();
            }
        }
    }

    /// Marks the export removed (no new clients); with `hard`, disconnects
    /// its clients. The receiver fires when the last client is gone.
    pub fn remove(&self, hard: bool) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state();
            st.removed = true;
            if st.clients == 0 {
                let _ = tx.send(());
            } else {
                st.waiters.push(tx);
            }
        }
        if hard {
            self.kill.cancel();
        }
        rx
    }
}

/// An attached client; dropping the last clone detaches it.
pub(crate) struct ClientGuard {
    export: Arc<Export>,
}

impl ClientGuard {
    /// The export the client is attached to.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.export.state();
            st.clients -= 1;
            if st.clients == 0 && st.removed {
                std::mem::take(&mut st.waiters)
            } else {
                Vec::new()
            }
        };
        for w in waiters {
            let _ = w.send(());
        }
        self.export.detached.notify_waiters();
    }
}
