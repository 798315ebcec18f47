//! Permissions on graph edges, QEMU's model (`BLK_PERM_*`).
//!
//! Every user of a node (a parent node, a backend, an export, a job) holds
//! a set of permissions it needs (`perm`) and a set it lets other users
//! have (`shared`). A node's cumulative permissions are the union of its
//! users' `perm` and the intersection of their `shared`; two users conflict
//! when one needs what another does not share. The `file` driver mirrors
//! the cumulative permissions into byte-range locks on the image, at the
//! offsets QEMU uses, so the same rules hold between processes.

use std::fmt;

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(pub u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return consistent data.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Writes that may change the data.
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that leave the visible data unchanged (copy-on-read and the like).
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);
    /// Permissions passed through filters unchanged.
    pub const PASSTHROUGH: Perm = Perm(0x0f);

    /// The names, in QEMU's order (index = bit number), as `x-debug-query-block-graph` shows them.
    pub const NAMES: [&'static str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];

    /// Whether every permission in `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the sets share a permission.
    pub fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// The names QEMU's messages use (`bdrv_perm_names`), in the same
    /// order: `Permission conflict on node 'x': permissions 'consistent
    /// read, write' ...`.
    pub const MESSAGE_NAMES: [&'static str; 4] =
        ["consistent read", "write", "write unchanged", "resize"];

    /// The names of the permissions in the set.
    pub fn names(self) -> Vec<&'static str> {
        (0..4)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| Self::NAMES[b])
            .collect()
    }

    /// The permissions as QEMU's error messages list them
    /// (`bdrv_perm_names`): `consistent read, write unchanged`.
    pub fn message_names(self) -> String {
        (0..4)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| Self::MESSAGE_NAMES[b])
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl std::ops::BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl std::ops::Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm{:?}", self.names())
    }
}

/// A user's permissions on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermPair {
    /// What the user needs.
    pub perm: Perm,
    /// What it lets others have.
    pub shared: Perm,
}

impl PermPair {
    /// Needs nothing, shares everything.
    pub const FREE: PermPair = PermPair {
        perm: Perm::NONE,
        shared: Perm::ALL,
    };
}

/// The role of a child edge, QEMU's `BdrvChildRole` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildRole(pub u8);

impl ChildRole {
    /// The child holds guest-visible data.
    pub const DATA: ChildRole = ChildRole(0x01);
    /// The child holds format metadata.
    pub const METADATA: ChildRole = ChildRole(0x02);
    /// The child is a filter's target.
    pub const FILTERED: ChildRole = ChildRole(0x04);
    /// The child is the backing (copy-on-write source).
    pub const COW: ChildRole = ChildRole(0x08);
    /// The child is the node's primary child.
    pub const PRIMARY: ChildRole = ChildRole(0x10);

    /// Whether the role includes all of `other`.
    pub fn has(self, other: ChildRole) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ChildRole {
    type Output = ChildRole;
    fn bitor(self, o: ChildRole) -> ChildRole {
        ChildRole(self.0 | o.0)
    }
}

/// A filter passes its parents' permissions through.
pub fn filter_default(parent: PermPair) -> PermPair {
    PermPair {
        perm: parent.perm & Perm::PASSTHROUGH,
        shared: (parent.shared & Perm::PASSTHROUGH) | !Perm::PASSTHROUGH,
    }
}

/// QEMU's default permissions of a format node on its storage child
/// (`bdrv_default_perms_for_storage`): metadata must stay consistent and
/// nobody else may write or resize it; a writable node may write it.
pub fn storage_default(parent: PermPair, role: ChildRole, node_writable: bool) -> PermPair {
    let PermPair {
        mut perm,
        mut shared,
    } = filter_default(parent);
    if role.has(ChildRole::METADATA) {
        if node_writable {
            perm = perm | Perm::WRITE | Perm::RESIZE;
        }
        perm = perm | Perm::CONSISTENT_READ;
        shared = shared & !(Perm::WRITE | Perm::RESIZE);
    }
    if role.has(ChildRole::DATA) {
        shared = shared & !Perm::RESIZE;
        if perm.contains(Perm::WRITE_UNCHANGED) {
            perm = perm | Perm::WRITE;
        }
        if perm.contains(Perm::WRITE) {
            perm = perm | Perm::RESIZE;
        }
    }
    PermPair { perm, shared }
}

/// QEMU's default permissions of a node on its backing child
/// (`bdrv_default_perms_for_cow`): consistent reads if the parents read,
/// nothing else; others may always read and write unchanged data, and may
/// write and resize if the parents put up with changing data.
pub fn cow_default(parent: PermPair) -> PermPair {
    let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
    if parent.shared.contains(Perm::WRITE) {
        shared = shared | Perm::WRITE | Perm::RESIZE;
    }
    PermPair {
        perm: parent.perm & Perm::CONSISTENT_READ,
        shared,
    }
}

/// QEMU's `bdrv_default_perms`: filters pass through, backing children
/// are read-only, storage children follow [`storage_default`].
pub fn default_perms(role: ChildRole, parent: PermPair, node_writable: bool) -> PermPair {
    if role.has(ChildRole::FILTERED) {
        filter_default(parent)
    } else if role.has(ChildRole::COW) {
        cow_default(parent)
    } else {
        storage_default(parent, role, node_writable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_child_of_writable_format_takes_write_and_unshares_it() {
        let p = storage_default(PermPair::FREE, ChildRole::DATA | ChildRole::METADATA, true);
        assert!(p
            .perm
            .contains(Perm::WRITE | Perm::RESIZE | Perm::CONSISTENT_READ));
        assert!(!p.shared.intersects(Perm::WRITE | Perm::RESIZE));
        let ro = storage_default(PermPair::FREE, ChildRole::DATA | ChildRole::METADATA, false);
        assert!(!ro.perm.intersects(Perm::WRITE));
        assert!(!ro.shared.intersects(Perm::WRITE));
    }

    #[test]
    fn filter_passes_through() {
        let parent = PermPair {
            perm: Perm::WRITE | Perm::CONSISTENT_READ,
            shared: Perm::CONSISTENT_READ,
        };
        assert_eq!(filter_default(parent), parent);
        assert_eq!(filter_default(PermPair::FREE), PermPair::FREE);
    }

    #[test]
    fn names() {
        assert_eq!(
            (Perm::CONSISTENT_READ | Perm::RESIZE).names(),
            vec!["consistent-read", "resize"]
        );
        assert_eq!(!Perm::WRITE, Perm(0x0d));
        assert_eq!(
            (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE).message_names(),
            "consistent read, write unchanged, resize"
        );
    }
}
