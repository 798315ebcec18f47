//! Opening a tree of nodes for `blockdev-add` (QEMU's `bdrv_open` with
//! inline children and references).
//!
//! 1. Check the whole tree before opening anything: node-names valid and
//!    unused, the root named, references resolvable, driver options sane.
//! 2. Open bottom-up: each driver opens its children through [`OpenCtx`],
//!    which opens inline definitions (inheriting the parent's read-only and
//!    cache options, as QEMU does) or resolves references.
//! 3. Insert the new nodes into the graph in one step (names and
//!    permissions checked again under the graph lock).
//!
//! If any step fails, every node opened so far is closed and the graph is
//! unchanged.
//!
//! A backing file that an image header names ([`OpenCtx::open_backing`]
//! without options) is opened by file name, through the implicit open
//! path ([`crate::implicit`]): its protocol node, a probe of its first
//! sector, its format node; the format node's options reference the
//! protocol node, which [`OpenCtx`] resolves from the nodes opened for it
//! (`preopened`) before looking in the graph. The name may be more than a
//! file name ([`crate::filename`]: an NBD URI is the protocol node; a
//! `json:` name with a driver is the whole backing node, opened as a
//! definition).

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use blockd_core::graph::check_node_name;
use blockd_core::throttle::ThrottleGroups;
use blockd_core::{
    BlockDriver, BlockError, BlockGraph, BlockNode, Child, ChildRef, ChildRole, Children,
    DetectZeroes, ExplicitOptions, NodeOptions,
};

use crate::filename::{NameSpec, Options};
use crate::options::{
    BlockdevOptions, BlockdevRef, BlockdevRefOrNull, DetectZeroesOpt, Discard, DriverOptions,
};

/// Longest backing chain opened implicitly (from image headers).
pub const MAX_BACKING_DEPTH: usize = 256;

/// Descriptor sets passed by the client (`add-fd`), for `/dev/fdset/N`.
pub trait FdSets: Send + Sync {
    /// A duplicate of a descriptor of set `set` whose access mode fits
    /// `writable`, as QEMU's `qemu_open` picks one.
    fn dup_for(&self, set: i64, writable: bool) -> Result<OwnedFd, BlockError>;
}

/// What opening needs from outside the graph.
#[derive(Clone, Default)]
pub struct Env {
    /// Descriptor sets, if the server has any.
    pub fdsets: Option<Arc<dyn FdSets>>,
    /// `--inline-writes off`: the `file` driver never writes on the
    /// calling thread without `RWF_NOWAIT` (see `file/inline.rs`).
    pub no_inline_writes: bool,
    /// Throttle groups (the `throttle` filter's `throttle-group`).
    pub throttle_groups: Option<Arc<ThrottleGroups>>,
    /// TLS credentials (the `nbd` driver's `tls-creds`).
    pub tls: Option<Arc<blockd_nbd::tls::TlsRegistry>>,
    /// `secret` objects (`rbd`'s `key-secret`).
    pub secrets: Option<Arc<dyn crate::secrets::Secrets>>,
    /// The descriptors the requesting monitor named with `getfd`, for
    /// the `nbd` driver's `server: {type: fd}` (QEMU's `socket_get_fd`
    /// looks them up in the current monitor). Set per command.
    pub named_fds: Option<Arc<dyn NamedFds>>,
}

/// A monitor's named descriptors (`getfd`).
pub trait NamedFds: Send + Sync {
    /// Takes the descriptor called `name` (QEMU's `monitor_get_fd`: the
    /// monitor no longer holds it afterwards).
    fn take(&self, name: &str) -> Option<OwnedFd>;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens children for a driver that is being opened.
pub struct OpenCtx<'a> {
    graph: &'a BlockGraph,
    env: &'a Env,
    /// The options of the node being opened (children inherit from them).
    pub node: NodeOptions,
    /// The node-name of the node being opened.
    pub node_name: String,
    /// The children of the node being opened, as the core will hold them
    /// (a driver that looks children up while it runs keeps this list).
    pub children: Arc<Children>,
    created: Arc<Mutex<Vec<Arc<BlockNode>>>>,
    /// Image files of the overlays above this node in an implicitly
    /// opened backing chain (loop and depth detection).
    backing_chain: Vec<String>,
    /// Nodes opened for this node before it (the protocol node of an
    /// image opened by file name), which its options name as references.
    preopened: Vec<Arc<BlockNode>>,
}

