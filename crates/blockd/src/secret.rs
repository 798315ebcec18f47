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

/// A loaded secret.
pub struct Secret {
    bytes: Vec<u8>,
    format: &'static str,
    file: Option<String>,
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.bytes.iter_mut() {
            // SAFETY: a plain write through a valid, aligned reference;
            // volatile so that the wipe is not optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
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

/// QEMU's `qbase64_decode`: the alphabet, padding and whitespace only.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let valid = |c: u8| B64.contains(&c) || c == b'=' || c.is_ascii_whitespace();
    if !s.bytes().all(valid) {
        return Err("Base64 data contains invalid characters".into());
    }
    let digits: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let body: Vec<u8> = digits.iter().copied().take_while(|&c| c != b'=').collect();
    let pad = digits.len() - body.len();
    if digits.len() % 4 != 0 || pad > 2 || digits[body.len()..].iter().any(|&c| c != b'=') {
        return Err("Failed to decode base64 data".into());
    }
    let val = |c: u8| B64.iter().position(|&b| b == c).unwrap_or(0) as u32;
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for q in body.chunks(4) {
        let n = q
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (val(c) << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if q.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if q.len() > 3 {
            out.push(n as u8);
        }
    }
    Ok(out)
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
    let raw: Vec<u8> = match (s("data"), s("file")) {
        (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        (Some(d), None) => d.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f).map_err(|e| {
            format!(
                "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                blockd_core::error::strerror(&e)
            )
        })?,
    };
    let bytes = if format == "base64" {
        let text = String::from_utf8_lossy(&raw).into_owned();
        base64_decode(&text)?
    } else {
        raw
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
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes(), "{e}");
        }
        assert_eq!(base64_encode(b"secret"), "c2VjcmV0");
        assert_eq!(
            base64_decode("!!").unwrap_err(),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            base64_decode("abc").unwrap_err(),
            "Failed to decode base64 data"
        );
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
