//! The QOM types blockd has (QEMU's `TypeInfo` registrations in
//! `qom/object.c`, `qom/container.c`, `qom/object_interfaces.c`,
//! `event-loop-base.c`, `iothread.c`, `block/throttle-groups.c`,
//! `authz/*.c`, `crypto/tlscreds*.c`) and the
//! filters of `qom-list-types` (`object_class_get_list`,
//! `object_class_foreach_tramp`, `object_class_dynamic_cast`).
//!
//! ```text
//!  object (abstract)            interface (abstract)
//!  ├── container                └── user-creatable (abstract)
//!  ├── event-loop-base (abstract, user-creatable)
//!  │   └── iothread
//!  ├── throttle-group (user-creatable)
//!  ├── secret_common (abstract, user-creatable)
//!  │   └── secret
//!  ├── authz (abstract)
//!  │   ├── authz-simple (user-creatable)
//!  │   └── authz-list (user-creatable)
//!  └── tls-creds (abstract)
//!      └── tls-creds-x509 (user-creatable)
//! ```
//!
//! The table keeps the order in which qemu-storage-daemon 10.0.2 lists
//! these types (its type table's hash order, restricted to blockd's).

/// One QOM type.
#[derive(Debug, Clone, Copy)]
pub struct TypeInfo {
    /// Its name.
    pub name: &'static str,
    /// Its parent, if any (`object` and `interface` have none).
    pub parent: Option<&'static str>,
    /// Whether it is abstract (no instance can be made).
    pub is_abstract: bool,
    /// The interfaces it implements itself.
    pub interfaces: &'static [&'static str],
    /// Whether it is an interface type.
    pub is_interface: bool,
}

const fn ty(
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    interfaces: &'static [&'static str],
) -> TypeInfo {
    TypeInfo {
        name,
        parent,
        is_abstract,
        interfaces,
        is_interface: false,
    }
}

/// blockd's types, in qemu-storage-daemon's listing order.
pub const TYPES: [TypeInfo; 14] = [
    ty("authz-simple", Some("authz"), false, &["user-creatable"]),
    ty("secret_common", Some("object"), true, &["user-creatable"]),
    ty("container", Some("object"), false, &[]),
    TypeInfo {
        is_interface: true,
        ..ty("interface", None, true, &[])
    },
    ty("iothread", Some("event-loop-base"), false, &[]),
    ty("secret", Some("secret_common"), false, &[]),
    ty("authz", Some("object"), true, &[]),
    ty("tls-creds", Some("object"), true, &[]),
    ty("authz-list", Some("authz"), false, &["user-creatable"]),
    ty("event-loop-base", Some("object"), true, &["user-creatable"]),
    TypeInfo {
        is_interface: true,
        ..ty("user-creatable", Some("interface"), true, &[])
    },
    ty("object", None, true, &[]),
    ty(
        "tls-creds-x509",
        Some("tls-creds"),
        false,
        &["user-creatable"],
    ),
    ty("throttle-group", Some("object"), false, &["user-creatable"]),
];

/// The type called `name`.
pub fn lookup(name: &str) -> Option<&'static TypeInfo> {
    TYPES.iter().find(|t| t.name == name)
}

/// Whether an object of type `t` can be cast to `target`
/// (`object_class_dynamic_cast`): `target` is `t`, one of its ancestors,
/// or an interface that one of them implements (or an ancestor of one).
pub fn implements(t: &TypeInfo, target: &str) -> bool {
    let mut cur = Some(t);
    while let Some(c) = cur {
        if c.name == target
            || c.interfaces
                .iter()
                .any(|i| lookup(i).is_some_and(|i| implements(i, target)))
        {
            return true;
        }
        cur = c.parent.and_then(lookup);
    }
    false
}

/// `qom-list-types`: the types that implement `implements` (all when
/// absent), abstract ones only if `include_abstract`.
pub fn list(implements_type: Option<&str>, include_abstract: bool) -> Vec<&'static TypeInfo> {
    TYPES
        .iter()
        .filter(|t| include_abstract || !t.is_abstract)
        .filter(|t| implements_type.is_none_or(|i| implements(t, i)))
        .collect()
}

