//! Walking backing chains (QEMU's `bdrv_filter_or_cow_bs`,
//! `bdrv_chain_contains`, `bdrv_find_overlay`, `bdrv_find_base`,
//! `bdrv_is_allocated_above`), for the block jobs.
//!
//! A chain goes down from a node through its backing child (a format
//! node) or, for a filter, through the child it filters. "Allocated" is a
//! node's own `block_status`: a range a layer holds itself, rather than
//! passing it to its backing file.

use std::io;
use std::sync::Arc;

use crate::edge::Parent;
use crate::node::BlockNode;

/// The next node down the chain: a filter's filtered child, else the
/// backing child (QEMU's `bdrv_filter_or_cow_bs`).
pub fn next(n: &BlockNode) -> Option<Arc<BlockNode>> {
    if n.driver().is_filter() {
        n.child_list().first().map(|c| c.node())
    } else {
        n.backing()
    }
}

/// `top` and the nodes below it, in order.
pub fn nodes(top: &Arc<BlockNode>) -> Vec<Arc<BlockNode>> {
    let mut v = vec![top.clone()];
    while let Some(n) = next(v.last().expect("not empty")) {
        if v.iter().any(|m| m.id() == n.id()) || v.len() > 4096 {
            break;
        }
        v.push(n);
    }
    v
}

/// The first node at or below `n` that is not a filter (QEMU's
/// `bdrv_skip_filters`).
pub fn skip_filters(n: &Arc<BlockNode>) -> Arc<BlockNode> {
    let mut cur = n.clone();
    while cur.driver().is_filter() {
        match next(&cur) {
            Some(c) => cur = c,
            None => break,
        }
    }
    cur
}

/// Whether `node` is `top` or below it in `top`'s chain.
pub fn contains(top: &Arc<BlockNode>, node: &BlockNode) -> bool {
    nodes(top).iter().any(|n| n.id() == node.id())
}

/// The node directly above `node` in `top`'s chain (QEMU's
/// `bdrv_find_overlay`), if `node` is in it below `top`.
pub fn overlay(top: &Arc<BlockNode>, node: &BlockNode) -> Option<Arc<BlockNode>> {
    let v = nodes(top);
    let i = v.iter().position(|n| n.id() == node.id())?;
    (i > 0).then(|| v[i - 1].clone())
}

/// The bottom of `top`'s chain (QEMU's `bdrv_find_base`).
pub fn base(top: &Arc<BlockNode>) -> Arc<BlockNode> {
    nodes(top).pop().expect("not empty")
}

/// Whether the node is a root: nothing but backends and exports use it
/// (QEMU's `bdrv_is_root_node`).
pub fn is_root_node(n: &BlockNode) -> bool {
    n.parents().iter().all(|e| {
        matches!(e.parent(), Some(Parent::Root(r))
            if r.upgrade().is_some_and(|r| r.job_type().is_none()))
    })
}

/// QEMU's `bdrv_find_backing_image`: the node below `top` whose overlay
/// records `name` as its backing file, or whose file name is `name`, or
/// (for names that are not URLs) whose file is the one `name` means
/// relative to the overlay's directory.
pub fn find_backing_image(top: &Arc<BlockNode>, name: &str) -> Option<Arc<BlockNode>> {
    let is_protocol = name.split_once(':').is_some_and(|(p, _)| !p.contains('/'));
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).ok();
    let mut cur = top.clone();
    while let Some(child) = cur.backing() {
        let recorded = cur.driver().info().backing_filename;
        if recorded.as_deref() == Some(name) || child.filename() == name {
            return Some(child);
        }
        if !is_protocol {
            let path = std::path::Path::new(name);
            let full = if path.is_absolute() {
                path.to_path_buf()
            } else {
                let overlay = cur.filename();
                let dir = std::path::Path::new(&overlay)
                    .parent()
                    .unwrap_or(std::path::Path::new(""));
                dir.join(path)
            };
            let want = canon(&full);
            if want.is_some() && want == canon(std::path::Path::new(&child.filename())) {
                return Some(child);
            }
        }
        cur = child;
    }
    None
}

/// QEMU's `bdrv_is_allocated_above`: whether any layer from `top` down to
/// `base` (excluded, unless `include_base`) holds the range at `offset`
/// itself, and for how many bytes (at most `len`) that answer holds.
/// Filters are looked through.
pub async fn is_allocated_above(
    top: &Arc<BlockNode>,
    base: Option<&BlockNode>,
    include_base: bool,
    offset: u64,
    len: u64,
) -> io::Result<(bool, u64)> {
    let mut n = len;
    let mut cur = Some(top.clone());
    while let Some(layer) = cur {
        let at_base = base.is_some_and(|b| b.id() == layer.id());
        if at_base && !include_base {
            break;
        }
        if !layer.driver().is_filter() {
            if offset >= layer.length() {
                // Beyond this layer's end it holds nothing; lower layers
                // might (a shorter overlay), keep looking.
            } else {
                let st = layer.block_status(offset, n).await?;
                if st.allocated {
                    return Ok((true, st.len.min(n)));
                }
                n = st.len.min(n);
            }
        }
        if at_base {
            break;
        }
        cur = next(&layer);
    }
    Ok((false, n))
}
