//! External snapshots: `blockdev-snapshot` and `blockdev-snapshot-sync`
//! (QEMU's `external_snapshot_action`, `_commit`, `_abort`, `_clean` in
//! `blockdev.c`), as transaction actions and as one-action commands.
//!
//! Prepare, in QEMU's order and with its messages: the node is looked up
//! and drained (until clean); it must not be busy; a writable node is
//! flushed. `blockdev-snapshot-sync` then checks the new node-name,
//! creates the image (unless `mode` is `existing`) with the node's file
//! and format as its backing file, and opens it without a backing node;
//! `blockdev-snapshot` looks the overlay up. The overlay must be unused
//! by readers, not a filter, without a backing node and able to have one.
//! Then it is appended ([`blockd_core::BlockGraph::append_overlay`]):
//! every user of the node moves to it.
//!
//! Commit makes the old node read-only. Abort takes the overlay off again,
//! closes an overlay the action opened and deletes an image file it
//! created (QEMU leaves the file). Clean ends the drained section and lets
//! go of an opened overlay that nothing uses.

use std::sync::Arc;

use blockd_core::blocker::BlockOp;
use blockd_core::{BlockNode, ControlGuard, DrainedSection, Perm};
use blockd_drivers::options::BlockdevOptions;
use blockd_qmp::{Ctx, Dispatcher, Empty};
use serde::Deserialize;
use serde_json::json;

use super::block::{close_nodes, qerr};
use super::blockjob::{busy, gen, lookup_bs, R};
use super::image::{create_image, CreatedImage, NewImage};
use super::transaction::{run_one, TxnAction, TxnFuture};
use crate::state::State;

/// `NewImageMode`.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub(super) enum NewImageMode {
    Existing,
    #[default]
    AbsolutePaths,
}

/// `BlockdevSnapshotSync`.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(super) struct BlockdevSnapshotSync {
    device: Option<String>,
    node_name: Option<String>,
    snapshot_file: String,
    snapshot_node_name: Option<String>,
    format: Option<String>,
    mode: Option<NewImageMode>,
}

/// `BlockdevSnapshot`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockdevSnapshot {
    node: String,
    overlay: String,
}

enum Kind {
    Node(BlockdevSnapshot),
    Sync(BlockdevSnapshotSync),
}

/// QEMU's `ExternalSnapshotState`.
pub(super) struct ExternalSnapshot {
    kind: Kind,
    old: Option<Arc<BlockNode>>,
    new: Option<Arc<BlockNode>>,
    drained: Option<DrainedSection>,
    /// The overlay was opened by this action (`-sync`).
    opened: bool,
    /// The image file this action created.
    created: Option<CreatedImage>,
    appended: bool,
}

impl ExternalSnapshot {
    fn new(kind: Kind) -> Self {
        ExternalSnapshot {
            kind,
            old: None,
            new: None,
            drained: None,
            opened: false,
            created: None,
            appended: false,
        }
    }

    /// A `blockdev-snapshot` action.
    pub(super) fn node(a: BlockdevSnapshot) -> Self {
        Self::new(Kind::Node(a))
    }

    /// A `blockdev-snapshot-sync` action.
    pub(super) fn sync(a: BlockdevSnapshotSync) -> Self {
        Self::new(Kind::Sync(a))
    }

    async fn do_prepare(&mut self, st: &State, g: &ControlGuard) -> R<()> {
        let (device, node_name) = match &self.kind {
            Kind::Node(s) => (Some(s.node.clone()), Some(s.node.clone())),
            Kind::Sync(s) => (s.device.clone(), s.node_name.clone()),
        };
        let old = lookup_bs(st, device.as_deref(), node_name.as_deref())?;
        self.old = Some(old.clone());
        self.drained = Some(st.graph.drained_begin(std::slice::from_ref(&old)).await);
        busy(&old, BlockOp::ExternalSnapshot)?;
        if !old.read_only() && old.flush().await.is_err() {
            return Err(gen("An IO error has occurred"));
        }
        let new = match &self.kind {
            Kind::Node(s) => lookup_bs(st, Some(&s.overlay), Some(&s.overlay))?,
            Kind::Sync(_) => {
                let new = self.open_new(st, &old, node_name.is_some()).await?;
                self.opened = true;
                new
            }
        };
        self.new = Some(new.clone());
        if new.cumulative_perm().perm.contains(Perm::CONSISTENT_READ) {
            return Err(gen("The overlay is already in use"));
        }
        if new.driver().is_filter() {
            return Err(gen("Filters cannot be used as overlays"));
        }
        if new.backing().is_some() {
            return Err(gen("The overlay already has a backing image"));
        }
        if !new.driver().supports_backing() {
            return Err(gen("The overlay does not support backing images"));
        }
        st.graph.append_overlay(g, &new, &old).await.map_err(qerr)?;
        self.appended = true;
        Ok(())
    }