/// QEMU's `path_combine`: a relative backing file name is relative to the
/// overlay's directory.
pub fn resolve_backing_path(overlay: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match overlay.rfind('/') {
        Some(i) => format!("{}{name}", &overlay[..=i]),
        None => name.to_string(),
    }
}

fn canonical(path: &str) -> String {
    std::fs::canonicalize(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_string())
}

impl OpenCtx<'_> {
    /// The environment.
    pub fn env(&self) -> &Env {
        self.env
    }

    /// Opens (or resolves) the child `name` with `role`.
    pub async fn open_child(
        &mut self,
        name: &str,
        child: BlockdevRef,
        role: ChildRole,
    ) -> Result<ChildRef, BlockError> {
        let edge = match child {
            BlockdevRef::Reference(r) => {
                if let Some(node) = self.preopened.iter().find(|n| n.name() == r) {
                    // Opened for this node: it inherits, as QEMU's
                    // implicitly opened `file` does.
                    Child::new_inheriting(name, role, node.clone())
                } else {
                    let node = self.graph.get(&r).ok_or_else(|| {
                        BlockError::not_found(format!(
                            "Cannot find device='{r}' nor node-name='{r}'"
                        ))
                    })?;
                    Child::new(name, role, node)
                }
            }
            BlockdevRef::Definition(opts) => {
                let inherit = Inherit::from_parent(&self.node, role);
                let chain = self.backing_chain.clone();
                let node = open_node(
                    self.graph,
                    self.env,
                    *opts,
                    inherit,
                    self.created.clone(),
                    chain,
                    Vec::new(),
                )
                .await?;
                Child::new_inheriting(name, role, node)
            }
        };
        self.children.push(edge.clone());
        Ok(edge)
    }

    /// Opens the `backing` child of a format node with QEMU's rules:
    /// `spec` absent opens the chain the image header names (`name`,
    /// relative to the overlay file `overlay`, in format `format`, else
    /// probed), read-only and with generated node-names; `null` opens
    /// none; a reference or definition opens that node.
    pub async fn open_backing(
        &mut self,
        spec: Option<BlockdevRefOrNull>,
        name: Option<&str>,
        format: Option<&str>,
        overlay: &str,
    ) -> Result<Option<ChildRef>, BlockError> {
        let role = ChildRole::COW;
        let child = match spec {
            Some(BlockdevRefOrNull::Null(())) => return Ok(None),
            Some(BlockdevRefOrNull::Reference(r)) => BlockdevRef::Reference(r),
            Some(BlockdevRefOrNull::Definition(d)) => BlockdevRef::Definition(d),
            None => {
                let Some(name) = name.filter(|n| !n.is_empty()) else {
                    return Ok(None);
                };
                // QEMU's bdrv_make_absolute_filename: only a plain file
                // name is relative to the overlay's directory.
                let plain = crate::filename::is_plain_file(name);
                let path = if plain {
                    resolve_backing_path(overlay, name)
                } else {
                    name.to_string()
                };
                let mut chain = self.backing_chain.clone();
                chain.push(canonical(overlay));
                if plain && chain.contains(&canonical(&path)) {
                    return Err(BlockError::invalid(format!(
                        "Could not open backing file: the backing chain of '{overlay}' loops back to '{path}'"
                    )));
                }
                if chain.len() > MAX_BACKING_DEPTH {
                    return Err(BlockError::invalid(format!(
                        "Could not open backing file: the backing chain is deeper than {MAX_BACKING_DEPTH} images"
                    )));
                }
                let backing_err = |e: BlockError| BlockError {
                    msg: format!("Could not open backing file: {}", e.msg),
                    ..e
                };
                // The driver is looked up before anything is opened.
                if let Some(f) = format {
                    backing_options(f, "").map_err(backing_err)?;
                }
                // QEMU's bdrv_backing_options: the backing node is read-only
                // (and so never written, even when probing guessed raw),
                // over what it inherits from the overlay; its file
                // inherits from it.
                let inherit = Inherit::from_parent(&self.node, role);
                let tree = crate::implicit::Tree {
                    graph: self.graph,
                    env: self.env,
                    created: self.created.clone(),
                    backing_chain: chain,
                };
                let node = match crate::filename::resolve(&path, format).map_err(backing_err)? {
                    NameSpec::Layered { protocol, format } => {
                        let backing_node = NodeOptions {
                            read_only: true,
                            ..inherit.resolve()
                        };
                        // (The file is the format node's primary child, never
                        // its COW child: the only role that changes what a
                        // child inherits.)
                        let file_inherit = Inherit::from_parent(&backing_node, ChildRole::PRIMARY);
                        let request = crate::implicit::ImageRequest {
                            protocol: typed_options(protocol).map_err(backing_err)?,
                            format,
                        };
                        crate::implicit::open_image_in(
                            &tree,
                            file_inherit,
                            inherit,
                            request,
                            |fmt: &str, file: &BlockNode| backing_options(fmt, file.name()),
                        )
                        .await
                        .map_err(backing_err)?
                        .node
                    }
                    // A `json:` name with a driver: the whole backing node.
                    NameSpec::Node(mut opts) => {
                        opts.entry("read-only").or_insert(true.into());
                        let opts = typed_options(opts).map_err(backing_err)?;
                        check_tree(self.graph, &opts, &[], &mut HashSet::new())
                            .map_err(backing_err)?;
                        open_node(
                            tree.graph,
                            tree.env,
                            opts,
                            inherit,
                            tree.created.clone(),
                            tree.backing_chain.clone(),
                            Vec::new(),
                        )
                        .await
                        .map_err(backing_err)?
                    }
                };
                let edge = Child::new_inheriting("backing", role, node);
                self.children.push(edge.clone());
                return Ok(Some(edge));
            }
        };
        self.open_child("backing", child, role).await.map(Some)
    }
}

