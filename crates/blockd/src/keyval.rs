//! QEMU's `KEY=VALUE,...` syntax (`util/keyval.c`), the one behind
//! qemu-storage-daemon's `--blockdev`, `--export`, `--nbd-server` and
//! `--monitor`.
//!
//! ```text
//! key-vals     = [ key-val-1st { ',' key-val } [ ',' ] ]
//! key-val-1st  = val-no-key | key-val        (only with an implied key)
//! key-val      = key '=' val
//! key          = key-fragment { '.' key-fragment }
//! key-fragment = qapi-name | index           (an index never comes first)
//! val          = { / [^,]+ / | ',,' }
//! ```
//!
//! The result is a JSON object whose leaves are strings: a dotted key is a
//! path of nested objects, objects whose keys are all indexes become
//! arrays (`a.0=x,a.1=y`), and when a key repeats the last value wins.
//! Typing the strings (numbers, sizes, booleans) is the schema check's job
//! in keyval mode ([`blockd_qmp::schema::Schema::check_value_keyval`]).
//!
//! With an implied key (`driver` for `--blockdev`, `type` for `--export`,
//! `chardev` for `--monitor`), a first element without `=` is that key's
//! value: `null-co,node-name=n0` is `driver=null-co,node-name=n0`. Only
//! the first element can be one (`null-co,null-co` is refused), and such a
//! value cannot contain `=` or `,`.
//!
//! Errors are QEMU's: `Invalid parameter 'a..b'`, `Expected '=' after
//! parameter 'foo'`, `Parameters 'a.*' used inconsistently`, `Parameter
//! 'a.1' missing`, `Parameter 'aaa...' is too long`, and `Help is not
//! available for this option` for `help` or `?`.

use serde_json::{Map, Value};

/// The longest key fragment QEMU takes (`key_in_cur[128]`).
const FRAGMENT_MAX: usize = 127;

/// Parses `params`; `implied_key` is the key a bare first element stands
/// for.
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    let mut rest = params;
    let mut implied = implied_key;
    let mut help = false;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied, &mut help)?;
        implied = None;
    }
    if help {
        return Err("Help is not available for this option".into());
    }
    listify_root(root)
}

/// Turns the objects of a tree whose keys are all indexes into lists
/// (QEMU's `keyval_listify`), for options nested from dotted keys by
/// other means (`--drive`).
pub fn listify_root(root: Map<String, Value>) -> Result<Map<String, Value>, String> {
    match listify(root, &mut Vec::new())? {
        Value::Object(m) => Ok(m),
        // A root of indexes only: QEMU's keys never start with one.
        Value::Array(_) => Err("Invalid parameter '0'".into()),
        _ => unreachable!("listify returns an object or a list"),
    }
}

/// Length of the QAPI name at the start of `s` (`parse_qapi_name` without
/// `complete`): a letter, then letters, digits, `-` and `_`, optionally
/// after a downstream `__RFQDN_` prefix. 0 if there is none.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        if s.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while s
            .get(p)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while s
        .get(p)
        .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        p += 1;
    }
    p
}

/// The list index a key stands for (`key_to_index`): decimal digits, capped
/// at `INT_MAX`; `None` for a name.
fn index_of(key: &str) -> Option<usize> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        key.parse::<usize>()
            .map_or(i32::MAX as usize, |i| i.min(i32::MAX as usize)),
    )
}

/// Parses one `key=value` (or the implied key's value, or `help`) at the
/// start of `params` into `root`; returns what follows it.
fn parse_one<'p>(
    root: &mut Map<String, Value>,
    params: &'p str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'p str, String> {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let after = &params[len..];
    let mut key = &params[..len];
    let mut implied_value = None;
    if len > 0 && !after.starts_with('=') {
        if key == "help" || key == "?" {
            *help = true;
            return Ok(after.strip_prefix(',').unwrap_or(after));
        }
        if let Some(k) = implied_key {
            implied_value = Some(key);
            key = k;
        }
    }

    // The key's fragments.
    let kb = key.as_bytes();
    let mut fragments: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    loop {
        let flen = if i != 0 && kb.get(i).is_some_and(u8::is_ascii_digit) {
            kb[i..].iter().take_while(|b| b.is_ascii_digit()).count()
        } else {
            qapi_name_len(&kb[i..])
        };
        if flen == 0 || (i + flen < kb.len() && kb[i + flen] != b'.') {
            return Err(format!("Invalid parameter '{key}'"));
        }
        if flen > FRAGMENT_MAX {
            let whole = i == 0 && flen == kb.len();
            return Err(format!(
                "Parameter{} '{}' is too long",
                if whole { "" } else { " fragment" },
                &key[i..i + flen]
            ));
        }
        fragments.push((i, i + flen));
        i += flen;
        if kb.get(i) != Some(&b'.') {
            break;
        }
        i += 1;
    }

    // The value.
    let (value, rest) = match implied_value {
        Some(v) => (v.to_string(), after.strip_prefix(',').unwrap_or(after)),
        None => {
            let Some(v) = after.strip_prefix('=') else {
                return Err(format!("Expected '=' after parameter '{key}'"));
            };
            let b = v.as_bytes();
            let mut out = Vec::new();
            let mut j = 0;
            while j < b.len() {
                if b[j] == b',' {
                    j += 1;
                    if b.get(j) != Some(&b',') {
                        break;
                    }
                }
                out.push(b[j]);
                j += 1;
            }
            // Only ASCII commas were dropped: still UTF-8.
            let value = String::from_utf8(out).unwrap_or_default();
            (value, &v[j..])
        }
    };

    // Store it: inner fragments are objects, the last one the string.
    let mut cur = root;
    let (&(last_start, last_end), inner) = fragments.split_last().expect("one fragment at least");
    for &(start, end) in inner {
        let slot = cur
            .entry(&key[start..end])
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match slot {
            Value::Object(m) => m,
            _ => {
                return Err(format!(
                    "Parameters '{}.*' used inconsistently",
                    &key[..end]
                ))
            }
        };
    }
    let leaf = &key[last_start..last_end];
    if cur.get(leaf).is_some_and(Value::is_object) {
        return Err(format!("Parameters '{key}.*' used inconsistently"));
    }
    cur.insert(leaf.to_string(), Value::String(value));
    Ok(rest)
}

