//! NBD image names, as QEMU's block/nbd.c parses them
//! (`nbd_parse_filename`): URIs (`nbd_parse_uri`, with GLib's
//! `g_uri_parse` rules that matter here) and the legacy
//! `nbd:HOST:PORT[:exportname=E]` / `nbd:unix:PATH[:exportname=E]` form
//! (with util/qemu-sockets.c `inet_parse`).
//!
//! * `nbd://host[:port]/export`, `nbd+tcp://...`: TCP, port 10809 when
//!   absent (or 0); no query allowed;
//! * `nbd+unix:///export?socket=PATH`: exactly one query parameter,
//!   `socket`; no host, no port;
//! * the export is the path without its first `/` (`nbd://h//abs` is
//!   `/abs`), percent-decoded; absent when empty;
//! * any URI that breaks a rule: "No valid URL specified".

use blockd_core::BlockError;
use serde_json::Value;

use crate::filename::Options;

/// QEMU's `NBD_DEFAULT_PORT`.
const DEFAULT_PORT: u16 = 10809;

/// QEMU's `nbd_parse_filename`: the `nbd` node's options for `name`.
/// A name without a server address is "NBD server address missing", as
/// QEMU's `nbd_config` says when the node opens.
pub fn parse_filename(name: &str) -> Result<Options, BlockError> {
    let opts = if name.contains("://") {
        parse_uri(name).ok_or_else(|| BlockError::invalid("No valid URL specified"))?
    } else {
        parse_legacy(name)?
    };
    if !opts.contains_key("server") {
        return Err(BlockError::invalid("NBD server address missing"));
    }
    Ok(opts)
}

fn nbd_options(export: Option<&str>, server: Value) -> Options {
    let mut o = Options::new();
    o.insert("driver".into(), "nbd".into());
    if let Some(e) = export {
        o.insert("export".into(), e.into());
    }
    if !server.is_null() {
        o.insert("server".into(), server);
    }
    o
}

/// QEMU's `nbd_parse_uri`; `None` is an invalid URI.
fn parse_uri(name: &str) -> Option<Options> {
    let uri = Uri::parse(name)?;
    let is_unix = match uri.scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return None,
    };
    let path = uri.path.strip_prefix('/').unwrap_or(&uri.path);
    let export = (!path.is_empty()).then_some(path);
    let params = match uri.query {
        Some(q) => {
            let p = parse_params(q)?;
            let n = p.len();
            if n > 1 || (is_unix && n == 0) || (!is_unix && n > 0) {
                return None;
            }
            p
        }
        None => Vec::new(),
    };
    let host = uri.host.filter(|h| !h.is_empty());
    let server = if is_unix {
        let socket = params.iter().find(|(k, _)| k == "socket")?;
        if host.is_some() || uri.port.is_some() {
            return None;
        }
        serde_json::json!({"type": "unix", "path": socket.1})
    } else {
        let host = host?;
        let port = uri.port.filter(|p| *p > 0).unwrap_or(DEFAULT_PORT);
        serde_json::json!({"type": "inet", "host": host, "port": port.to_string()})
    };
    Some(nbd_options(export, server))
}

/// QEMU's legacy form (the rest of `nbd_parse_filename`).
fn parse_legacy(name: &str) -> Result<Options, BlockError> {
    const EN_OPTSTR: &str = ":exportname=";
    let mut file = name;
    let mut export = None;
    if let Some(i) = file.find(EN_OPTSTR) {
        let e = &file[i + EN_OPTSTR.len()..];
        if e.is_empty() {
            return Ok(nbd_options(None, Value::Null));
        }
        export = Some(e);
        file = &file[..i];
    }
    let Some(host_spec) = file.strip_prefix("nbd:") else {
        return Err(BlockError::invalid(
            "File name string for NBD must start with 'nbd:'",
        ));
    };
    if host_spec.is_empty() {
        return Ok(nbd_options(export, Value::Null));
    }
    let server = match host_spec.strip_prefix("unix:") {
        Some(path) => serde_json::json!({"type": "unix", "path": path}),
        None => {
            let (host, port) = inet_parse(host_spec)?;
            serde_json::json!({"type": "inet", "host": host, "port": port})
        }
    };
    Ok(nbd_options(export, server))
}

/// util/qemu-sockets.c `inet_parse`: `HOST:PORT`, `:PORT`, `[V6]:PORT`
/// (options after a `,` are not taken).
fn inet_parse(s: &str) -> Result<(String, String), BlockError> {
    let bad = |what: &str| BlockError::invalid(format!("error parsing {what} '{s}'"));
    let port_of = |rest: &str| -> Option<String> {
        let p = rest.split(',').next().unwrap_or("");
        (!p.is_empty() && p.len() <= 32).then(|| p.to_string())
    };
    if let Some(rest) = s.strip_prefix(':') {
        let port = port_of(rest).ok_or_else(|| bad("port in address"))?;
        return Ok((String::new(), port));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .and_then(port_of)
            .filter(|_| !host.is_empty())
            .ok_or_else(|| bad("IPv6 address"))?;
        return Ok((host.to_string(), port));
    }
    let (host, rest) = s.split_once(':').ok_or_else(|| bad("address"))?;
    let port = port_of(rest)
        .filter(|_| !host.is_empty() && host.len() <= 64)
        .ok_or_else(|| bad("address"))?;
    Ok((host.to_string(), port))
}