/// Typed options from a name's JSON options ([`crate::filename`]).
pub(crate) fn typed_options(opts: Options) -> Result<BlockdevOptions, BlockError> {
    serde_json::from_value(serde_json::Value::Object(opts))
        .map_err(|e| BlockError::invalid(format!("Invalid options: {e}")))
}

/// The options of a backing node opened from an image header: `format`
/// over the protocol node `file`, read-only. An unknown format is QEMU's
/// "Unknown driver 'FMT'".
fn backing_options(format: &str, file: &str) -> Result<BlockdevOptions, BlockError> {
    serde_json::from_value(serde_json::json!({
        "driver": format,
        "read-only": true,
        "file": file,
    }))
    .map_err(|_| BlockError::invalid(format!("Unknown driver '{format}'")))
}

/// Options a child takes from its parent unless it sets them itself.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Inherit {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    force_share: Option<bool>,
    discard_unmap: bool,
}

impl Inherit {
    pub(crate) fn from_parent(p: &NodeOptions, role: ChildRole) -> Inherit {
        Inherit {
            read_only: Some(p.read_only || role.has(ChildRole::COW)),
            auto_read_only: Some(p.auto_read_only && !role.has(ChildRole::COW)),
            direct: Some(p.cache_direct),
            no_flush: Some(p.cache_no_flush),
            force_share: Some(p.force_share),
            // Lower layers default to passing discards down; the parent's
            // own policy decides what reaches them.
            discard_unmap: true,
        }
    }

