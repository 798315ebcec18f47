//! The command line, in blockd's own spelling and in qemu-storage-daemon's.
//!
//! ```text
//! blockd --qmp PATH                       # a QMP socket (repeatable)
//! blockd --chardev socket,path=P,server=on,wait=off,id=m0 --monitor chardev=m0
//! blockd --blockdev '{"driver":"null-co","node-name":"n0"}'
//! blockd --blockdev driver=null-co,node-name=n0
//! blockd --blockdev null-co,node-name=n0  # `driver` implied, as in qemu-storage-daemon
//! ```
//!
//! `--blockdev`, `--export`, `--nbd-server` and `--monitor` take JSON or
//! QEMU's keyval syntax ([`crate::keyval`]); `--chardev`, `--drive` and
//! `--device` take QemuOpts' ([`split_qemu_opts`]), as in QEMU.

use std::ffi::OsString;
use std::path::PathBuf;

use blockd_optval::{keyval, qemu_opts};
use clap::Parser;
use serde_json::{Map, Value};

/// blockd: a block-storage management server that speaks QEMU's QMP.
///
/// With no option it listens on a default QMP socket and prints how to
/// connect to it.
#[derive(Debug, Parser)]
#[command(name = "blockd", version, about, long_about = None)]
pub struct Args {
    /// Listen for QMP clients on a Unix socket at PATH (repeatable).
    #[arg(long, value_name = "PATH")]
    pub qmp: Vec<PathBuf>,

    /// qemu-storage-daemon spelling: a socket character device,
    /// `socket,path=PATH,server=on,wait=off,id=ID` (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub chardev: Vec<String>,

    /// qemu-storage-daemon spelling: a QMP monitor on a character device,
    /// `chardev=ID[,mode=control][,pretty=off]` (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub monitor: Vec<String>,

    /// Creates an object at start-up (before any `--blockdev`): the
    /// arguments of `object-add`, e.g.
    /// `throttle-group,id=tg0,limits.bps-total=1000000` (repeatable).
    #[arg(long, value_name = "JSON|OPTIONS")]
    pub object: Vec<String>,

    /// Adds a block node at start-up: the arguments of `blockdev-add`, as
    /// JSON or as `key=value,...` (repeatable). A bad one stops start-up.
    #[arg(long, value_name = "JSON|OPTIONS")]
    pub blockdev: Vec<String>,

    /// Starts the NBD server at start-up, as qemu-storage-daemon spells it:
    /// `addr.type=unix,addr.path=PATH[,max-connections=N]` or JSON.
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    pub nbd_server: Option<String>,

    /// Adds a block export at start-up: the `block-export-add` arguments,
    /// e.g. `type=nbd,id=e0,node-name=n0,writable=on` (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub export: Vec<String>,

    /// Adds a drive (a named block backend) at start-up, in QEMU's `-drive`
    /// syntax: `if=none,id=NAME,file=PATH,format=FMT,readonly=on,
    /// media=cdrom,cache=MODE,rerror=ACTION,werror=ACTION,snapshot=on`
    /// (repeatable). Without `file`, the drive is empty. `if` defaults to
    /// `none`: blockd has no board to connect drives to.
    #[arg(long, value_name = "OPTIONS")]
    pub drive: Vec<String>,

    /// Adds a device at start-up, in QEMU's `-device` syntax:
    /// `DRIVER,id=ID,drive=NAME,...` or JSON (repeatable). IDE and floppy
    /// devices can only be added this way.
    #[arg(long, value_name = "OPTIONS")]
    pub device: Vec<String>,

    /// Whether the `file` driver may write whole pages into the page cache
    /// on the event loop's threads (`on`, the default) or sends every write
    /// that the kernel cannot do with `RWF_NOWAIT` to its thread pool
    /// (`off`). See README, "Buffered I/O without a thread hop".
    #[arg(long = "inline-writes", value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub inline_writes: bool,