/// The properties of a type as `qom-list-properties` and `qom-list` show
/// them (name and type), in qemu-storage-daemon's order: the instance's
/// own first, then its class's, then its ancestors' (QEMU's
/// `object_property_iter_next`), reversed by the listing.
pub fn properties(name: &str) -> Option<&'static [(&'static str, &'static str)]> {
    const TYPE: (&str, &str) = ("type", "string");
    Some(match name {
        "object" | "container" | "authz" => &[TYPE],
        "authz-simple" => &[TYPE, ("identity", "string")],
        "authz-list" => &[
            TYPE,
            ("policy", "QAuthZListPolicy"),
            ("rules", "QAuthZListRule"),
        ],
        "tls-creds" => &[
            TYPE,
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
        ],
        "tls-creds-x509" => &[
            TYPE,
            ("endpoint", "QCryptoTLSCredsEndpoint"),
            ("dir", "string"),
            ("verify-peer", "bool"),
            ("priority", "string"),
            ("sanity-check", "bool"),
            ("passwordid", "string"),
        ],
        "secret_common" => &[
            TYPE,
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
        ],
        "secret" => &[
            TYPE,
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
            ("file", "string"),
            ("data", "string"),
        ],
        "event-loop-base" => &[
            TYPE,
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
        ],
        "iothread" => &[
            TYPE,
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
            ("poll-max-ns", "int"),
            ("poll-grow", "int"),
            ("poll-shrink", "int"),
        ],
        "throttle-group" => &[
            TYPE,
            ("x-bps-write-max-length", "int"),
            ("x-iops-total-max-length", "int"),
            ("x-iops-size", "int"),
            ("limits", "ThrottleLimits"),
            ("x-bps-total", "int"),
            ("x-iops-read-max-length", "int"),
            ("x-bps-write", "int"),
            ("x-iops-write-max-length", "int"),
            ("x-bps-read-max", "int"),
            ("x-iops-read-max", "int"),
            ("x-bps-total-max", "int"),
            ("x-bps-read-max-length", "int"),
            ("x-iops-read", "int"),
            ("x-bps-read", "int"),
            ("x-bps-write-max", "int"),
            ("x-iops-total-max", "int"),
            ("x-iops-total", "int"),
            ("x-iops-write", "int"),
            ("x-bps-total-max-length", "int"),
            ("x-iops-write-max", "int"),
        ],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: Vec<&TypeInfo>) -> Vec<&str> {
        v.into_iter().map(|t| t.name).collect()
    }

    /// The filters as qemu-storage-daemon 10.0.2 applies them (its
    /// answers restricted to blockd's types).
    #[test]
    fn filters_as_qemu() {
        assert_eq!(
            names(list(None, false)),
            [
                "authz-simple",
                "container",
                "iothread",
                "secret",
                "authz-list",
                "tls-creds-x509",
                "throttle-group"
            ]
        );
        assert_eq!(
            names(list(Some("user-creatable"), false)),
            [
                "authz-simple",
                "iothread",
                "secret",
                "authz-list",
                "tls-creds-x509",
                "throttle-group"
            ]
        );
        assert_eq!(
            names(list(Some("user-creatable"), true)),
            [
                "authz-simple",
                "secret_common",
                "iothread",
                "secret",
                "authz-list",
                "event-loop-base",
                "user-creatable",
                "tls-creds-x509",
                "throttle-group"
            ]
        );
        assert_eq!(
            names(list(Some("interface"), true)),
            [
                "authz-simple",
                "secret_common",
                "interface",
                "iothread",
                "secret",
                "authz-list",
                "event-loop-base",
                "user-creatable",
                "tls-creds-x509",
                "throttle-group"
            ]
        );
        assert_eq!(
            names(list(Some("object"), true)),
            [
                "authz-simple",
                "secret_common",
                "container",
                "iothread",
                "secret",
                "authz",
                "tls-creds",
                "authz-list",
                "event-loop-base",
                "object",
                "tls-creds-x509",
                "throttle-group"
            ]
        );
        assert_eq!(
            names(list(Some("secret_common"), true)),
            ["secret_common", "secret"]
        );
        assert_eq!(
            names(list(Some("event-loop-base"), true)),
            ["iothread", "event-loop-base"]
        );
        assert_eq!(
            names(list(Some("throttle-group"), true)),
            ["throttle-group"]
        );
        // qemu-storage-daemon 10.0.2, restricted to blockd's types.
        assert_eq!(
            names(list(Some("tls-creds"), true)),
            ["tls-creds", "tls-creds-x509"]
        );
        assert_eq!(
            names(list(Some("authz"), true)),
            ["authz-simple", "authz", "authz-list"]
        );
        assert!(list(Some("nope"), true).is_empty());
        assert!(list(Some(""), true).is_empty());
    }

    #[test]
    fn every_type_but_interfaces_has_properties() {
        for t in TYPES {
            assert_eq!(properties(t.name).is_some(), !t.is_interface, "{}", t.name);
        }
    }
}
