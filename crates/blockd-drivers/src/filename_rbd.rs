//! RBD image names, as QEMU's block/rbd.c parses them
//! (`qemu_rbd_parse_filename`, with `qemu_rbd_strchr`,
//! `qemu_rbd_next_tok` and `qemu_rbd_unescape`):
//!
//! `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE[:KEY=VALUE...]]`
//!
//! * a `\` escapes the next character (`\:`, `\@`, `\/`, `\=`, `\\`):
//!   the delimiter search skips it, and every part is unescaped once it
//!   is cut out (a `\` at the very end stays);
//! * the pool is everything before the first `/`; without one: "Pool name
//!   is required" (an empty pool or image is not refused here: opening
//!   then fails);
//! * if an `@` follows anywhere (even in an option's value, as in QEMU),
//!   the image ends at it and the snapshot runs to the next `:`; else the
//!   image runs to the first `:`;
//! * a `/` in the image splits off its namespace (the first part); without
//!   one the namespace is `""`, which QEMU sets too;
//! * options: `KEY` up to the next `=` (none: "conf option KEY has no
//!   value", the key as written), `VALUE` up to the next `:`; `conf` is
//!   the `conf` option, `id` the `user` option (a later one wins); every
//!   other pair goes, in order, to Ceph with `rados_conf_set` after the
//!   configuration file is read ([`KEYVALUE_PAIRS`], QEMU's internal
//!   `=keyvalue-pairs` option, which QMP's schema does not have).

use blockd_core::BlockError;
use serde_json::Value;

use crate::filename::Options;

/// The option that carries the Ceph settings of an `rbd:` name (QEMU's
/// internal name: the `=` keeps it out of every QMP and command line
/// syntax). Its value is a list of `[key, value]` pairs.
pub const KEYVALUE_PAIRS: &str = "=keyvalue-pairs";

/// QEMU's `qemu_rbd_strchr`: the first `delim` not escaped by a `\`.
fn find(s: &str, delim: char) -> Option<usize> {
    let mut it = s.char_indices();
    while let Some((i, c)) = it.next() {
        if c == delim {
            return Some(i);
        }
        if c == '\\' {
            // An escaped character is never a delimiter (a trailing `\`
            // escapes nothing).
            it.next();
        }
    }
    None
}

/// QEMU's `qemu_rbd_next_tok`: the text up to the first unescaped
/// `delim`, and the rest after it (`None` without a `delim`).
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    match find(s, delim) {
        Some(i) => (&s[..i], Some(&s[i + delim.len_utf8()..])),
        None => (s, None),
    }
}

