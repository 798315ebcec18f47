//! Image names that are more than file names: what an image header's
//! backing file name (or a medium's file name) opens, as QEMU's
//! `bdrv_fill_options` decides it (block.c), with `parse_json_filename`
//! for the `json:` pseudo-protocol, `bdrv_find_protocol` /
//! `path_has_protocol` for a `proto:` prefix, and each protocol driver's
//! `bdrv_parse_filename` (block/nbd.c `nbd_parse_filename` and
//! `nbd_parse_uri`; block/rbd.c `qemu_rbd_parse_filename`;
//! block/file-posix.c `raw_parse_filename`; block/null.c
//! `null_co_parse_filename`).
//!
//! QEMU's rules, recorded with qemu-img/qemu-io/qemu-storage-daemon 10.0.2:
//! * the header's backing format is the node's `driver` first; `json:`
//!   options are joined under it without overwriting (`qdict_join(..,
//!   false)`), so `json:{"driver":"nbd",..}` with a backing format `raw`
//!   is a `raw` node without a file: "A block device must be specified
//!   for "file"";
//! * a protocol driver (from `json:`) is the whole backing node, without
//!   a format node over it (QEMU's `BDRV_O_PROTOCOL`);
//! * a format driver with a `file` (from `json:`) is the whole node; with
//!   a name left (not `json:`), the name is its protocol node;
//! * no driver: the name's protocol node, its format probed;
//! * a name is a file unless a `:` comes before any `/`; then the prefix
//!   must be a protocol ("Unknown protocol 'PROTO'").
//!
//! A protocol's parser plugs into [`PROTOCOLS`]. `rbd:` names are parsed
//! in every build ([`crate::filename_rbd`]); without the `rbd` feature
//! their node then fails to open as "Unknown driver 'rbd'", as a `json:`
//! name with that driver does.

use blockd_core::BlockError;
use serde_json::{Map, Value};

/// A node's options as JSON (`BlockdevOptions`, nested).
pub type Options = Map<String, Value>;

/// A protocol driver's file name parser (QEMU's `bdrv_parse_filename`):
/// the protocol node's options for a whole name (prefix included).
pub type ParseFn = fn(&str) -> Result<Options, BlockError>;

/// The protocols whose names are parsed: (prefix, driver, parser).
pub const PROTOCOLS: &[(&str, &str, ParseFn)] = &[
    ("file", "file", parse_file),
    ("nbd", "nbd", crate::filename_nbd::parse_filename),
    ("nbd+tcp", "nbd", crate::filename_nbd::parse_filename),
    ("nbd+unix", "nbd", crate::filename_nbd::parse_filename),
    ("null-co", "null-co", parse_null_co),
    ("rbd", "rbd", crate::filename_rbd::parse_filename),
];

/// Drivers that are protocols (QEMU's `protocol_name` is set): a `json:`
/// name with one of them is the whole node.
const PROTOCOL_DRIVERS: &[&str] = &["file", "nbd", "null-co", "rbd"];

/// Format drivers, whose node needs a `file` child.
const FORMAT_DRIVERS: &[&str] = &["raw", "qcow2"];

/// Other drivers blockd has (filters): a `json:` name with one is the
/// whole node, as the driver itself checks it.
const OTHER_DRIVERS: &[&str] = &["blkdebug", "throttle"];

/// What a name opens.
#[derive(Debug, Clone, PartialEq)]
pub enum NameSpec {
    /// A protocol node, with a format node over it (`format`, or probed).
    Layered {
        /// The protocol node's options.
        protocol: Options,
        /// The format; `None` probes it.
        format: Option<String>,
    },
    /// The whole node's options (a `json:` name with a driver).
    Node(Options),
}

/// QEMU's `path_has_protocol`: a `:` before any `/`.
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// Whether `name` is a plain file name (no `json:`, no protocol prefix),
/// which a backing file name is resolved against its overlay's directory
/// (QEMU's `bdrv_make_absolute_filename` leaves other names alone).
pub fn is_plain_file(name: &str) -> bool {
    !has_protocol(name)
}