    /// `blockdev-snapshot-sync`'s part: the new image, created and opened.
    async fn open_new(
        &mut self,
        st: &State,
        old: &Arc<BlockNode>,
        by_node_name: bool,
    ) -> R<Arc<BlockNode>> {
        let Kind::Sync(s) = &self.kind else {
            unreachable!("only -sync opens an image")
        };
        let format = s.format.as_deref().unwrap_or("qcow2");
        if by_node_name && s.snapshot_node_name.is_none() {
            return Err(gen("New overlay node-name missing"));
        }
        if let Some(n) = &s.snapshot_node_name {
            if st.graph.contains(n) || st.machine.backend_by_name(n).is_some() {
                return Err(gen("New overlay node-name already in use"));
            }
        }
        if s.mode.unwrap_or_default() != NewImageMode::Existing {
            let backing = old.filename();
            let img = NewImage {
                filename: &s.snapshot_file,
                format,
                backing: Some((&backing, old.driver().format_name())),
                size: old.length(),
            };
            self.created = Some(create_image(&st.graph, &st.env, &img).await.map_err(qerr)?);
        }
        let mut o = json!({
            "driver": format,
            "file": {"driver": "file", "filename": s.snapshot_file},
            "read-only": old.read_only(),
        });
        match format {
            "qcow2" => o["backing"] = serde_json::Value::Null,
            "raw" => {}
            "file" => {
                o = json!({"driver": "file", "filename": s.snapshot_file, "read-only": old.read_only()})
            }
            _ => return Err(gen(format!("Unknown driver '{format}'"))),
        }
        if let Some(n) = &s.snapshot_node_name {
            o["node-name"] = n.clone().into();
        }
        let opts: BlockdevOptions =
            serde_json::from_value(o).map_err(|e| gen(format!("internal error: {e}")))?;
        blockd_drivers::open_implicit(&st.graph, &st.env, opts)
            .await
            .map_err(qerr)
    }
}

impl TxnAction for ExternalSnapshot {
    fn prepare<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, R<()>> {
        Box::pin(self.do_prepare(st, g))
    }

    fn commit<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            // Each action reopens on its own: a failure here fails nothing.
            let Some(old) = &self.old else { return };
            if old.read_only() {
                return;
            }
            match blockd_drivers::reopen::set_read_only(&st.graph, g, old, true).await {
                Ok(nodes) => close_nodes(nodes).await,
                Err(e) => {
                    tracing::warn!(node = old.name(), error = %e, "snapshot: the old node stays read-write")
                }
            }
        })
    }

    fn abort<'a>(&'a mut self, st: &'a State, g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            if let (true, Some(new), Some(old)) = (self.appended, &self.new, &self.old) {
                if let Err(e) = st.graph.remove_overlay(g, new, old).await {
                    tracing::error!(node = new.name(), error = %e, "snapshot: taking the overlay off");
                }
                self.appended = false;
            }
            if self.opened {
                if let Some(new) = self.new.take() {
                    close_nodes(st.graph.release(&new)).await;
                }
                self.opened = false;
            }
            if let Some(c) = self.created.take() {
                c.discard();
            }
        })
    }

    fn clean<'a>(&'a mut self, st: &'a State, _g: &'a ControlGuard) -> TxnFuture<'a, ()> {
        Box::pin(async move {
            self.drained = None;
            // QEMU's bdrv_unref(new_bs): an overlay nobody took over goes.
            if self.opened {
                if let Some(new) = self.new.take() {
                    close_nodes(st.graph.release(&new)).await;
                }
            }
        })
    }
}

/// Registers `blockdev-snapshot` and `blockdev-snapshot-sync`.
pub fn register(d: &mut Dispatcher<State>) {
    d.register(
        "blockdev-snapshot",
        |cx: Ctx<State>, a: BlockdevSnapshot| async move {
            run_one(&cx.state, Box::new(ExternalSnapshot::node(a))).await?;
            R::Ok(Empty {})
        },
    );
    d.register(
        "blockdev-snapshot-sync",
        |cx: Ctx<State>, a: BlockdevSnapshotSync| async move {
            run_one(&cx.state, Box::new(ExternalSnapshot::sync(a))).await?;
            R::Ok(Empty {})
        },
    );
}
