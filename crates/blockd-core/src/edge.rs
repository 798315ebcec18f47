//! Edges of the block graph (QEMU's `BdrvChild`), and who owns what.
//!
//! # Ownership, in one place
//!
//! ```text
//!   BlockGraph ──index (Arc)──► every named node
//!
//!   Root (backend, export, job) ──edge "root" (Arc<Child>)──► node
//!                                        ▲ parent: Weak<Root>
//!   BlockNode ──children (Arc<Children>)──► Child "file" ──(Arc)──► child node
//!        ▲                                     │ parent: Weak<BlockNode>
//!        └──────── parents: Weak<Child> ◄──────┘ (back-edge, on the child node)
//! ```
//!
//! * The [`crate::BlockGraph`] owns the nodes by name and decides every
//!   change: it links and unlinks edges, moves them between nodes and
//!   recomputes permissions, all-or-nothing.
//! * A node owns its children: a [`Children`] list of edges that the core
//!   holds and shares with the node's driver. A driver keeps [`ChildRef`]
//!   handles to read through, but never changes an edge: the core retargets
//!   an edge to another node ([`crate::BlockGraph::replace_node`], reopen)
//!   and the driver's next request follows it.
//! * An edge ([`Child`]) owns the node it points at, holds the permissions
//!   its parent takes on it, and knows its parent: a node or a root
//!   ([`Parent`]).
//! * A node knows its parents only through weak back-edges, so strong
//!   references always point down the graph and there are no cycles.
//! * A [`crate::Root`] owns one edge, named `root`, to its root node. Block
//!   backends (devices), exports and jobs each hold a root.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use crate::node::BlockNode;
use crate::perm::{ChildRole, PermPair};
use crate::root::Root;

/// The parent at the upper end of an edge.
#[derive(Clone)]
pub enum Parent {
    /// A node, through one of its children.
    Node(Weak<BlockNode>),
    /// A root (a backend, an export, a job).
    Root(Weak<Root>),
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Parent {
    /// How permission errors name the parent (QEMU's `get_parent_desc`):
    /// `node 'x'`, `block device 'd0'`, `an unnamed block device`, ...
    pub fn describe(&self) -> String {
        match self {
            Parent::Node(n) => match n.upgrade() {
                Some(n) => format!("node '{}'", n.name()),
                None => "a deleted node".to_string(),
            },
            Parent::Root(r) => match r.upgrade() {
                Some(r) => r.describe(),
                None => "a deleted block device".to_string(),
            },
        }
    }

    /// The parent node, if the parent is a live node.
    pub fn node(&self) -> Option<Arc<BlockNode>> {
        match self {
            Parent::Node(n) => n.upgrade(),
            Parent::Root(_) => None,
        }
    }

    /// The root, if the parent is a live root.
    pub fn root(&self) -> Option<Arc<Root>> {
        match self {
            Parent::Root(r) => r.upgrade(),
            Parent::Node(_) => None,
        }
    }
}

/// A child edge: a named role of a parent, pointing at a node the core may
/// replace. See the [module docs](self).
pub struct Child {
    name: String,
    role: ChildRole,
    node: RwLock<Arc<BlockNode>>,
    perm: Mutex<PermPair>,
    parent: OnceLock<Parent>,
    /// The child node was opened for this edge and takes its options from
    /// the parent (QEMU's `inherits_from`): a reopen of the parent reopens
    /// it too, with the options it did not set itself.
    inherits: bool,
}

/// Shared handle to a child edge.
pub type ChildRef = Arc<Child>;

impl Child {
    /// A new edge, not yet linked into the graph (the node does not list
    /// it as a parent until [`crate::BlockGraph`] links it).
    pub fn new(name: impl Into<String>, role: ChildRole, node: Arc<BlockNode>) -> ChildRef {
        Self::build(name.into(), role, node, false)
    }

    /// A new edge to a node opened for it, which inherits the parent's
    /// options (an inline child definition, an implicit backing file).
    pub fn new_inheriting(
        name: impl Into<String>,
        role: ChildRole,
        node: Arc<BlockNode>,
    ) -> ChildRef {
        Self::build(name.into(), role, node, true)
    }

