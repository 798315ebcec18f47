//! Encoding of outgoing messages and decoding of the request envelope.
//!
//! Every message blockd writes is one line of ASCII JSON ended by CRLF
//! (libvirt splits replies on `\r\n` only). Characters outside ASCII are
//! written as `\uXXXX` escapes, as QEMU does.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::error::QmpError;

/// A serde_json formatter that escapes every non-ASCII character.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(writer, "\\u{:04x}", u)?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Serialises a message as one ASCII line ending in CRLF.
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, AsciiFormatter);
    // Serialising a Value or a plain derived struct into a Vec cannot fail.
    msg.serialize(&mut ser)
        .expect("QMP messages are always serialisable");
    buf.extend_from_slice(b"\r\n");
    Bytes::from(buf)
}

/// Serialises a value as ASCII JSON text (non-ASCII characters escaped),
/// for a [`crate::RawReply`].
pub fn to_ascii_json<T: Serialize + ?Sized>(v: &T) -> String {
    to_ascii_json_sized(v, 256)
}

/// [`to_ascii_json`] into a buffer that starts with `capacity` bytes (a
/// good guess saves copying a large reply while it grows).
pub fn to_ascii_json_sized<T: Serialize + ?Sized>(v: &T, capacity: usize) -> String {
    let mut buf = Vec::with_capacity(capacity);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, AsciiFormatter);
    v.serialize(&mut ser)
        .expect("QMP values are always serialisable");
    // The formatter escapes everything outside ASCII.
    String::from_utf8(buf).expect("ASCII is UTF-8")
}

/// `{"return": TEXT}` (with the id) as one line, TEXT being encoded JSON.
pub fn success_raw(text: &str, id: Option<Value>) -> Bytes {
    let mut buf = Vec::with_capacity(text.len() + 32);
    buf.extend_from_slice(b"{\"return\":");
    buf.extend_from_slice(text.as_bytes());
    if let Some(id) = id {
        buf.extend_from_slice(b",\"id\":");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, AsciiFormatter);
        id.serialize(&mut ser)
            .expect("QMP values are always serialisable");
    }
    buf.extend_from_slice(b"}\r\n");
    Bytes::from(buf)
}

/// The current time as a QMP event timestamp.
pub fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// `{"return": VALUE}` with the request's id, if it had one.
pub fn success(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// `{"error": {...}}` with the request's id, if it had one.
pub fn failure(err: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), err.to_json());
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// A well-formed request envelope.
#[derive(Debug)]
pub struct Request {
    /// Command name.
    pub execute: String,
    /// Whether it came as `exec-oob`.
    pub oob: bool,
    /// The `arguments` object, if given.
    pub arguments: Option<Map<String, Value>>,
    /// The `id`, echoed verbatim in the reply.
    pub id: Option<Value>,
}

/// Checks the envelope of one input object, as QEMU's dispatcher does:
/// the error (if any) carries the `id` when the input had one.
pub fn parse_request(v: Value, oob_enabled: bool) -> Result<Request, (QmpError, Option<Value>)> {
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let mut execute = None;
    let mut oob = false;
    let mut arguments = None;
    for (key, val) in m {
        match key.as_str() {
            "execute" => match val {
                Value::String(s) => execute = Some(s),
                _ => {
                    return Err((
                        QmpError::generic("QMP input member 'execute' must be a string"),
                        id,
                    ))
                }
            },
            "exec-oob" if oob_enabled => match val {
                Value::String(s) => {
                    execute = Some(s);
                    oob = true;
                }
                _ => {
                    return Err((
                        QmpError::generic("QMP input member 'exec-oob' must be a string"),
                        id,
                    ))
                }
            },
            "arguments" => match val {
                Value::Object(a) => arguments = Some(a),
                _ => {
                    return Err((
                        QmpError::generic("QMP input member 'arguments' must be an object"),
                        id,
                    ))
                }
            },
            other => {
                return Err((
                    QmpError::generic(format!("QMP input member '{other}' is unexpected")),
                    id,
                ))
            }
        }
    }
    let Some(execute) = execute else {
        return Err((QmpError::generic("QMP input lacks member 'execute'"), id));
    };
    Ok(Request {
        execute,
        oob,
        arguments,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_replies_are_spliced_in() {
        let text = to_ascii_json(&json!([{"a": "\u{e9}"}]));
        assert_eq!(text, "[{\"a\":\"\\u00e9\"}]");
        let b = success_raw(&text, Some(json!("x")));
        let back: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(back, json!({"return": [{"a": "\u{e9}"}], "id": "x"}));
        assert!(b.ends_with(b"}\r\n"));
        let same = encode(&success(json!([{"a": "\u{e9}"}]), Some(json!("x"))));
        assert_eq!(b, same);
    }

    #[test]
    fn encode_is_ascii_crlf() {
        let b = encode(&json!({"return": "h\u{e9}\u{1F600}\u{0}"}));
        let s = std::str::from_utf8(&b).unwrap();
        assert!(s.is_ascii());
        assert!(s.ends_with("}\r\n"));
        assert_eq!(s, "{\"return\":\"h\\u00e9\\ud83d\\ude00\\u0000\"}\r\n");
        let back: Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(back["return"], "h\u{e9}\u{1F600}\u{0}");
    }

    #[test]
    fn envelope_errors_match_qemu() {
        let e = |v: Value| parse_request(v, false).unwrap_err();
        assert_eq!(e(json!(null)).0.desc, "QMP input must be a JSON object");
        assert_eq!(e(json!([1])).1, None);
        assert_eq!(e(json!({})).0.desc, "QMP input lacks member 'execute'");
        let (err, id) = e(json!({"execute": true, "id": "e"}));
        assert_eq!(err.desc, "QMP input member 'execute' must be a string");
        assert_eq!(id, Some(json!("e")));
        assert_eq!(
            e(json!({"execute": "x", "arguments": []})).0.desc,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            e(json!({"execute": "x", "arguments": null})).0.desc,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            e(json!({"execute": "x", "extra": 1})).0.desc,
            "QMP input member 'extra' is unexpected"
        );
        assert_eq!(
            e(json!({"exec-oob": "x"})).0.desc,
            "QMP input member 'exec-oob' is unexpected"
        );
    }

    #[test]
    fn envelope_ok() {
        let r = parse_request(
            json!({"execute": "q", "id": {"a": 1}, "arguments": {"x": 1}}),
            false,
        )
        .unwrap();
        assert_eq!(r.execute, "q");
        assert_eq!(r.id, Some(json!({"a": 1})));
        assert_eq!(r.arguments.unwrap()["x"], 1);
        let r = parse_request(json!({"exec-oob": "q"}), true).unwrap();
        assert!(r.oob);
    }
}