/// QEMU's `qemu_rbd_unescape`: each `\` followed by a character stands
/// for that character.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                out.push(n);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// QEMU's `qemu_rbd_parse_filename`: the `rbd` node's options for
/// `name`.
pub fn parse_filename(name: &str) -> Result<Options, BlockError> {
    let Some(rest) = name.strip_prefix("rbd:") else {
        return Err(BlockError::invalid("File name must start with 'rbd:'"));
    };
    let mut o = Options::new();
    o.insert("driver".into(), "rbd".into());

    let (pool, rest) = next_tok(rest, '/');
    let Some(rest) = rest else {
        return Err(BlockError::invalid("Pool name is required"));
    };
    o.insert("pool".into(), unescape(pool).into());

    let (image, mut opts) = if find(rest, '@').is_some() {
        let (image, rest) = next_tok(rest, '@');
        let (snap, rest) = next_tok(rest.unwrap_or(""), ':');
        o.insert("snapshot".into(), unescape(snap).into());
        (image, rest)
    } else {
        next_tok(rest, ':')
    };
    let image = match next_tok(image, '/') {
        (ns, Some(image)) => {
            o.insert("namespace".into(), unescape(ns).into());
            image
        }
        (image, None) => {
            o.insert("namespace".into(), "".into());
            image
        }
    };
    o.insert("image".into(), unescape(image).into());

    let mut pairs = Vec::new();
    while let Some(p) = opts {
        let (key, rest) = next_tok(p, '=');
        let Some(rest) = rest else {
            return Err(BlockError::invalid(format!(
                "conf option {key} has no value"
            )));
        };
        let key = unescape(key);
        let (value, rest) = next_tok(rest, ':');
        let value = unescape(value);
        opts = rest;
        match key.as_str() {
            "conf" => {
                o.insert("conf".into(), value.into());
            }
            "id" => {
                o.insert("user".into(), value.into());
            }
            _ => pairs.push(Value::Array(vec![key.into(), value.into()])),
        }
    }
    if !pairs.is_empty() {
        o.insert(KEYVALUE_PAIRS.into(), Value::Array(pairs));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(name: &str) -> Value {
        Value::Object(parse_filename(name).unwrap())
    }

    fn bad(name: &str) -> String {
        parse_filename(name).unwrap_err().msg
    }

    #[test]
    fn pool_and_image() {
        assert_eq!(
            ok("rbd:rbd/disk"),
            json!({"driver": "rbd", "pool": "rbd", "namespace": "", "image": "disk"})
        );
        // Empty parts are left to opening (as QEMU does).
        assert_eq!(
            ok("rbd:p/"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": ""})
        );
        assert_eq!(
            ok("rbd:/i"),
            json!({"driver": "rbd", "pool": "", "namespace": "", "image": "i"})
        );
    }

    #[test]
    fn namespace_and_snapshot() {
        assert_eq!(
            ok("rbd:p/ns/img"),
            json!({"driver": "rbd", "pool": "p", "namespace": "ns", "image": "img"})
        );
        // Only the first `/` of the image splits.
        assert_eq!(
            ok("rbd:p/ns/a/b"),
            json!({"driver": "rbd", "pool": "p", "namespace": "ns", "image": "a/b"})
        );
        assert_eq!(
            ok("rbd:p/img@snap1"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   "snapshot": "snap1"})
        );
        assert_eq!(
            ok("rbd:p/ns/img@s:conf=/c"),
            json!({"driver": "rbd", "pool": "p", "namespace": "ns", "image": "img",
                   "snapshot": "s", "conf": "/c"})
        );
        assert_eq!(
            ok("rbd:p/img@"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   "snapshot": ""})
        );
        // QEMU looks for an `@` in the whole rest, options included.
        assert_eq!(
            ok("rbd:p/img:id=a@b"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img:id=a",
                   "snapshot": "b"})
        );
        assert_eq!(
            ok("rbd:p/img:conf=/a@b"),
            json!({"driver": "rbd", "pool": "p", "namespace": "img:conf=", "image": "a",
                   "snapshot": "b"})
        );
    }

    #[test]
    fn options() {
        assert_eq!(
            ok("rbd:p/img:id=admin:conf=/etc/ceph/ceph.conf"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   "user": "admin", "conf": "/etc/ceph/ceph.conf"})
        );
        // Other keys go to Ceph, in order, duplicates kept; a later conf
        // or id wins; a value runs to the next `:` (an `=` in it stays).
        assert_eq!(
            ok("rbd:p/img:conf=/a:rbd_cache=false:id=x:k=a=b:conf=/b:rbd_cache=true:id=y"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   "conf": "/b", "user": "y",
                   KEYVALUE_PAIRS: [["rbd_cache", "false"], ["k", "a=b"], ["rbd_cache", "true"]]})
        );
        assert_eq!(
            ok("rbd:p/img:k="),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   KEYVALUE_PAIRS: [["k", ""]]})
        );
        assert_eq!(
            ok("rbd:p/img:=v"),
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "img",
                   KEYVALUE_PAIRS: [["", "v"]]})
        );
    }

    #[test]
    fn escapes() {
        assert_eq!(
            ok(r"rbd:a\/b/c\:d\@e:conf=/x\:y\=z:mon_host=1.2.3.4\:6789\;5.6.7.8\:6789"),
            json!({"driver": "rbd", "pool": "a/b", "namespace": "", "image": "c:d@e",
                   "conf": "/x:y=z",
                   KEYVALUE_PAIRS: [["mon_host", "1.2.3.4:6789;5.6.7.8:6789"]]})
        );
        assert_eq!(
            ok(r"rbd:p/n\/s/i\/j@s\:t\@u"),
            json!({"driver": "rbd", "pool": "p", "namespace": "n/s", "image": "i/j",
                   "snapshot": "s:t@u"})
        );
        // `\\` is a backslash; an escaped `=` is part of the key; a `\`
        // at the end stays.
        assert_eq!(
            ok(r"rbd:p\\/i:a\=b=c:d=e\"),
            json!({"driver": "rbd", "pool": r"p\", "namespace": "", "image": "i",
                   KEYVALUE_PAIRS: [["a=b", "c"], ["d", r"e\"]]})
        );
        assert_eq!(
            ok("rbd:pé/ïmg\\é"),
            json!({"driver": "rbd", "pool": "pé", "namespace": "", "image": "ïmgé"})
        );
    }

    #[test]
    fn errors() {
        assert_eq!(bad("rbd:pool"), "Pool name is required");
        assert_eq!(bad("rbd:"), "Pool name is required");
        assert_eq!(bad(r"rbd:p\/i"), "Pool name is required");
        assert_eq!(bad("rbd:p/i:conf"), "conf option conf has no value");
        // The key as written (QEMU unescapes it after this check).
        assert_eq!(bad(r"rbd:p/i:a\:b"), r"conf option a\:b has no value");
        assert_eq!(bad("rbd:p/i:"), "conf option  has no value");
        assert_eq!(bad("rbd:p/i:conf=/c:id"), "conf option id has no value");
        assert_eq!(bad("nbd:p/i"), "File name must start with 'rbd:'");
    }
}