/// QEMU's `bdrv_find_protocol` followed by the driver's
/// `bdrv_parse_filename`: the options of the protocol node for `name`.
pub fn protocol_options(name: &str) -> Result<Options, BlockError> {
    if !has_protocol(name) {
        return Ok(file_options(name));
    }
    let proto = &name[..name.find(':').unwrap_or(name.len())];
    match PROTOCOLS.iter().find(|(p, _, _)| *p == proto) {
        Some((_, _, parse)) => parse(name),
        None => Err(BlockError::invalid(format!("Unknown protocol '{proto}'"))),
    }
}

/// QEMU's `bdrv_fill_options` for a name opened with `format` (the
/// header's backing format, or the caller's): see the module docs.
pub fn resolve(name: &str, format: Option<&str>) -> Result<NameSpec, BlockError> {
    let mut opts = Options::new();
    if let Some(f) = format {
        opts.insert("driver".into(), f.into());
    }
    let filename = match name.strip_prefix("json:") {
        Some(json) => {
            join(&mut opts, parse_json_filename(json)?);
            None
        }
        None => Some(name),
    };
    let driver = match opts.get("driver") {
        None => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(BlockError::invalid(
                "Invalid parameter type for 'driver', expected: string",
            ))
        }
    };
    match driver {
        Some(d) if PROTOCOL_DRIVERS.contains(&d.as_str()) => {
            if let Some(f) = filename {
                match PROTOCOLS.iter().find(|(_, drv, _)| *drv == d) {
                    Some((_, _, parse)) => join(&mut opts, parse(f)?),
                    None => {
                        opts.insert("filename".into(), f.into());
                    }
                }
            }
            check_node(&opts)?;
            Ok(NameSpec::Node(opts))
        }
        Some(d) if FORMAT_DRIVERS.contains(&d.as_str()) => {
            if opts.contains_key("file") {
                check_node(&opts)?;
                Ok(NameSpec::Node(opts))
            } else if let Some(f) = filename {
                Ok(NameSpec::Layered {
                    protocol: protocol_options(f)?,
                    format: Some(d),
                })
            } else {
                Err(BlockError::invalid(
                    "A block device must be specified for \"file\"",
                ))
            }
        }
        Some(d) if OTHER_DRIVERS.contains(&d.as_str()) => Ok(NameSpec::Node(opts)),
        Some(d) => Err(BlockError::invalid(format!("Unknown driver '{d}'"))),
        None => match filename {
            Some(f) => Ok(NameSpec::Layered {
                protocol: protocol_options(f)?,
                format: None,
            }),
            None => match opts.remove("file") {
                // `json:{"file": {...}}`: the file, its format probed.
                Some(Value::Object(file)) if opts.is_empty() => Ok(NameSpec::Layered {
                    protocol: file,
                    format: None,
                }),
                _ => Err(BlockError::invalid("Must specify either driver or file")),
            },
        },
    }
}

/// What QEMU's drivers check of options from a name before anything
/// else: an `nbd` node (or `file`) without a server is `nbd_config`'s
/// "NBD server address missing" (blockd's schema would say less).
fn check_node(opts: &Options) -> Result<(), BlockError> {
    if opts.get("driver").and_then(Value::as_str) == Some("nbd") && !opts.contains_key("server") {
        return Err(BlockError::invalid("NBD server address missing"));
    }
    match opts.get("file") {
        Some(Value::Object(file)) => check_node(file),
        _ => Ok(()),
    }
}

/// QEMU's `parse_json_filename` (the text after `json:`): an object,
/// whose dotted keys (QEMU's flattened form, `"file.driver"`) are nested.
pub fn parse_json_filename(json: &str) -> Result<Options, BlockError> {
    let v: Value = serde_json::from_str(json).map_err(|e| {
        let why = if e.is_eof() {
            "JSON parse error, premature EOI".to_string()
        } else {
            format!("JSON parse error, {e}")
        };
        BlockError::invalid(format!("Could not parse the JSON options: {why}"))
    })?;
    let Value::Object(m) = v else {
        return Err(BlockError::invalid("Invalid JSON object given"));
    };
    unflatten(m)
}