    fn build(name: String, role: ChildRole, node: Arc<BlockNode>, inherits: bool) -> ChildRef {
        Arc::new(Child {
            name,
            role,
            node: RwLock::new(node),
            perm: Mutex::new(PermPair::FREE),
            parent: OnceLock::new(),
            inherits,
        })
    }

    /// The role name (`file`, `backing`, `image`, `root`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role flags.
    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// The node the edge points at now.
    pub fn node(&self) -> Arc<BlockNode> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the edge points at `node`.
    pub fn points_at(&self, node: &BlockNode) -> bool {
        std::ptr::eq(
            Arc::as_ptr(&self.node.read().unwrap_or_else(|e| e.into_inner())),
            node,
        )
    }

    /// The permissions the parent holds on the child through this edge.
    pub fn perm(&self) -> PermPair {
        *self.perm_lock()
    }

    fn perm_lock(&self) -> MutexGuard<'_, PermPair> {
        self.perm.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_perm(&self, p: PermPair) {
        *self.perm_lock() = p;
    }

    /// The parent, once the edge is linked.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.get()
    }

    /// Sets the parent (once: an edge never changes parents).
    pub(crate) fn set_parent(&self, p: Parent) {
        let _ = self.parent.set(p);
    }

    /// Whether the child node inherits its options from the parent.
    pub fn inherits(&self) -> bool {
        self.inherits
    }

    /// Points the edge at another node; returns the old one. Only the
    /// graph does this, with the back-edges and permissions.
    pub(crate) fn retarget(&self, node: Arc<BlockNode>) -> Arc<BlockNode> {
        std::mem::replace(
            &mut *self.node.write().unwrap_or_else(|e| e.into_inner()),
            node,
        )
    }

    /// How permission errors name the user of the child node:
    /// `node 'q' (uses node 'f' as 'file' child)`.
    pub fn describe_user(&self) -> String {
        let who = self
            .parent()
            .map(Parent::describe)
            .unwrap_or_else(|| "a new parent".to_string());
        format!(
            "{who} (uses node '{}' as '{}' child)",
            self.node().name(),
            self.name
        )
    }
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Child({} -> {})", self.name, self.node().name())
    }
}

/// The children of a node: held by the core, shared with the node's
/// driver (which may look a child up by name on its request path, e.g.
/// qcow2's `backing`). Changed only by the graph.
#[derive(Default)]
pub struct Children {
    list: RwLock<Vec<ChildRef>>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all().iter()).finish()
    }
}

impl Children {
    /// An empty list.
    pub fn new() -> Arc<Children> {
        Arc::new(Children::default())
    }

    /// Every child, in the order queries list them (primary first).
    pub fn all(&self) -> Vec<ChildRef> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The child edge named `name`.
    pub fn get(&self, name: &str) -> Option<ChildRef> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|c| c.name == name)
            .cloned()
    }

    /// The node of the child named `name`.
    pub fn node(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.get(name).map(|c| c.node())
    }

    /// The first (primary) child.
    pub fn first(&self) -> Option<ChildRef> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned()
    }

    /// Adds an edge while the node is being opened (not yet in the graph).
    pub fn push(&self, c: ChildRef) {
        self.list.write().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Replaces (or removes, with `None`) the edge named `name`, or adds
    /// `c` at the end; returns the edge that was there. Graph changes only.
    pub(crate) fn set(&self, name: &str, c: Option<ChildRef>) -> Option<ChildRef> {
        let mut l = self.list.write().unwrap_or_else(|e| e.into_inner());
        let pos = l.iter().position(|x| x.name == name);
        match (pos, c) {
            (Some(i), Some(c)) => Some(std::mem::replace(&mut l[i], c)),
            (Some(i), None) => Some(l.remove(i)),
            (None, Some(c)) => {
                l.push(c);
                None
            }
            (None, None) => None,
        }
    }
}