    /// The options of a node that sets none itself.
    pub(crate) fn resolve(self) -> NodeOptions {
        NodeOptions {
            read_only: self.read_only.unwrap_or(false),
            auto_read_only: self.auto_read_only.unwrap_or(false),
            detect_zeroes: DetectZeroes::Off,
            discard_unmap: self.discard_unmap,
            cache_direct: self.direct.unwrap_or(false),
            cache_no_flush: self.no_flush.unwrap_or(false),
            force_share: self.force_share.unwrap_or(false),
        }
    }
}

/// `blockdev-add`: checks, opens and inserts a tree; returns its root.
pub async fn blockdev_add(
    graph: &BlockGraph,
    env: &Env,
    opts: BlockdevOptions,
) -> Result<Arc<BlockNode>, BlockError> {
    if opts.node_name.is_none() {
        return Err(BlockError::invalid(
            "'node-name' must be specified for the root node",
        ));
    }
    open_tree(graph, env, opts, true).await
}

/// Opens a tree the monitor does not own (QEMU's `bdrv_open` for a
/// backend's medium: `--drive`, `blockdev-change-medium`): the root may be
/// unnamed (it gets a generated `#blockN` name) and leaves the graph when
/// its last user lets go of it ([`BlockGraph::release`]).
pub async fn open_implicit(
    graph: &BlockGraph,
    env: &Env,
    opts: BlockdevOptions,
) -> Result<Arc<BlockNode>, BlockError> {
    open_tree(graph, env, opts, false).await
}

/// Checks, opens and inserts a tree; `monitor_owned` says whether the
/// monitor holds the root (blockdev-add) or its users do.
async fn open_tree(
    graph: &BlockGraph,
    env: &Env,
    opts: BlockdevOptions,
    monitor_owned: bool,
) -> Result<Arc<BlockNode>, BlockError> {
    check_tree(graph, &opts, &[], &mut HashSet::new())?;
    let created = Arc::new(Mutex::new(Vec::new()));
    let opened = open_node(
        graph,
        env,
        opts,
        Inherit::default(),
        created.clone(),
        Vec::new(),
        Vec::new(),
    )
    .await;
    insert_opened(graph, created, opened, monitor_owned).await
}

/// The end of an open: inserts every node it `created` into the graph in
/// one step, with its root; if the open or the insertion failed, closes
/// them all instead.
pub(crate) async fn insert_opened(
    graph: &BlockGraph,
    created: Arc<Mutex<Vec<Arc<BlockNode>>>>,
    opened: Result<Arc<BlockNode>, BlockError>,
    monitor_owned: bool,
) -> Result<Arc<BlockNode>, BlockError> {
    let root = match opened {
        Ok(r) => r,
        Err(e) => {
            close_all(created).await;
            return Err(e);
        }
    };
    let nodes: Vec<Arc<BlockNode>> = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Err(e) = graph.insert(&nodes, &root, monitor_owned) {
        drop(root);
        close_all(created).await;
        return Err(e);
    }
    Ok(root)
}

async fn close_all(created: Arc<Mutex<Vec<Arc<BlockNode>>>>) {
    let nodes: Vec<Arc<BlockNode>> =
        std::mem::take(&mut *created.lock().unwrap_or_else(|e| e.into_inner()));
    for n in nodes.iter().rev() {
        if let Err(e) = n.close().await {
            tracing::warn!(node = n.name(), error = %e, "closing after a failed open");
        }
    }
}

