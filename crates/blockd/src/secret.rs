//! `secret` objects (QEMU's crypto/secret.c and secret_common.c): a
//! password or key given inline (`data`) or in a file (`file`), raw or in
//! base64 (`format`), created with `object-add` or `--object` and looked
//! up by id by the drivers that need one (rbd's `key-secret`).
//!
//! A secret's value is never logged, put into a message or returned:
//! `qom-get` of `data` is refused (QEMU returns it; blockd's rule is that
//! a key is never echoed). Its bytes are overwritten when it goes away.
//! Secrets encrypted with another secret (`keyid`, `iv`) are refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use zeroize::{Zeroize, Zeroizing};

/// Bytes that are overwritten when dropped (a secret, or a buffer that
/// held one on the way).
type Bytes = Zeroizing<Vec<u8>>;

/// A loaded secret.
pub struct Secret {
    bytes: Bytes,
    format: &'static str,
    file: Option<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret").finish_non_exhaustive()
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// QEMU's `qbase64_decode`: only the alphabet, `=` and newlines are
/// allowed (a space is not); then glib's `g_base64_decode`, which never
/// fails: newlines are skipped, `=` counts as a zero digit whose byte is
/// left out, and an incomplete last group is dropped (`"abc"` decodes to
/// nothing).
pub fn base64_decode(s: &[u8]) -> Result<Bytes, String> {
    let rank = |c: u8| B64.iter().position(|&b| b == c).map(|p| p as u32);
    if !s
        .iter()
        .all(|&c| c == b'=' || c == b'\n' || rank(c).is_some())
    {
        return Err("Base64 data contains invalid characters".into());
    }
    // Never grows past this, so no copy is left behind by a reallocation.
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() / 4 * 3));
    let (mut v, mut n, mut last) = (0u32, 0, [0u8; 2]);
    for &c in s.iter().filter(|&&c| c != b'\n') {
        last = [c, last[0]];
        v = (v << 6) | rank(c).unwrap_or(0);
        n += 1;
        if n == 4 {
            out.push((v >> 16) as u8);
            if last[1] != b'=' {
                out.push((v >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(v as u8);
            }
            n = 0;
        }
    }
    v.zeroize();
    Ok(out)
}

/// QEMU's `qcrypto_secret_decode`: `qbase64_decode` of loaded data, which
/// may come from a file and so hold a NUL byte.
fn decode(input: &[u8]) -> Result<Bytes, String> {
    if input.contains(&0) {
        return Err("Base64 data contains embedded NUL characters".into());
    }
    base64_decode(input)
}

/// The bytes of a `data` string as QEMU has them: its JSON parser keeps
/// U+0000 as modified UTF-8 (0xC0 0x80), so a NUL byte never reaches a
/// secret (recorded with qemu-storage-daemon 10.0.2: 30 characters and a
/// `\u0000` make a 32-byte key).
fn data_bytes(d: &str) -> Bytes {
    let nuls = d.bytes().filter(|&b| b == 0).count();
    let mut v = Zeroizing::new(Vec::with_capacity(d.len() + nuls));
    for &b in d.as_bytes() {
        if b == 0 {
            v.extend_from_slice(&[0xC0, 0x80]);
        } else {
            v.push(b);
        }
    }
    v
}

/// Loads a secret from `object-add`'s properties (already checked
/// against the schema), as QEMU's `qcrypto_secret_load_data` and
/// `qcrypto_secret_decode` do.
pub fn load(props: &Map<String, Value>) -> Result<Secret, String> {
    let s = |k: &str| props.get(k).and_then(Value::as_str);
    if s("keyid").is_some() {
        return Err("blockd does not support secrets encrypted with 'keyid'".into());
    }
    let format = match s("format") {
        Some("base64") => "base64",
        _ => "raw",
    };
    let input: Bytes = match (s("data"), s("file")) {
        (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        (Some(d), None) => data_bytes(d),
        (None, Some(f)) => Zeroizing::new(std::fs::read(f).map_err(|e| {
            format!(
                "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                blockd_core::error::strerror(&e)
            )
        })?),
    };
    let bytes = if format == "base64" {
        decode(&input)?
    } else {
        input
    };
    Ok(Secret {
        bytes,
        format,
        file: s("file").map(str::to_string),
    })
}

impl Secret {
    /// `qom-get`: `format` and `file`; never `data`.
    pub fn get(&self, prop: &str) -> Option<Result<Value, String>> {
        Some(match prop {
            "format" => Ok(self.format.into()),
            "file" => Ok(self.file.clone().unwrap_or_default().into()),
            "data" => Err(
                "Property 'secret.data' is not readable in blockd (a secret is never shown)".into(),
            ),
            "keyid" | "iv" => Ok("".into()),
            _ => return None,
        })
    }
}

/// The secrets of a server, by object id, shared with the drivers.
#[derive(Default)]
pub struct SecretStore {
    map: Mutex<HashMap<String, Arc<Secret>>>,
}

impl SecretStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Secret>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a secret (the caller checked the id is free).
    pub fn insert(&self, id: &str, s: Arc<Secret>) {
        self.lock().insert(id.to_string(), s);
    }

    /// Removes one.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Whether a secret called `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

impl blockd_drivers::secrets::Secrets for SecretStore {
    fn lookup_base64(&self, id: &str) -> Result<String, String> {
        // (An object of another type with this id is not in the store:
        // QEMU says "Object with id 'x' is not a secret"; the caller
        // cannot tell here, so both read as missing.)
        self.lock()
            .get(id)
            .map(|s| base64_encode(&s.bytes))
            .ok_or_else(|| format!("No secret with id '{id}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockd_drivers::secrets::Secrets;
    use serde_json::json;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "secret key\0\u{ff}"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(*base64_decode(e.as_bytes()).unwrap(), s.as_bytes(), "{e}");
        }
        assert_eq!(base64_encode(b"secret"), "c2VjcmV0");
    }

    /// glib's decoding behind QEMU's check of the characters (the cases
    /// recorded with qemu-storage-daemon 10.0.2 as secrets' `data`).
    #[test]
    fn base64_decodes_as_qemu() {
        let d = |s: &str| base64_decode(s.as_bytes()).map(|b| b.to_vec());
        let invalid = Err("Base64 data contains invalid characters".to_string());
        assert_eq!(d("!!"), invalid);
        for s in ["YW Jj", "YWJj\r\n", "YWJj\tYQ==", "YWJj\0YWJj"] {
            assert_eq!(d(s), invalid, "{s:?}");
        }
        // Accepted: an incomplete group is dropped, newlines skipped.
        assert_eq!(d("abc").unwrap(), b"");
        assert_eq!(d("YWJj\n").unwrap(), b"abc");
        assert_eq!(d("YW\nJjYQ").unwrap(), b"abc");
        assert_eq!(d("YQ==YWJj").unwrap(), b"aabc");
        assert_eq!(d("YWE=").unwrap(), b"aa");
        assert_eq!(
            decode(b"YWJj\0YWJj").unwrap_err(),
            "Base64 data contains embedded NUL characters"
        );
        assert_eq!(*data_bytes("a\0b"), b"a\xC0\x80b");
    }

    /// The errors qemu-storage-daemon 10.0.2 gives (recorded with QMP).
    #[test]
    fn loading_as_qemu() {
        let e = |v: Value| load(&props(v)).unwrap_err();
        assert_eq!(e(json!({})), "Either 'file' or 'data' must be provided");
        assert_eq!(
            e(json!({"data": "a", "file": "/etc/hostname"})),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            e(json!({"data": "!!", "format": "base64"})),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            e(json!({"file": "/nonexist"})),
            "Unable to read /nonexist: Failed to open file \u{201c}/nonexist\u{201d}: No such file or directory"
        );
        let store = SecretStore::default();
        let s = load(&props(json!({"data": "c2VjcmV0", "format": "base64"}))).unwrap();
        assert!(s.get("data").unwrap().is_err(), "never shown");
        assert_eq!(s.get("format").unwrap().unwrap(), "base64");
        assert!(!format!("{s:?}").contains("secret"));
        store.insert("k", Arc::new(s));
        assert_eq!(store.lookup_base64("k").unwrap(), "c2VjcmV0");
        store.insert(
            "r",
            Arc::new(load(&props(json!({"data": "secret"}))).unwrap()),
        );
        assert_eq!(store.lookup_base64("r").unwrap(), "c2VjcmV0");
        store.remove("k");
        assert_eq!(
            store.lookup_base64("k").unwrap_err(),
            "No secret with id 'k'"
        );
    }
}