/// Nests dotted keys: `{"file.driver": "nbd"}` is `{"file": {"driver":
/// "nbd"}}` (QEMU flattens and crumples; nested and dotted forms mix).
fn unflatten(m: Options) -> Result<Options, BlockError> {
    let mut out = Options::new();
    for (k, v) in m {
        let v = match v {
            Value::Object(inner) => Value::Object(unflatten(inner)?),
            v => v,
        };
        let mut parts = k.split('.').collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        let mut at = &mut out;
        for p in parts {
            let slot = at
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Options::new()));
            at = match slot {
                Value::Object(o) => o,
                _ => return Err(conflict(&k)),
            };
        }
        match (at.get_mut(last), v) {
            (None, v) => {
                at.insert(last.to_string(), v);
            }
            (Some(Value::Object(have)), Value::Object(add)) => {
                for (k2, v2) in add {
                    if have.contains_key(&k2) {
                        return Err(conflict(&k));
                    }
                    have.insert(k2, v2);
                }
            }
            _ => return Err(conflict(&k)),
        }
    }
    Ok(out)
}

fn conflict(key: &str) -> BlockError {
    BlockError::invalid(format!(
        "Could not parse the JSON options: option '{key}' is given twice"
    ))
}

/// QEMU's `qdict_join(dest, src, false)` on flattened options: `src`
/// adds what `dest` lacks, nested objects merged.
fn join(dest: &mut Options, src: Options) {
    for (k, v) in src {
        match (dest.get_mut(&k), v) {
            (None, v) => {
                dest.insert(k, v);
            }
            (Some(Value::Object(d)), Value::Object(s)) => join(d, s),
            _ => {}
        }
    }
}

fn file_options(path: &str) -> Options {
    let mut o = Options::new();
    o.insert("driver".into(), "file".into());
    o.insert("filename".into(), path.into());
    o
}

/// QEMU's `raw_parse_filename` (file-posix.c): `file:` is stripped.
fn parse_file(name: &str) -> Result<Options, BlockError> {
    Ok(file_options(name.strip_prefix("file:").unwrap_or(name)))
}