    /// Writes the process id to FILE (removed at exit).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Log filter for stderr (tracing-subscriber syntax, e.g. `debug` or
    /// `blockd_qmp=trace`); defaults to RUST_LOG, else `warn`.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

/// `--inline-writes`: QEMU's boolean spellings, as every other switch.
fn parse_on_off(v: &str) -> Result<bool, String> {
    blockd_optval::parse_bool(v).ok_or_else(|| format!("'{v}' is not 'on' or 'off'"))
}

/// Parses the command line; `Err` carries clap's message and exit code
/// (help and version are "errors" that exit 0).
pub fn parse<I, T>(args: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Args::try_parse_from(args)
}

/// Splits QEMU option syntax `a=b,c=d` into pairs; `,,` is a literal comma.
/// A leading bare word (`socket`) is returned under `implied`.
pub fn split_qemu_opts(s: &str, implied: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ if i == 0 && implied.is_some() && !p.is_empty() => {
                out.push((implied.unwrap_or_default().to_string(), p))
            }
            _ => return Err(format!("Invalid parameter '{p}'")),
        }
    }
    Ok(out)
}

/// Resolves `--chardev`/`--monitor` pairs into socket paths.
pub fn monitor_sockets(chardevs: &[String], monitors: &[String]) -> Result<Vec<PathBuf>, String> {
    let mut devs: Vec<(String, PathBuf)> = Vec::new();
    for c in chardevs {
        let opts = split_qemu_opts(c, Some("backend"))?;
        let mut backend = None;
        let mut path = None;
        let mut id = None;
        let mut server = false;
        for (k, v) in opts {
            match k.as_str() {
                "backend" => backend = Some(v),
                "path" => path = Some(PathBuf::from(v)),
                "id" => id = Some(v),
                "server" => server = qemu_opts::parse_bool(&k, &v)?,
                "wait" => {
                    if qemu_opts::parse_bool(&k, &v)? {
                        return Err(
                            "chardev: wait=on is not supported (blockd never waits for a client)"
                                .into(),
                        );
                    }
                }
                "nowait" => {}
                other => return Err(format!("chardev: unsupported option '{other}'")),
            }
        }
        if backend.as_deref() != Some("socket") {
            return Err(format!(
                "chardev: backend '{}' is not supported (only 'socket')",
                backend.unwrap_or_default()
            ));
        }
        let id = id.ok_or("chardev: Parameter 'id' is missing")?;
        let path = path.ok_or("chardev: only Unix sockets ('path=') are supported")?;
        if !server {
            return Err("chardev: only server=on sockets are supported".into());
        }
        if devs.iter().any(|(i, _)| *i == id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        devs.push((id, path));
    }
    let mut out = Vec::new();
    for m in monitors {
        // MonitorOptions in keyval syntax, `chardev` implied.
        let opts = crate::keyval::parse(m, Some("chardev"))?;
        let mut dev = None;
        for (k, v) in opts {
            let Value::String(v) = v else {
                return Err(format!("Parameters '{k}.*' are unexpected"));
            };
            match k.as_str() {
                "chardev" => dev = Some(v),
                "mode" if v == "control" => {}
                "mode" => {
                    return Err(format!(
                        "monitor: mode '{v}' is not supported (only 'control')"
                    ))
                }
                "pretty" => {
                    keyval::boolean(&k, &v)?;
                }
                "id" => {}
                other => return Err(format!("monitor: unsupported option '{other}'")),
            }
        }
        let dev = dev.ok_or("monitor: Parameter 'chardev' is missing")?;
        let (_, path) = devs
            .iter()
            .find(|(i, _)| *i == dev)
            .ok_or_else(|| format!("chardev '{dev}' not found"))?;
        out.push(path.clone());
    }
    Ok(out)
}

/// A `--blockdev` value: the arguments, and whether they came in the
/// `key=value` form (whose strings the schema converts to numbers and
/// booleans where it expects them).
#[derive(Debug, Clone, PartialEq)]
pub struct OptionArgs {
    /// The arguments object.
    pub value: Value,
    /// Given as `key=value,...`.
    pub keyval: bool,
}

/// Parses an option value as qemu-storage-daemon does
/// (`qobject_input_visitor_new_str`): JSON if it starts with `{`, else
/// QEMU's keyval syntax ([`crate::keyval`]) with `implied_key` for a bare
/// first element (`driver` for `--blockdev`, `type` for `--export`, none
/// for `--nbd-server`).
pub fn option_arg(s: &str, implied_key: Option<&str>) -> Result<OptionArgs, String> {
    if s.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
        return match v {
            Value::Object(_) => Ok(OptionArgs {
                value: v,
                keyval: false,
            }),
            _ => Err("expected a JSON object".into()),
        };
    }
    Ok(OptionArgs {
        value: Value::Object(crate::keyval::parse(s, implied_key)?),
        keyval: true,
    })
}