/// The parts of a URI that `nbd_parse_uri` reads (GLib's `g_uri_parse`
/// with `G_URI_FLAGS_NONE`: host and path percent-decoded).
struct Uri<'a> {
    scheme: &'a str,
    host: Option<String>,
    port: Option<u16>,
    path: String,
    query: Option<&'a str>,
}

impl<'a> Uri<'a> {
    fn parse(s: &'a str) -> Option<Uri<'a>> {
        let (scheme, rest) = s.split_once(':')?;
        let mut chars = scheme.chars();
        if !chars.next()?.is_ascii_alphabetic()
            || !chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return None;
        }
        let rest = rest.split('#').next().unwrap_or("");
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (mut host, mut port, path) = (None, None, rest);
        let path = match path.strip_prefix("//") {
            Some(auth_path) => {
                let end = auth_path.find('/').unwrap_or(auth_path.len());
                let auth = &auth_path[..end];
                let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
                let (h, p) = if let Some(v6) = hostport.strip_prefix('[') {
                    let (h, after) = v6.split_once(']')?;
                    match after {
                        "" => (h, None),
                        a => (h, Some(a.strip_prefix(':')?)),
                    }
                } else {
                    match hostport.split_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (hostport, None),
                    }
                };
                host = Some(decode(h)?);
                port = match p {
                    None | Some("") => None,
                    Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
                    Some(_) => return None,
                };
                &auth_path[end..]
            }
            None => path,
        };
        Some(Uri {
            scheme,
            host,
            port,
            path: decode(path)?,
            query,
        })
    }
}

/// Percent-decoding; `None` for a bad escape.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// GLib's `g_uri_parse_params(query, -1, "&", ...)`: `k=v` pairs, decoded;
/// a later key replaces an earlier one; a pair without `=` is an error.
fn parse_params(q: &str) -> Option<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        let (k, v) = (decode(k)?, decode(v)?);
        out.retain(|(have, _)| *have != k);
        out.push((k, v));
    }
    Some(out)
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
    fn uris() {
        assert_eq!(
            ok("nbd+unix:///exp?socket=/tmp/x.sock"),
            json!({"driver": "nbd", "export": "exp",
                   "server": {"type": "unix", "path": "/tmp/x.sock"}})
        );
        assert_eq!(
            ok("nbd://localhost/exp"),
            json!({"driver": "nbd", "export": "exp",
                   "server": {"type": "inet", "host": "localhost", "port": "10809"}})
        );
        assert_eq!(
            ok("nbd+tcp://10.0.0.1:1234"),
            json!({"driver": "nbd",
                   "server": {"type": "inet", "host": "10.0.0.1", "port": "1234"}})
        );
        assert_eq!(
            ok("nbd://[::1]:99//abs%20x"),
            json!({"driver": "nbd", "export": "/abs x",
                   "server": {"type": "inet", "host": "::1", "port": "99"}})
        );
        assert_eq!(
            ok("nbd+unix://?socket=/s"),
            json!({"driver": "nbd", "server": {"type": "unix", "path": "/s"}})
        );
        // An empty socket path parses (QEMU then fails to connect to '').
        assert_eq!(
            ok("nbd+unix:///e?socket="),
            json!({"driver": "nbd", "export": "e", "server": {"type": "unix", "path": ""}})
        );
    }

    #[test]
    fn bad_uris() {
        for name in [
            "nbd+unix:///exp",
            "nbd://",
            "nbd:///exp",
            "nbd+unix:///exp?socket=/s&x=1",
            "nbd+unix://host/exp?socket=/s",
            "nbd+unix://:5/exp?socket=/s",
            "nbd+unix:///exp?path=/s",
            "nbd://localhost/exp?a=b",
            "nbd://localhost:x/exp",
            "nbd://localhost:70000/exp",
            "nbd://localhost/%zz",
            "nbd+foo://localhost/exp",
        ] {
            assert_eq!(bad(name), "No valid URL specified", "{name}");
        }
    }

    #[test]
    fn legacy() {
        assert_eq!(
            ok("nbd:unix:/tmp/x.sock:exportname=exp"),
            json!({"driver": "nbd", "export": "exp",
                   "server": {"type": "unix", "path": "/tmp/x.sock"}})
        );
        assert_eq!(
            ok("nbd:localhost:1:exportname=exp"),
            json!({"driver": "nbd", "export": "exp",
                   "server": {"type": "inet", "host": "localhost", "port": "1"}})
        );
        assert_eq!(
            ok("nbd:[::1]:7"),
            json!({"driver": "nbd", "server": {"type": "inet", "host": "::1", "port": "7"}})
        );
        assert_eq!(bad("nbd:localhost"), "error parsing address 'localhost'");
        assert_eq!(bad("nbd:"), "NBD server address missing");
        assert_eq!(bad("nbd:unix:/s:exportname="), "NBD server address missing");
        assert_eq!(
            bad("nbd+unix:/s"),
            "File name string for NBD must start with 'nbd:'"
        );
    }
}
