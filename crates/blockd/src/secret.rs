//! `secret` objects (QEMU's crypto/secret.c and secret_common.c): a
//! password or key given inline (`data`) or in a file (`file`), raw or in
//! base64 (`format`), possibly encrypted with another secret (`keyid`,
//! `iv`), created with `object-add` or `--object` and looked up by id by
//! the drivers that need one (rbd's `key-secret`, and the passphrase of
//! its `encrypt`).
//!
//! Loading is QEMU's `qcrypto_secret_complete`:
//!
//! ```text
//! data | file ──► bytes ─┬─ no keyid: base64-decoded if format=base64
//!                        └─ keyid: base64-decoded if format=base64, then
//!                           AES-256-CBC with secret `keyid` (32 bytes)
//!                           and `iv` (base64, 16 bytes), padding stripped
//! ```
//!
//! libvirt uses the second form: a master key of 32 raw bytes in a file,
//! then every other secret (RBD keys, TLS key passwords) encrypted with it
//! and sent in base64. A value is used by rbd's `key-secret` (in base64)
//! and by `tls-creds-x509`'s `passwordid` (as UTF-8 text, the password of
//! an encrypted key). The secret is decrypted once, when it is created;
//! deleting the master key later leaves it as it is, as in QEMU. Without
//! `keyid` an `iv` is kept and not used, as in QEMU.
//!
//! A secret's value is never logged, put into a message or returned:
//! `qom-get` of `data` is refused (QEMU returns it; blockd's rule is that
//! a key is never echoed). Its bytes, and every buffer that held them on
//! the way (the file's contents, decoded and decrypted text, the cipher's
//! key schedule), are overwritten when they go away.

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
    keyid: Option<String>,
    iv: Option<String>,
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

/// QEMU's `qcrypto_secret_decrypt`: `input` (base64-decoded first if
/// `base64`) is AES-256-CBC ciphertext under the secret `keyid`'s value
/// and the base64 `iv`; the last decrypted byte counts the padding to
/// strip. As in QEMU that byte is only checked to be at most 16 and at
/// most the length (so PKCS#7 padding, which openssl and libvirt write,
/// passes, and so does a 0).
fn decrypt(
    input: Bytes,
    base64: bool,
    keyid: &str,
    iv: Option<&str>,
    lookup: impl FnOnce(&str) -> Result<Arc<Secret>, String>,
) -> Result<Bytes, String> {
    use cbc::cipher::{block_padding::NoPadding, BlockModeDecrypt, KeyIvInit};

    let master = lookup(keyid)?;
    let key: &[u8] = &master.bytes;
    if key.len() != 32 {
        return Err("Key should be 32 bytes in length".into());
    }
    let iv = base64_decode(iv.ok_or("IV is required to decrypt secret")?.as_bytes())?;
    if iv.len() != 16 {
        return Err(format!("IV should be 16 bytes in length not {}", iv.len()));
    }
    let mut text = if base64 { decode(&input)? } else { input };
    // (QEMU's cipher layer's message.)
    let len = text.len();
    let block_size = || format!("Length {len} must be a multiple of block size 16");
    if len % 16 != 0 {
        return Err(block_size());
    }
    let aes = cbc::Decryptor::<aes::Aes256>::new_from_slices(key, &iv)
        .map_err(|_| "Key should be 32 bytes in length".to_string())?;
    // In place, so the plaintext is only ever in `text`.
    let n = aes
        .decrypt_padded::<NoPadding>(&mut text)
        .map_err(|_| block_size())?
        .len();
    // QEMU reads the byte before an empty plaintext, 0 in practice (an
    // allocator's header): an empty ciphertext is an empty secret.
    let pad = if n == 0 { 0 } else { text[n - 1] };
    if pad > 16 || usize::from(pad) > n {
        return Err(format!(
            "Incorrect number of padding bytes ({pad}) found on decrypted data"
        ));
    }
    // (Truncating keeps the capacity: the stripped tail is wiped with it.)
    text.truncate(n - usize::from(pad));
    Ok(text)
}