/// Checks names, references and static driver options of a whole tree.
/// References may name graph nodes or the `pending` nodes (opened for the
/// tree's root, not yet in the graph).
pub(crate) fn check_tree(
    graph: &BlockGraph,
    opts: &BlockdevOptions,
    pending: &[Arc<BlockNode>],
    names: &mut HashSet<String>,
) -> Result<(), BlockError> {
    if let Some(n) = &opts.node_name {
        check_node_name(n)?;
        if graph.contains(n) || !names.insert(n.clone()) {
            return Err(BlockError::invalid(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
    }
    if opts.force_share == Some(true) && opts.read_only != Some(true) {
        return Err(BlockError::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }

    let mut check_ref = |r: &BlockdevRef| -> Result<(), BlockError> {
        match r {
            BlockdevRef::Reference(name) => {
                if graph.contains(name) || pending.iter().any(|n| n.name() == name) {
                    Ok(())
                } else {
                    Err(BlockError::not_found(format!(
                        "Cannot find device='{name}' nor node-name='{name}'"
                    )))
                }
            }
            BlockdevRef::Definition(d) => check_tree(graph, d, pending, names),
        }
    };
    match &opts.driver {
        DriverOptions::Raw(r) => {
            check_ref(&r.file)?;
            crate::raw::check(r)
        }
        DriverOptions::Blkdebug(b) => {
            check_ref(&b.image)?;
            crate::blkdebug::check(b)
        }
        DriverOptions::Null(n) => crate::null::check(n),
        DriverOptions::Nbd(n) => crate::nbd::check(n),
        DriverOptions::Throttle(t) => check_ref(&t.file),
        DriverOptions::Qcow2(q) => {
            check_ref(&q.file)?;
            match &q.backing {
                Some(BlockdevRefOrNull::Reference(r)) => {
                    check_ref(&BlockdevRef::Reference(r.clone()))?
                }
                Some(BlockdevRefOrNull::Definition(d)) => check_tree(graph, d, pending, names)?,
                _ => {}
            }
            crate::qcow2::check(q)
        }
        DriverOptions::File(f) => crate::file::check(f),
        DriverOptions::Rbd(_) => Ok(()),
    }
}

/// Which common options `opts` sets itself.
pub fn explicit_options(opts: &BlockdevOptions) -> ExplicitOptions {
    let cache = opts.cache.unwrap_or_default();
    ExplicitOptions {
        read_only: opts.read_only.is_some(),
        auto_read_only: opts.auto_read_only.is_some(),
        cache_direct: cache.direct.is_some(),
        cache_no_flush: cache.no_flush.is_some(),
        force_share: opts.force_share.is_some(),
        discard: opts.discard.is_some(),
    }
}

/// The options a child opened with its parent (an inline child, an
/// implicit backing file) gets when the parent's options become
/// `parent`: the inherited ones follow, the ones it set itself stay
/// (QEMU's `bdrv_reopen_queue_child` with a parent's options).
pub(crate) fn inherited_options(
    child: &BlockNode,
    parent: &NodeOptions,
    role: ChildRole,
) -> NodeOptions {
    let inh = Inherit::from_parent(parent, role);
    let ex = child.explicit_options();
    let cur = child.options();
    let pick = |explicit: bool, cur: bool, inherited: Option<bool>| {
        if explicit {
            cur
        } else {
            inherited.unwrap_or(cur)
        }
    };
    NodeOptions {
        read_only: pick(ex.read_only, cur.read_only, inh.read_only),
        auto_read_only: pick(ex.auto_read_only, cur.auto_read_only, inh.auto_read_only),
        cache_direct: pick(ex.cache_direct, cur.cache_direct, inh.direct),
        cache_no_flush: pick(ex.cache_no_flush, cur.cache_no_flush, inh.no_flush),
        ..cur
    }
}

/// The options of a node as recorded for a later reopen (QEMU's
/// `bs->options`): what was given, without absent members.
pub(crate) fn options_json(opts: &BlockdevOptions) -> serde_json::Value {
    fn strip(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, strip(v)))
                    .collect(),
            ),
            v => v,
        }
    }
    strip(serde_json::to_value(opts).unwrap_or_default())
}