/// An `--object` value: [`option_arg`] with `qom-type` implied.
pub fn object_arg(s: &str) -> Result<OptionArgs, String> {
    option_arg(s, Some("qom-type"))
}

/// A `--blockdev` value: [`option_arg`] with `driver` implied.
pub fn blockdev_arg(s: &str) -> Result<OptionArgs, String> {
    option_arg(s, Some("driver"))
}

/// An `--export` value: [`option_arg`] with `type` implied.
pub fn export_arg(s: &str) -> Result<OptionArgs, String> {
    option_arg(s, Some("type"))
}

/// An `--nbd-server` value: [`option_arg`] without an implied key.
pub fn nbd_server_arg(s: &str) -> Result<OptionArgs, String> {
    option_arg(s, None)
}

/// Parses a `--device` value: JSON, or `DRIVER,key=value,...` (a later
/// key replaces an earlier one, as QEMU's options do).
pub fn device_arg(s: &str) -> Result<Map<String, Value>, String> {
    if s.trim_start().starts_with('{') {
        return match serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))? {
            Value::Object(m) => Ok(m),
            _ => Err("expected a JSON object".into()),
        };
    }
    let mut m = Map::new();
    for (k, v) in split_qemu_opts(s, Some("driver"))? {
        m.insert(k, Value::String(v));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_monitor_spelling() {
        let socks = monitor_sockets(
            &["socket,path=/tmp/a.sock,server=on,wait=off,id=m0".into()],
            &["chardev=m0".into()],
        )
        .unwrap();
        assert_eq!(socks, vec![PathBuf::from("/tmp/a.sock")]);
        assert!(monitor_sockets(&[], &["chardev=m1".into()]).is_err());
        assert!(monitor_sockets(&["socket,path=/x,id=m0".into()], &[]).is_err());
    }

    #[test]
    fn qemu_opts_escape_commas() {
        let o = split_qemu_opts("file,path=a,,b,id=x", Some("backend")).unwrap();
        assert_eq!(o[1], ("path".into(), "a,b".into()));
    }

    #[test]
    fn blockdev_keyval_nests() {
        let v = blockdev_arg("driver=raw,node-name=r,file.driver=file,file.filename=/x").unwrap();
        assert!(v.keyval);
        assert_eq!(
            v.value,
            serde_json::json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/x"}})
        );
        // Not JSON (which must be an object): a bare driver name, which
        // the schema refuses later, as qemu-storage-daemon does.
        assert_eq!(blockdev_arg("[1]").unwrap().value["driver"], "[1]");
        assert!(blockdev_arg("{1}").is_err());
        assert!(!blockdev_arg(r#"{"driver": "null-co"}"#).unwrap().keyval);
    }

    #[test]
    fn implied_keys_are_qsds() {
        let v = blockdev_arg("null-co,node-name=n0").unwrap().value;
        assert_eq!(
            v,
            serde_json::json!({"driver": "null-co", "node-name": "n0"})
        );
        let v = export_arg("nbd,id=e0,node-name=n0").unwrap().value;
        assert_eq!(
            v,
            serde_json::json!({"type": "nbd", "id": "e0", "node-name": "n0"})
        );
        assert_eq!(
            nbd_server_arg("unix").unwrap_err(),
            "Expected '=' after parameter 'unix'"
        );
        let socks = monitor_sockets(
            &["socket,path=/tmp/a.sock,server=on,wait=off,id=m0".into()],
            &["m0,mode=control".into()],
        )
        .unwrap();
        assert_eq!(socks, vec![PathBuf::from("/tmp/a.sock")]);
    }
}