/// Loads a secret from `object-add`'s properties (already checked
/// against the schema), as QEMU's `qcrypto_secret_load_data` and
/// `qcrypto_secret_complete` do. `lookup` finds the secret that `keyid`
/// names (QEMU's `qcrypto_secret_lookup`, with its errors).
pub fn load(
    props: &Map<String, Value>,
    lookup: impl FnOnce(&str) -> Result<Arc<Secret>, String>,
) -> Result<Secret, String> {
    let s = |k: &str| props.get(k).and_then(Value::as_str);
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
    let base64 = format == "base64";
    let bytes = match s("keyid") {
        Some(keyid) => decrypt(input, base64, keyid, s("iv"), lookup)?,
        None if base64 => decode(&input)?,
        None => input,
    };
    Ok(Secret {
        bytes,
        format,
        file: s("file").map(str::to_string),
        keyid: s("keyid").map(str::to_string),
        iv: s("iv").map(str::to_string),
    })
}

/// The errors of QEMU's `qcrypto_secret_lookup` for a `keyid` that names
/// no secret with a value.
pub mod lookup_error {
    /// No object with this id.
    pub fn missing(id: &str) -> String {
        format!("No secret with id '{id}'")
    }

    /// An object of another type.
    pub fn not_a_secret(id: &str) -> String {
        format!("Object with id '{id}' is not a secret")
    }

    /// The secret being created names itself: QEMU adds it to `/objects`
    /// before loading it, so it is found, without a value yet.
    pub fn no_data(id: &str) -> String {
        format!("Secret with id '{id}' has no data")
    }
}

impl Secret {
    /// The value as text (QEMU's `qcrypto_secret_lookup_as_utf8`, for a
    /// TLS key's password): UTF-8 without a NUL byte, which glib's
    /// `g_utf8_validate` refuses within a given length. `id` names the
    /// secret in the error.
    pub fn utf8(&self, id: &str) -> Result<Zeroizing<String>, String> {
        match std::str::from_utf8(&self.bytes) {
            Ok(t) if !t.contains('\0') => {
                // Sized first, so no copy is left behind by a reallocation.
                let mut s = Zeroizing::new(String::with_capacity(t.len()));
                s.push_str(t);
                Ok(s)
            }
            _ => Err(format!("Data from secret {id} is not valid UTF-8")),
        }
    }

    /// `qom-get`: `format`, `file`, `keyid` and `iv`; never `data`.
    pub fn get(&self, prop: &str) -> Option<Result<Value, String>> {
        Some(match prop {
            "format" => Ok(self.format.into()),
            "file" => Ok(self.file.clone().unwrap_or_default().into()),
            "data" => Err(
                "Property 'secret.data' is not readable in blockd (a secret is never shown)".into(),
            ),
            "keyid" => Ok(self.keyid.clone().unwrap_or_default().into()),
            "iv" => Ok(self.iv.clone().unwrap_or_default().into()),
            _ => return None,
        })
    }
}

/// The secrets of a server, by object id, shared with the drivers.
#[derive(Default)]
pub struct SecretStore {
    map: Mutex<HashMap<String, Arc<Secret>>>,
    /// Ids of the other objects, for QEMU's "is not a secret".
    others: Mutex<std::collections::HashSet<String>>,
}

impl SecretStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Secret>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a secret (the caller checked the id is free).
    pub fn insert(&self, id: &str, s: Arc<Secret>) {
        self.lock().insert(id.to_string(), s);
    }

    /// Notes an object of another type (its id is taken).
    pub fn note_other(&self, id: &str) {
        self.others_lock().insert(id.to_string());
    }

    /// Forgets the object `id`, a secret or not.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
        self.others_lock().remove(id);
    }

    fn others_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.others.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The secret `id`, with QEMU's `qcrypto_secret_lookup` errors for an
    /// id that names another object or nothing.
    pub fn get(&self, id: &str) -> Result<Arc<Secret>, String> {
        let s = self.lock().get(id).cloned();
        s.ok_or_else(|| {
            if self.others_lock().contains(id) {
                lookup_error::not_a_secret(id)
            } else {
                lookup_error::missing(id)
            }
        })
    }
}

impl blockd_drivers::secrets::Secrets for SecretStore {
    fn lookup_base64(&self, id: &str) -> Result<String, String> {
        self.get(id).map(|s| base64_encode(&s.bytes))
    }