pub(crate) fn node_options(opts: &BlockdevOptions, inherit: Inherit) -> NodeOptions {
    let cache = opts.cache.unwrap_or_default();
    let own = Inherit {
        read_only: opts.read_only.or(inherit.read_only),
        auto_read_only: opts.auto_read_only.or(inherit.auto_read_only),
        direct: cache.direct.or(inherit.direct),
        no_flush: cache.no_flush.or(inherit.no_flush),
        force_share: opts.force_share.or(inherit.force_share),
        discard_unmap: opts
            .discard
            .map_or(inherit.discard_unmap, |d| d == Discard::Unmap),
    };
    NodeOptions {
        detect_zeroes: match opts.detect_zeroes.unwrap_or_default() {
            DetectZeroesOpt::Off => DetectZeroes::Off,
            DetectZeroesOpt::On => DetectZeroes::On,
            DetectZeroesOpt::Unmap => DetectZeroes::Unmap,
        },
        ..own.resolve()
    }
}

/// Opens one node and (through its driver) its children; `preopened` are
/// nodes opened for it that its options reference.
pub(crate) fn open_node<'a>(
    graph: &'a BlockGraph,
    env: &'a Env,
    opts: BlockdevOptions,
    inherit: Inherit,
    created: Arc<Mutex<Vec<Arc<BlockNode>>>>,
    backing_chain: Vec<String>,
    preopened: Vec<Arc<BlockNode>>,
) -> BoxFuture<'a, Result<Arc<BlockNode>, BlockError>> {
    Box::pin(async move {
        let (name, auto) = match &opts.node_name {
            Some(n) => (n.clone(), false),
            None => (graph.auto_name(), true),
        };
        let mut nopts = node_options(&opts, inherit);
        if nopts.detect_zeroes == DetectZeroes::Unmap && !nopts.discard_unmap {
            return Err(BlockError::invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        let explicit = explicit_options(&opts);
        let json = options_json(&opts);
        let mut ctx = OpenCtx {
            graph,
            env,
            node: nopts,
            node_name: name.clone(),
            children: Children::new(),
            created: created.clone(),
            backing_chain,
            preopened,
        };
        let driver: Box<dyn BlockDriver> = match opts.driver {
            DriverOptions::File(f) => {
                let (d, ro) = crate::file::open(f, &ctx.node, env).await?;
                // auto-read-only may have fallen back to read-only.
                nopts.read_only = ro;
                Box::new(d)
            }
            DriverOptions::Null(n) => Box::new(crate::null::open(n)?),
            DriverOptions::Nbd(n) => {
                let (d, ro) = crate::nbd::open(n, &ctx.node, ctx.env()).await?;
                nopts.read_only = ro;
                Box::new(d)
            }
            DriverOptions::Raw(r) => Box::new(crate::raw::open(r, &mut ctx).await?),
            DriverOptions::Throttle(t) => Box::new(crate::throttle::open(t, &mut ctx).await?),
            DriverOptions::Blkdebug(b) => Box::new(crate::blkdebug::open(b, &mut ctx).await?),
            DriverOptions::Qcow2(q) => {
                let (d, ro) = crate::qcow2::open(q, &mut ctx).await?;
                nopts.read_only = ro;
                Box::new(d)
            }
            #[cfg(feature = "rbd")]
            DriverOptions::Rbd(r) => {
                let (d, ro) = crate::rbd::open(r, &ctx.node, env.secrets.clone()).await?;
                nopts.read_only = ro;
                Box::new(d)
            }
            // As QEMU without its rbd module.
            #[cfg(not(feature = "rbd"))]
            DriverOptions::Rbd(_) => {
                return Err(BlockError::invalid("Unknown driver 'rbd'"));
            }
        };
        let node = BlockNode::with_children(name, auto, nopts, explicit, driver, ctx.children);
        node.set_open_options(json);
        node.attach_persistent_bitmaps();
        created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(node.clone());
        Ok(node)
    })
}
