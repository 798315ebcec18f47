//! The QOM composition tree as `qom-list`, `qom-get` and `qom-set` see it
//! (QEMU's `qom/qom-qmp-cmds.c`: `qmp_qom_list`, `qmp_qom_get`,
//! `qmp_qom_set`; paths resolved as `object_resolve_path` does in
//! `qom/object.c`).
//!
//! ```text
//!  /            container
//!  ├── backend  container (empty)
//!  ├── objects  container: the objects of object-add / --object
//!  │   ├── tg0  throttle-group
//!  │   └── io0  iothread
//!  └── chardevs container (empty: blockd's monitors are not chardevs)
//! ```
//!
//! A path that starts with `/` is absolute: each component names a child
//! (empty components are skipped). Any other path is partial: it must
//! match the end of exactly one absolute path (`Path 'x' is ambiguous`
//! otherwise, for `qom-list`; `qom-get` and `qom-set` then say the device
//! is not found). The children of `/objects` are listed in the order
//! QEMU's hash table gives them ([`ghash`]).
//!
//! Errors are plain; the QMP handler picks the class.

pub mod ghash;
pub mod types;

use serde_json::Value;

use crate::objects::Objects;

/// The root's child containers, in qemu-storage-daemon's listing order.
const ROOT_CHILDREN: [&str; 3] = ["backend", "objects", "chardevs"];

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// `/`.
    Root,
    /// `/backend`, `/objects` or `/chardevs`.
    Container(&'static str),
    /// `/objects/ID`.
    Object(String),
}

/// Why a QOM command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QomError {
    /// No object at this path (QEMU: `Device '%s' not found`).
    NotFound(String),
    /// A partial path that matches several objects (`qom-list` only).
    Ambiguous(String),
    /// No such type (`qom-list-properties`).
    ClassNotFound(String),
    /// Anything else, with QEMU's message.
    Other(String),
}

impl std::fmt::Display for QomError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QomError::NotFound(p) => write!(f, "Device '{p}' not found"),
            QomError::Ambiguous(p) => write!(f, "Path '{p}' is ambiguous"),
            QomError::ClassNotFound(t) => write!(f, "Class '{t}' not found"),
            QomError::Other(m) => f.write_str(m),
        }
    }
}

impl From<String> for QomError {
    fn from(m: String) -> Self {
        QomError::Other(m)
    }
}

/// A snapshot of the tree's shape: the ids of `/objects` with their
/// types, in listing order.
struct Tree {
    objects: Vec<(String, &'static str)>,
}

impl Tree {
    fn children(&self, n: &Node) -> Vec<Node> {
        match n {
            Node::Root => ROOT_CHILDREN.iter().map(|c| Node::Container(c)).collect(),
            Node::Container("objects") => self
                .objects
                .iter()
                .map(|(id, _)| Node::Object(id.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `object_resolve_path_component`: the child called `name`.
    fn child(&self, n: &Node, name: &str) -> Option<Node> {
        self.children(n).into_iter().find(|c| match c {
            Node::Container(c) => *c == name,
            Node::Object(id) => id == name,
            Node::Root => false,
        })
    }

    /// `object_resolve_abs_path`.
    fn abs(&self, from: &Node, parts: &[&str]) -> Option<Node> {
        let mut cur = from.clone();
        for p in parts.iter().filter(|p| !p.is_empty()) {
            cur = self.child(&cur, p)?;
        }
        Some(cur)
    }

    /// `object_resolve_partial_path`: `Err(())` when ambiguous.
    fn partial(&self, from: &Node, parts: &[&str]) -> Result<Option<Node>, ()> {
        let mut found = self.abs(from, parts);
        for c in self.children(from) {
            if let Some(f) = self.partial(&c, parts)? {
                if found.is_some() {
                    return Err(());
                }
                found = Some(f);
            }
        }
        Ok(found)
    }

    /// `object_resolve_path`.
    fn resolve(&self, path: &str) -> Result<Option<Node>, ()> {
        match path.strip_prefix('/') {
            Some(rest) => Ok(self.abs(&Node::Root, &rest.split('/').collect::<Vec<_>>())),
            None if path.is_empty() => self.partial(&Node::Root, &[]),
            None => self.partial(&Node::Root, &path.split('/').collect::<Vec<_>>()),
        }
    }
}

fn tree(objs: &Objects) -> Tree {
    Tree {
        objects: objs.listed(),
    }
}

/// Resolves `path` for `qom-get`/`qom-set` (ambiguous is not found).
fn find(objs: &Objects, path: &str) -> Result<Node, QomError> {
    match tree(objs).resolve(path) {
        Ok(Some(n)) => Ok(n),
        _ => Err(QomError::NotFound(path.to_string())),
    }
}

/// `qom-list`: the properties of the object at `path` (name, type).
pub fn list(objs: &Objects, path: &str) -> Result<Vec<(String, String)>, QomError> {
    let t = tree(objs);
    let node = match t.resolve(path) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(QomError::NotFound(path.to_string())),
        Err(()) => return Err(QomError::Ambiguous(path.to_string())),
    };
    let mut v = vec![("type".to_string(), "string".to_string())];
    match &node {
        Node::Root => v.extend(
            ROOT_CHILDREN
                .iter()
                .map(|c| (c.to_string(), "child<container>".to_string())),
        ),
        Node::Container("objects") => v.extend(
            t.objects
                .iter()
                .map(|(id, ty)| (id.clone(), format!("child<{ty}>"))),
        ),
        Node::Container(_) => {}
        Node::Object(id) => {
            let ty = t.objects.iter().find(|o| &o.0 == id).map_or("", |o| o.1);
            v = types::properties(ty)
                .unwrap_or_default()
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect();
        }
    }
    Ok(v)
}

/// The canonical path of a container's child.
fn child_path(parent: &Node, name: &str) -> String {
    match parent {
        Node::Root => format!("/{name}"),
        Node::Container(c) => format!("/{c}/{name}"),
        Node::Object(id) => format!("/objects/{id}/{name}"),
    }
}

/// `qom-get`.
pub fn get(objs: &Objects, path: &str, prop: &str) -> Result<Value, QomError> {
    let node = find(objs, path)?;
    match &node {
        Node::Object(id) => Ok(objs.with(id, |o| o.get(prop))??),
        _ => {
            if prop == "type" {
                return Ok("container".into());
            }
            if tree(objs).child(&node, prop).is_some() {
                return Ok(child_path(&node, prop).into());
            }
            Err(format!("Property 'container.{prop}' not found").into())
        }
    }
}

/// `qom-set`.
pub fn set(objs: &Objects, path: &str, prop: &str, value: &Value) -> Result<(), QomError> {
    let node = find(objs, path)?;
    match &node {
        Node::Object(id) => Ok(objs.with(id, |o| o.set(prop, value))??),
        _ => {
            if prop == "type" || tree(objs).child(&node, prop).is_some() {
                return Err(format!("Property 'container.{prop}' is not writable").into());
            }
            Err(format!("Property 'container.{prop}' not found").into())
        }
    }
}

/// `qom-list-properties`: the properties of a type.
pub fn type_properties(typename: &str) -> Result<Vec<(String, String)>, QomError> {
    let Some(t) = types::lookup(typename) else {
        return Err(QomError::ClassNotFound(typename.to_string()));
    };
    match types::properties(t.name) {
        Some(p) => Ok(p
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()),
        None => Err("Parameter 'typename' expects a QOM type".to_string().into()),
    }
}

#[cfg(test)]
mod tests;
