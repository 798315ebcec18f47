//! The dirty bitmap commands' logic (QEMU's `block/monitor/bitmap-qmp-cmds.c`
//! and the bitmap actions of `blockdev.c`'s transactions), apart from the
//! QMP glue in `qmp/bitmap.rs`.
//!
//! Each change is two steps: a function that checks everything and makes
//! the change, returning a value that can undo it (`abort`) or make it
//! final (`commit`). A command runs both at once; a transaction can run
//! the first steps of all its actions and then commit or abort them all:
//!
//! * add: [`add`] → [`Added`]: abort releases the new bitmap.
//! * remove: [`remove_prepare`] → [`Removing`] (the bitmap is marked busy,
//!   still attached): commit releases it, abort unmarks it.
//! * clear: [`clear`] → [`Restore`] (a copy of the old bits): abort puts
//!   them back.
//! * enable/disable: [`set_enabled`] → [`Toggled`]: abort restores the
//!   old state.
//! * merge: [`merge`] → [`Restore`].

use std::sync::Arc;

use blockd_core::dirty::{default_granularity, Check, NamedBitmap};
use blockd_core::{BlockError, BlockNode};

use crate::state::State;

type R<T> = Result<T, BlockError>;

/// A node by node-name or by the name of a device backend with a medium
/// (QEMU's `bdrv_lookup_bs(name, name)`), with its error.
pub fn lookup_bs(st: &State, name: &str) -> R<Arc<BlockNode>> {
    if let Some(b) = st.machine.backend_by_name(name) {
        return b
            .root()
            .ok_or_else(|| BlockError::not_found(format!("Device '{name}' has no medium")));
    }
    st.graph.get(name).ok_or_else(|| {
        BlockError::not_found(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// A node's bitmap (QEMU's `block_dirty_bitmap_lookup`).
pub fn lookup(st: &State, node: &str, name: &str) -> R<(Arc<BlockNode>, Arc<NamedBitmap>)> {
    let bs = lookup_bs(st, node)
        .map_err(|_| BlockError::not_found(format!("Node '{node}' not found")))?;
    let bm = find(&bs, name)?;
    Ok((bs, bm))
}

/// A bitmap of `bs` by name, with QEMU's error.
pub fn find(bs: &BlockNode, name: &str) -> R<Arc<NamedBitmap>> {
    bs.dirty_bitmaps()
        .find(name)
        .ok_or_else(|| BlockError::not_found(format!("Dirty bitmap '{name}' not found")))
}

/// `block-dirty-bitmap-add`'s arguments.
pub struct AddArgs<'a> {
    /// Node or device name.
    pub node: &'a str,
    /// The new bitmap's name.
    pub name: &'a str,
    /// Bytes per bit (default: from the cluster size).
    pub granularity: Option<u64>,
    /// To be stored in the image.
    pub persistent: bool,
    /// Created not recording.
    pub disabled: bool,
}

/// An added bitmap; [`Added::abort`] takes it away again.
pub struct Added {
    node: Arc<BlockNode>,
    bitmap: Arc<NamedBitmap>,
}

impl Added {
    /// Undoes the add.
    pub fn abort(self) {
        self.node.dirty_bitmaps().release(&self.bitmap);
    }
}

/// The name QEMU's messages give a node: its device's if it is one's
/// medium (`bdrv_get_device_or_node_name`).
fn device_or_node_name(st: &State, bs: &Arc<BlockNode>) -> String {
    st.machine
        .listed_backends()
        .into_iter()
        .find(|b| !b.name().is_empty() && b.root().is_some_and(|r| Arc::ptr_eq(&r, bs)))
        .map(|b| b.name().to_string())
        .unwrap_or_else(|| bs.name().to_string())
}

/// Creates a bitmap (QEMU's `qmp_block_dirty_bitmap_add`).
pub fn add(st: &State, a: AddArgs<'_>) -> R<Added> {
    if a.name.is_empty() {
        return Err(BlockError::invalid("Bitmap name cannot be empty"));
    }
    let bs = lookup_bs(st, a.node)?;
    let granularity = match a.granularity {
        Some(g) if g < 512 || !g.is_power_of_two() => {
            return Err(BlockError::invalid(
                "Granularity must be power of 2 and at least 512",
            ))
        }
        Some(g) => g,
        None => default_granularity(bs.driver().info().cluster_size),
    };
    if a.persistent {
        // QEMU's bdrv_can_store_new_dirty_bitmap.
        let list = bs.dirty_bitmaps().list();
        let existing: Vec<&str> = list
            .iter()
            .filter(|b| b.persistent())
            .map(|b| b.name())
            .collect();
        bs.driver().can_store_new_bitmap(
            &device_or_node_name(st, &bs),
            a.name,
            granularity,
            &existing,
        )?;
    }
    let bitmap = bs
        .dirty_bitmaps()
        .create(a.name, granularity, bs.length())?;
    bitmap.set_enabled(!a.disabled);
    bitmap.set_persistent(a.persistent);
    Ok(Added { node: bs, bitmap })
}

/// A bitmap on its way out: busy until [`commit`](Removing::commit)
/// releases it or [`abort`](Removing::abort) gives it back.
pub struct Removing {
    node: Arc<BlockNode>,
    bitmap: Arc<NamedBitmap>,
}

impl Removing {
    /// Releases the bitmap.
    pub fn commit(self) {
        self.bitmap.set_busy(false);
        self.node.dirty_bitmaps().release(&self.bitmap);
    }

    /// Keeps the bitmap.
    pub fn abort(self) {
        self.bitmap.set_busy(false);
    }
}

/// Checks that a bitmap can be removed and marks it busy (QEMU's
/// `block_dirty_bitmap_remove` with `release` false, as the transaction
/// action's prepare calls it). A persistent bitmap is dropped from the
/// image here, as QEMU does (an abort keeps it in memory, persistent, so
/// the image gets it back when it is stored again).
pub async fn remove_prepare(st: &State, node: &str, name: &str) -> R<Removing> {
    let (bs, bm) = lookup(st, node, name)?;
    bm.check(Check::BUSY.or(Check::RO))?;
    bm.set_busy(true);
    if bm.persistent() {
        if let Err(e) = bs.driver().remove_persistent_bitmap(name).await {
            bm.set_busy(false);
            return Err(e);
        }
    }
    Ok(Removing {
        node: bs,
        bitmap: bm,
    })
}

/// The bits a bitmap had before a clear or merge; [`Restore::abort`]
/// puts them back (QEMU's `bdrv_restore_dirty_bitmap`).
pub struct Restore {
    bitmap: Arc<NamedBitmap>,
    words: Vec<u64>,
}

impl Restore {
    /// Undoes the change.
    pub fn abort(self) {
        self.bitmap.bits().restore(&self.words);
    }
}

/// Clears a bitmap (QEMU's `qmp_block_dirty_bitmap_clear`).
pub fn clear(st: &State, node: &str, name: &str) -> R<Restore> {
    let (_, bm) = lookup(st, node, name)?;
    bm.check(Check::DEFAULT)?;
    let words = bm.bits().snapshot();
    bm.bits().clear();
    Ok(Restore { bitmap: bm, words })
}

/// A recording state that was changed.
pub struct Toggled {
    bitmap: Arc<NamedBitmap>,
    was: bool,
}

impl Toggled {
    /// Undoes the change.
    pub fn abort(self) {
        self.bitmap.set_enabled(self.was);
    }
}

/// Starts or stops a bitmap recording (QEMU's
/// `qmp_block_dirty_bitmap_enable`/`_disable`).
pub fn set_enabled(st: &State, node: &str, name: &str, on: bool) -> R<Toggled> {
    let (_, bm) = lookup(st, node, name)?;
    bm.check(Check::ALLOW_RO)?;
    let was = bm.enabled();
    bm.set_enabled(on);
    Ok(Toggled { bitmap: bm, was })
}

/// A merge source: a bitmap of the target's node, or of another node.
pub enum Source {
    /// By name on the target's node.
    Local(String),
    /// On another node.
    External {
        /// Node or device name.
        node: String,
        /// Bitmap name.
        name: String,
    },
}

/// Merges `sources` into `target` (QEMU's `block_dirty_bitmap_merge`):
/// one source after the other, each checked when its turn comes; on an
/// error the target is as it was. An empty list is refused (it crashes
/// qemu-storage-daemon 10.0.2).
pub fn merge(st: &State, node: &str, target: &str, sources: &[Source]) -> R<Restore> {
    let (bs, dst) = lookup(st, node, target)?;
    if sources.is_empty() {
        return Err(BlockError::invalid(
            "block-dirty-bitmap-merge needs at least one bitmap in 'bitmaps'",
        ));
    }
    let backup = Restore {
        words: dst.bits().snapshot(),
        bitmap: dst.clone(),
    };
    let fail = |e: BlockError, backup: Restore| {
        backup.abort();
        Err(e)
    };
    for s in sources {
        let src = match s {
            Source::Local(name) => find(&bs, name),
            Source::External { node, name } => lookup(st, node, name).map(|(_, b)| b),
        };
        let src = match src {
            Ok(b) => b,
            Err(e) => return fail(e, backup),
        };
        // QEMU's bdrv_merge_dirty_bitmap.
        let checked = dst
            .check(Check::DEFAULT)
            .and_then(|()| src.check(Check::ALLOW_RO));
        if let Err(e) = checked {
            return fail(e, backup);
        }
        let (dl, sl) = (dst.bits().len(), src.bits().len());
        if dl != sl {
            return fail(
                BlockError::invalid(format!(
                    "Bitmaps are of different sizes (destination size is {dl}, source size is {sl}) and can't be merged"
                )),
                backup,
            );
        }
        dst.bits().merge_from(src.bits());
    }
    Ok(backup)
}

/// `x-debug-block-dirty-bitmap-sha256`.
pub fn sha256(st: &State, node: &str, name: &str) -> R<String> {
    let (_, bm) = lookup(st, node, name)?;
    Ok(bm.bits().sha256_hex())
}

/// The node a node's data falls through to: a filter's child or the
/// backing node (QEMU's `bdrv_filter_or_cow_bs`).
fn filter_or_cow(bs: &BlockNode) -> Option<Arc<BlockNode>> {
    if bs.driver().is_filter() {
        return bs.children().first().map(|c| c.node());
    }
    bs.backing()
}

/// The bitmaps an NBD export of `node` offers (QEMU's `nbd_export_create`):
/// a local name is looked for on the node and down its filter and backing
/// chain; a read-only export refuses a recording bitmap of a writable
/// node; a busy or inconsistent bitmap is refused. The caller marks them
/// busy once the export exists.
pub fn export_bitmaps(
    st: &State,
    node: &Arc<BlockNode>,
    sources: &[Source],
    readonly: bool,
) -> R<Vec<Arc<NamedBitmap>>> {
    let mut out = Vec::with_capacity(sources.len());
    for s in sources {
        let bm = match s {
            Source::Local(name) => {
                let mut cur = Some(node.clone());
                let mut found = None;
                while let Some(bs) = cur {
                    if let Some(bm) = bs.dirty_bitmaps().find(name) {
                        found = Some((bs, bm));
                        break;
                    }
                    cur = filter_or_cow(&bs);
                }
                let Some((bs, bm)) = found else {
                    return Err(BlockError::not_found(format!(
                        "Bitmap '{name}' is not found"
                    )));
                };
                if readonly && !bs.read_only() && bm.enabled() {
                    return Err(BlockError::invalid(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    )));
                }
                bm
            }
            Source::External { node, name } => lookup(st, node, name)?.1,
        };
        bm.check(Check::ALLOW_RO)?;
        out.push(bm);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_drivers::options::BlockdevOptions;
    use blockd_qmp::EventBus;
    use serde_json::{json, Value};

    async fn state_with_node() -> (State, Arc<BlockNode>) {
        let schema = crate::schema::load();
        let st = State::new(
            EventBus::new(schema),
            Value::Null,
            Value::Null,
            Value::Null,
            false,
        );
        let o: BlockdevOptions = serde_json::from_value(
            json!({"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        )
        .unwrap();
        let n = blockd_drivers::blockdev_add(&st.graph, &st.env, o)
            .await
            .unwrap();
        (st, n)
    }

    fn add_args(name: &str) -> AddArgs<'_> {
        AddArgs {
            node: "n0",
            name,
            granularity: Some(65536),
            persistent: false,
            disabled: false,
        }
    }

    /// Every step a transaction would abort leaves things as they were.
    #[tokio::test]
    async fn aborts_undo() {
        let (st, n) = state_with_node().await;
        let added = add(&st, add_args("a")).unwrap();
        added.abort();
        assert!(n.dirty_bitmaps().is_empty());

        add(&st, add_args("a")).unwrap();
        add(&st, add_args("b")).unwrap();
        n.write(0, bytes::Bytes::from(vec![1u8; 512]), Default::default())
            .await
            .unwrap();
        let a = find(&n, "a").unwrap();
        let b = find(&n, "b").unwrap();
        let sha = a.bits().sha256_hex();

        clear(&st, "n0", "a").unwrap().abort();
        assert_eq!(a.bits().sha256_hex(), sha);

        let t = set_enabled(&st, "n0", "a", false).unwrap();
        assert!(!a.enabled());
        t.abort();
        assert!(a.enabled());

        b.bits().set(65536 * 3, 1);
        merge(&st, "n0", "a", &[Source::Local("b".into())])
            .unwrap()
            .abort();
        assert_eq!(a.bits().sha256_hex(), sha);

        let r = remove_prepare(&st, "n0", "a").await.unwrap();
        assert!(a.busy());
        assert_eq!(
            clear(&st, "n0", "a").err().unwrap().msg,
            "Bitmap 'a' is currently in use by another operation and cannot be used"
        );
        r.abort();
        assert!(!a.busy());
        remove_prepare(&st, "n0", "a").await.unwrap().commit();
        assert!(n.dirty_bitmaps().find("a").is_none());
        assert_eq!(
            merge(&st, "n0", "b", &[]).err().unwrap().msg,
            "block-dirty-bitmap-merge needs at least one bitmap in 'bitmaps'"
        );
    }
}