    fn lookup(&self, id: &str) -> Result<Bytes, String> {
        self.get(id).map(|s| Zeroizing::new(s.bytes.to_vec()))
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

    /// A lookup that finds no secret.
    fn none(id: &str) -> Result<Arc<Secret>, String> {
        Err(lookup_error::missing(id))
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
        let e = |v: Value| load(&props(v), none).unwrap_err();
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
        let s = load(
            &props(json!({"data": "c2VjcmV0", "format": "base64"})),
            none,
        )
        .unwrap();
        assert!(s.get("data").unwrap().is_err(), "never shown");
        assert_eq!(s.get("format").unwrap().unwrap(), "base64");
        assert!(!format!("{s:?}").contains("secret"));
        store.insert("k", Arc::new(s));
        assert_eq!(store.lookup_base64("k").unwrap(), "c2VjcmV0");
        store.insert(
            "r",
            Arc::new(load(&props(json!({"data": "secret"})), none).unwrap()),
        );
        assert_eq!(store.lookup_base64("r").unwrap(), "c2VjcmV0");
        assert_eq!(*store.lookup("r").unwrap(), b"secret");
        store.remove("k");
        assert_eq!(
            store.lookup_base64("k").unwrap_err(),
            "No secret with id 'k'"
        );
    }

    // Vectors made with openssl, which pads as libvirt does (PKCS#7):
    //   printf 'ceph-secret-value' |
    //     openssl enc -aes-256-cbc -K "$KEY" -iv "$IV" | base64
    // (-nopad for the badly padded ones).
    const KEY: &str = "44965837e30c3867729ef76ea913ada2556ba044d99c27351a282d6bc3d1839e";
    const IV: &str = "aOQvjia4lZZFEiiGB1jrrQ=="; // 68e42f8e26b89596451228860758ebad
    /// 'ceph-secret-value', 17 bytes: two blocks, 15 bytes of padding.
    const CEPH: &str = "5aJ0Ul9aeMdV3dyIkc9rPlVp7T+zALeXBaODsX2a42Q=";
    const CEPH_HEX: &str = "e5a274525f5a78c755dddc8891cf6b3e5569ed3fb300b79705a383b17d9ae364";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Secrets by id, for `keyid`: "master" holds KEY.
    fn masters(id: &str) -> Result<Arc<Secret>, String> {
        let data = match id {
            "master" => base64_encode(&unhex(KEY)),
            "short" => base64_encode(&unhex(&KEY[..62])),
            // QEMU's own master key (tests/unit/test-crypto-secret.c).
            "qemu" => "9miloPQCzGy+TL6aonfzVcptibCmCIhKzrnlfwiWivk=".into(),
            _ => return none(id),
        };
        Ok(Arc::new(load(
            &props(json!({"data": data, "format": "base64"})),
            none,
        )?))
    }

    fn decrypted(v: Value) -> Result<Vec<u8>, String> {
        load(&props(v), masters).map(|s| s.bytes.to_vec())
    }

    fn encrypted(data: &str) -> Value {
        json!({"data": data, "format": "base64", "keyid": "master", "iv": IV})
    }

    #[test]
    fn keyid_decrypts_base64_and_raw() {
        assert_eq!(decrypted(encrypted(CEPH)).unwrap(), b"ceph-secret-value");
        // A whole block of padding; an empty secret.
        assert_eq!(
            decrypted(encrypted("nxE3eIbzlGnYggxRtztVmiM2w5iZkU6dqAIH6hoAcgw=")).unwrap(),
            b"0123456789abcdef"
        );
        assert_eq!(
            decrypted(encrypted("oB101egXHhivxYfScUVdbA==")).unwrap(),
            b""
        );
        // The padding is only checked to be at most 16: a last byte of 0
        // strips nothing (QEMU takes it too).
        assert_eq!(
            decrypted(encrypted("5Mk6cg/G5njjwpIAHkNShA==")).unwrap(),
            b"0123456789abcde\0"
        );
        // QEMU reads before the buffer there; blockd makes it empty.
        assert_eq!(decrypted(encrypted("")).unwrap(), b"");

        // Raw: the ciphertext's own bytes, from a file (as is the master
        // key that libvirt writes, 32 raw bytes).
        let dir = std::env::temp_dir().join(format!("blockd-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = (dir.join("ceph.bin"), dir.join("master.key"));
        std::fs::write(&c, unhex(CEPH_HEX)).unwrap();
        std::fs::write(&k, unhex(KEY)).unwrap();
        let master = Arc::new(load(&props(json!({"file": k})), none).unwrap());
        let s = load(&props(json!({"file": c, "keyid": "m", "iv": IV})), |id| {
            assert_eq!(id, "m");
            Ok(master.clone())
        })
        .unwrap();
        assert_eq!(*s.bytes, b"ceph-secret-value");
        assert_eq!(s.get("format").unwrap().unwrap(), "raw");
        assert_eq!(s.get("keyid").unwrap().unwrap(), "m");
        assert_eq!(s.get("iv").unwrap().unwrap(), IV);
        assert!(s.get("data").unwrap().is_err(), "never shown");
        std::fs::remove_dir_all(&dir).unwrap();

        // QEMU's own vector (tests/unit/test-crypto-secret.c).
        let v = json!({"data": "zL/3CUYZC1IqOrRrzXqwsA==", "format": "base64",
            "keyid": "qemu", "iv": "0I7Gw/TKuA+Old2W2apQ3g=="});
        assert_eq!(decrypted(v).unwrap(), b"123456");
    }

    /// The errors qemu-storage-daemon 10.0.2 gives (recorded with QMP),
    /// in its order: the data is loaded first, then the master key, the
    /// IV, the ciphertext.
    #[test]
    fn keyid_errors_as_qemu() {
        let e = |v: Value| decrypted(v).unwrap_err();
        let with = |k: &str, v: Value| {
            let mut p = encrypted(CEPH);
            p[k] = v;
            p
        };
        assert_eq!(
            e(json!({"keyid": "master", "iv": IV})),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            e(with("keyid", "nosuch".into())),
            "No secret with id 'nosuch'"
        );
        assert_eq!(
            e(with("keyid", "short".into())),
            "Key should be 32 bytes in length"
        );
        let mut p = encrypted(CEPH);
        p.as_object_mut().unwrap().remove("iv");
        assert_eq!(e(p), "IV is required to decrypt secret");
        assert_eq!(
            e(with("iv", "!!".into())),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            e(with("iv", "YWJj".into())),
            "IV should be 16 bytes in length not 3"
        );
        assert_eq!(
            e(with("iv", "abc".into())),
            "IV should be 16 bytes in length not 0"
        );
        assert_eq!(
            e(with("iv", "".into())),
            "IV should be 16 bytes in length not 0"
        );
        assert_eq!(
            e(with("data", "!!".into())),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            e(with("data", "YWJj".into())),
            "Length 3 must be a multiple of block size 16"
        );
        // Raw: the base64 text itself is the ciphertext.
        assert_eq!(
            e(with("format", "raw".into())),
            "Length 44 must be a multiple of block size 16"
        );
        // '0123456789abcdef' without padding: the last byte is 'f'.
        assert_eq!(
            e(with("data", "nxE3eIbzlGnYggxRtztVmg==".into())),
            "Incorrect number of padding bytes (102) found on decrypted data"
        );
        // A wrong master key makes garbage, whose last byte is rarely a
        // valid padding length (QEMU's check is all there is; openssl
        // -d -nopad with this key ends in 0x63 too).
        let wrong = |id: &str| {
            assert_eq!(id, "master");
            let mut k = unhex(KEY);
            k[0] ^= 1;
            let data = base64_encode(&k);
            Ok(Arc::new(load(
                &props(json!({"data": data, "format": "base64"})),
                none,
            )?))
        };
        assert_eq!(
            load(&props(encrypted(CEPH)), wrong).unwrap_err(),
            "Incorrect number of padding bytes (99) found on decrypted data"
        );
        // Without keyid an iv is kept and unused.
        let s = load(&props(json!({"data": "plain", "iv": IV})), none).unwrap();
        assert_eq!(*s.bytes, b"plain");
        assert_eq!(s.get("iv").unwrap().unwrap(), IV);
        assert_eq!(s.get("keyid").unwrap().unwrap(), "");
    }

    /// `qcrypto_secret_lookup_as_utf8` (a TLS key's password): UTF-8
    /// without NUL, or QEMU's message (recorded with qemu-storage-daemon
    /// 10.0.2 in tests/transcripts/tls/005-x509-passwordid.qmp).
    #[test]
    fn utf8_text_only() {
        let text = |v: Value| load(&props(v), none).unwrap().utf8("p");
        assert_eq!(*text(json!({"data": "p\u{e4}ss"})).unwrap(), "p\u{e4}ss");
        assert_eq!(*text(json!({"data": ""})).unwrap(), "");
        let bad = Err("Data from secret p is not valid UTF-8".to_string());
        // A byte 0xff; a NUL given as base64; a NUL in `data` (0xc0 0x80).
        for v in [
            json!({"data": "/w==", "format": "base64"}),
            json!({"data": "YQBi", "format": "base64"}),
            json!({"data": "a\u{0}b"}),
        ] {
            assert_eq!(text(v.clone()).map(|s| s.to_string()), bad, "{v}");
        }
    }
}