/// `keyval_listify`: objects whose keys are all indexes become arrays,
/// innermost first. `path` holds the keys leading to `m`.
fn listify(m: Map<String, Value>, path: &mut Vec<String>) -> Result<Value, String> {
    let (mut has_index, mut has_member) = (false, false);
    let mut members = Map::new();
    for (k, v) in m {
        if index_of(&k).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        let v = match v {
            Value::Object(inner) => {
                path.push(k.clone());
                let r = listify(inner, path);
                path.pop();
                r?
            }
            other => other,
        };
        members.insert(k, v);
    }
    let prefix = || path.iter().map(|k| format!("{k}.")).collect::<String>();
    if has_index && has_member {
        return Err(format!("Parameters '{}*' used inconsistently", prefix()));
    }
    if !has_index {
        return Ok(Value::Object(members));
    }
    // Indexes must be 0, 1, ... without gaps; the first gap is reported.
    let n = members.len();
    let mut elements: Vec<Option<Value>> = vec![None; n];
    let mut max = 0;
    for (k, v) in members {
        let i = index_of(&k).expect("every key is an index");
        max = max.max(i + 1);
        if i < n {
            elements[i] = Some(v);
        }
    }
    let mut list = Vec::with_capacity(n);
    for (i, e) in elements.into_iter().take(max).enumerate() {
        match e {
            Some(v) => list.push(v),
            None => return Err(format!("Parameter '{}{i}' missing", prefix())),
        }
    }
    Ok(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str, implied: Option<&str>) -> Value {
        Value::Object(parse(s, implied).unwrap())
    }

    fn err(s: &str, implied: Option<&str>) -> String {
        parse(s, implied).unwrap_err()
    }

    #[test]
    fn keys_values_and_nesting() {
        assert_eq!(
            ok(
                "driver=raw,node-name=r,file.driver=file,file.filename=/x",
                None
            ),
            json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/x"}})
        );
        assert_eq!(ok("a=x,,y,b=", None), json!({"a": "x,y", "b": ""}));
        assert_eq!(ok("a=1,", None), json!({"a": "1"}));
        assert_eq!(ok("", None), json!({}));
        // The last value wins.
        assert_eq!(ok("a=1,a=2", None), json!({"a": "2"}));
        assert_eq!(
            ok("__com.x_y=1,a_b=2", None),
            json!({"__com.x_y": "1", "a_b": "2"})
        );
    }

    #[test]
    fn implied_keys() {
        assert_eq!(
            ok("null-co,node-name=n0", Some("driver")),
            json!({"driver": "null-co", "node-name": "n0"})
        );
        assert_eq!(ok("a.b", Some("driver")), json!({"driver": "a.b"}));
        // A later driver= wins, as any repeated key.
        assert_eq!(
            ok("null-co,driver=raw", Some("driver")),
            json!({"driver": "raw"})
        );
        // Only the first element, and only without '='.
        assert_eq!(
            err("null-co,null-co", Some("driver")),
            "Expected '=' after parameter 'null-co'"
        );
        assert_eq!(
            err("node-name=n0,null-co", Some("driver")),
            "Expected '=' after parameter 'null-co'"
        );
        assert_eq!(
            err("null-co", None),
            "Expected '=' after parameter 'null-co'"
        );
        // The implied value ends at the first comma: no ',,' escape.
        assert_eq!(
            err("null-co,,x,node-name=n0", Some("driver")),
            "Invalid parameter ''"
        );
        assert_eq!(err(",node-name=n0", Some("driver")), "Invalid parameter ''");
        assert_eq!(err("=x", Some("driver")), "Invalid parameter ''");
    }

    #[test]
    fn lists() {
        assert_eq!(
            ok("a.1=y,a.0=x,b.0.c=z", None),
            json!({"a": ["x", "y"], "b": [{"c": "z"}]})
        );
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(err("a.0=x,a.2=y", None), "Parameter 'a.1' missing");
        assert_eq!(err("a.0.1=x", None), "Parameter 'a.0.0' missing");
        assert_eq!(
            err("a.0=x,a.x=y", None),
            "Parameters 'a.*' used inconsistently"
        );
    }

    #[test]
    fn errors_read_like_qemu() {
        assert_eq!(err("0=x", None), "Invalid parameter '0'");
        assert_eq!(err("a..b=x", None), "Invalid parameter 'a..b'");
        assert_eq!(err("a.=x", None), "Invalid parameter 'a.'");
        assert_eq!(err("a b=x", None), "Invalid parameter 'a b'");
        assert_eq!(
            err("size=1,size.x=2", None),
            "Parameters 'size.*' used inconsistently"
        );
        assert_eq!(
            err("a.b.c=1,a.b=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=1,a.b.c=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
        let long = "a".repeat(128);
        assert_eq!(
            err(&format!("{long}=x"), None),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(
            err(&format!("x.{long}=x"), None),
            format!("Parameter fragment '{long}' is too long")
        );
        assert!(parse(&format!("{}=x", "a".repeat(127)), None).is_ok());
        for h in ["help", "?", "null-co,help", "a=1,?"] {
            assert_eq!(
                err(h, Some("driver")),
                "Help is not available for this option"
            );
        }
    }
}