/// QEMU's `null_co_parse_filename`: only `null-co://`.
fn parse_null_co(name: &str) -> Result<Options, BlockError> {
    if name != "null-co://" {
        return Err(BlockError::invalid(
            "The only allowed filename for this driver is 'null-co://'",
        ));
    }
    let mut o = Options::new();
    o.insert("driver".into(), "null-co".into());
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Options {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn err(r: Result<NameSpec, BlockError>) -> String {
        r.expect_err("should fail").msg
    }

    #[test]
    fn protocol_prefix_rules() {
        assert!(!has_protocol("a.img"));
        assert!(!has_protocol("./a:b"));
        assert!(!has_protocol("/x/a:b"));
        assert!(has_protocol("foo:bar"));
        assert!(has_protocol("nbd://h/e"));
        assert_eq!(
            protocol_options("/x/a:b").unwrap(),
            obj(json!({"driver": "file", "filename": "/x/a:b"}))
        );
        assert_eq!(
            protocol_options("file:/x/y").unwrap(),
            obj(json!({"driver": "file", "filename": "/x/y"}))
        );
        assert_eq!(
            protocol_options("foo:bar").unwrap_err().msg,
            "Unknown protocol 'foo'"
        );
        // Case counts, and the prefix is everything before the ':'.
        assert_eq!(
            protocol_options("Nbd://h/e").unwrap_err().msg,
            "Unknown protocol 'Nbd'"
        );
        assert_eq!(
            protocol_options("a b:c").unwrap_err().msg,
            "Unknown protocol 'a b'"
        );
        assert_eq!(
            protocol_options("rbd:pool/img").unwrap(),
            obj(json!({"driver": "rbd", "pool": "pool", "namespace": "", "image": "img"}))
        );
        assert_eq!(
            protocol_options("rbd:pool").unwrap_err().msg,
            "Pool name is required"
        );
        assert_eq!(
            protocol_options("null-co://").unwrap(),
            obj(json!({"driver": "null-co"}))
        );
        assert!(protocol_options("null-co://x").is_err());
    }

    #[test]
    fn plain_names_are_files_with_the_format_over_them() {
        assert_eq!(
            resolve("base.img", Some("qcow2")).unwrap(),
            NameSpec::Layered {
                protocol: obj(json!({"driver": "file", "filename": "base.img"})),
                format: Some("qcow2".into()),
            }
        );
        assert_eq!(
            resolve("base.img", None).unwrap(),
            NameSpec::Layered {
                protocol: obj(json!({"driver": "file", "filename": "base.img"})),
                format: None,
            }
        );
    }

    #[test]
    fn rbd_names() {
        let rbd = obj(
            json!({"driver": "rbd", "pool": "p", "namespace": "", "image": "i",
            "conf": "/c", "=keyvalue-pairs": [["rbd_cache", "false"]]}),
        );
        let name = "rbd:p/i:conf=/c:rbd_cache=false";
        assert!(!is_plain_file(name));
        assert_eq!(
            resolve(name, Some("raw")).unwrap(),
            NameSpec::Layered {
                protocol: rbd.clone(),
                format: Some("raw".into()),
            }
        );
        assert_eq!(
            resolve(name, None).unwrap(),
            NameSpec::Layered {
                protocol: rbd.clone(),
                format: None,
            }
        );
        // The protocol driver as the format: the whole node.
        assert_eq!(resolve(name, Some("rbd")).unwrap(), NameSpec::Node(rbd));
        assert_eq!(
            err(resolve("rbd:p/i:conf", Some("raw"))),
            "conf option conf has no value"
        );
    }

    #[test]
    fn nbd_uri_under_a_format() {
        assert_eq!(
            resolve("nbd+unix:///exp?socket=/tmp/s", Some("raw")).unwrap(),
            NameSpec::Layered {
                protocol: obj(json!({"driver": "nbd", "export": "exp",
                    "server": {"type": "unix", "path": "/tmp/s"}})),
                format: Some("raw".into()),
            }
        );
    }

    #[test]
    fn json_protocol_driver_is_the_whole_node() {
        let name = r#"json:{"driver":"nbd","server":{"type":"unix","path":"/s"},"export":"e"}"#;
        assert_eq!(
            resolve(name, None).unwrap(),
            NameSpec::Node(obj(json!({"driver": "nbd", "export": "e",
                "server": {"type": "unix", "path": "/s"}})))
        );
        // The header's format wins (QEMU joins without overwriting).
        assert_eq!(
            err(resolve(name, Some("raw"))),
            "A block device must be specified for \"file\""
        );
    }

    #[test]
    fn json_format_driver_nested_flat_and_mixed() {
        let want = NameSpec::Node(obj(json!({"driver": "raw", "file": {
            "driver": "nbd", "export": "e", "server": {"type": "unix", "path": "/s"}}})));
        for name in [
            r#"json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"/s"},"export":"e"}}"#,
            r#"json:{"driver":"raw","file.driver":"nbd","file.server.type":"unix","file.server.path":"/s","file.export":"e"}"#,
            r#"json:{"driver":"raw","file":{"driver":"nbd","server.type":"unix","server.path":"/s"},"file.export":"e"}"#,
        ] {
            assert_eq!(resolve(name, Some("raw")).unwrap(), want, "{name}");
            assert_eq!(resolve(name, None).unwrap(), want, "{name}");
        }
    }

    #[test]
    fn json_errors() {
        assert_eq!(
            err(resolve(r#"json:{"driver":"#, None)),
            "Could not parse the JSON options: JSON parse error, premature EOI"
        );
        assert_eq!(err(resolve("json:[1]", None)), "Invalid JSON object given");
        assert_eq!(
            err(resolve(r#"json:{"driver":"nbd"}"#, None)),
            "NBD server address missing"
        );
        assert_eq!(
            err(resolve(
                r#"json:{"driver":"raw","file":{"driver":"nbd"}}"#,
                None
            )),
            "NBD server address missing"
        );
        assert_eq!(
            err(resolve(r#"json:{"driver":"nope"}"#, None)),
            "Unknown driver 'nope'"
        );
        assert_eq!(
            err(resolve(r#"json:{"driver":"nope"}"#, Some("raw"))),
            "A block device must be specified for \"file\""
        );
        assert_eq!(
            err(resolve("json:{}", None)),
            "Must specify either driver or file"
        );
        assert!(err(resolve(r#"json:{"file":1,"file.driver":"x"}"#, None)).contains("twice"));
    }

    #[test]
    fn json_file_without_driver_is_probed() {
        assert_eq!(
            resolve(r#"json:{"file":{"driver":"null-co"}}"#, None).unwrap(),
            NameSpec::Layered {
                protocol: obj(json!({"driver": "null-co"})),
                format: None,
            }
        );
    }
}
