//! Reading `server-key.pem` / `client-key.pem`, encrypted or not (what
//! GnuTLS's `gnutls_certificate_set_x509_key_file2` does for QEMU's
//! `qcrypto_tls_creds_x509_load`, with the password from the secret that
//! `passwordid` names).
//!
//! ```text
//! -----BEGIN ENCRYPTED PRIVATE KEY-----  PKCS#8 EncryptedPrivateKeyInfo:
//!                                        PBES2 (PBKDF2 with HMAC-SHA1/2, or
//!                                        scrypt; AES-128/192/256-CBC or
//!                                        3DES-CBC), decrypted with the password
//! -----BEGIN PRIVATE KEY-----            plain PKCS#8 ┐
//! -----BEGIN EC PRIVATE KEY-----         SEC1         ├ the password, if any,
//! -----BEGIN RSA PRIVATE KEY-----        PKCS#1       ┘ is not needed
//! ```
//!
//! Messages follow GnuTLS 3.7 as qemu-storage-daemon 10.0.2 prints them
//! (recorded): an encrypted key without a password, or with the wrong one,
//! is "Decryption has failed."; a file with no key in it is "The requested
//! data were not available.".
//!
//! Differences: OpenSSL's legacy encrypted PEM (`Proc-Type: 4,ENCRYPTED`
//! and `DEK-Info`, from `openssl ec|rsa -aes256 -traditional`), which
//! GnuTLS decrypts, is refused with a message saying to convert it to
//! PKCS#8, since its key derivation (OpenSSL's `EVP_BytesToKey`, one MD5
//! round) has no maintained Rust implementation; so are PKCS#12 and PBES1
//! schemes (`openssl pkcs8 -v1`). PBES2 with scrypt, which GnuTLS 3.7
//! cannot read ("ASN1 parser: Generic parsing error."), loads.
//!
//! The decrypted key is only ever in a buffer that is wiped when it goes
//! away, and so is the file's text. (What the `pkcs5` crate derives from
//! the password on its stack, and the key that ring keeps for signing,
//! are theirs to keep: neither wipes them.)

use std::sync::Arc;

use pkcs8::der::Decode;
use pkcs8::{EncryptedPrivateKeyInfoRef, PrivateKeyInfoRef};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use rustls::sign::SigningKey;
use zeroize::{Zeroize, Zeroizing};

/// Why a key file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No private key in the file (GnuTLS's `GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE`).
    NotAvailable,
    /// Encrypted, and no password or the wrong one (`GNUTLS_E_DECRYPTION_FAILED`).
    DecryptionFailed,
    /// OpenSSL's legacy encrypted PEM, which blockd does not read.
    LegacyEncryption,
    /// A PKCS#8 encryption scheme blockd does not read (PBES1, PKCS#12).
    UnsupportedScheme,
    /// scrypt parameters needing more than [`SCRYPT_MAX_MEMORY`].
    ScryptTooCostly,
}

/// The most memory (128·r·N bytes) a key's scrypt may take: a key file
/// must not be able to exhaust the server's memory (OpenSSL refuses past
/// 32 MiB by default; `openssl pkcs8 -scrypt` writes keys needing 16 MiB).
pub const SCRYPT_MAX_MEMORY: u64 = 1 << 30;

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyError::NotAvailable => "The requested data were not available.",
            KeyError::DecryptionFailed => "Decryption has failed.",
            KeyError::LegacyEncryption => {
                "OpenSSL's legacy encrypted PEM (Proc-Type: 4,ENCRYPTED) is not supported \
                 by blockd: convert the key with 'openssl pkcs8 -topk8 -v2 aes-256-cbc'"
            }
            KeyError::UnsupportedScheme => {
                "the key's encryption is not supported by blockd (it reads PKCS#8 PBES2 \
                 with PBKDF2 or scrypt and AES-CBC or 3DES-CBC)"
            }
            KeyError::ScryptTooCostly => {
                "the key's scrypt parameters need more than 1 GiB of memory"
            }
        })
    }
}

/// Which DER structure a key is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pkcs1,
    Sec1,
    Pkcs8,
}

/// A private key's DER bytes, wiped when dropped.
pub struct KeyDer {
    kind: Kind,
    der: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyDer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDer")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl KeyDer {
    /// The key for rustls, borrowing the wiped buffer (an owned
    /// `PrivateKeyDer` would be dropped by rustls without being wiped).
    fn borrowed(&self) -> PrivateKeyDer<'_> {
        let d: &[u8] = &self.der;
        match self.kind {
            Kind::Pkcs1 => PrivatePkcs1KeyDer::from(d).into(),
            Kind::Sec1 => PrivateSec1KeyDer::from(d).into(),
            Kind::Pkcs8 => PrivatePkcs8KeyDer::from(d).into(),
        }
    }

    /// The signing key ring makes of it.
    pub fn signing_key(&self) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        rustls::crypto::ring::sign::any_supported_type(&self.borrowed())
    }

    /// Whether the key is PKCS#8 (plain or decrypted).
    pub fn is_pkcs8(&self) -> bool {
        self.kind == Kind::Pkcs8
    }
}

/// The PEM block with this label, from its BEGIN line to the end of its
/// END line (GnuTLS, too, finds a key anywhere in the file).
fn pem_block<'a>(pem: &'a [u8], label: &str) -> Option<&'a [u8]> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let start = find(pem, begin.as_bytes())?;
    let stop = start + find(&pem[start..], end.as_bytes())? + end.len();
    Some(&pem[start..stop])
}

/// Refuses scrypt parameters that need more than [`SCRYPT_MAX_MEMORY`].
fn check_scrypt(scheme: &pkcs8::pkcs5::EncryptionScheme) -> Result<(), KeyError> {
    use pkcs8::pkcs5::{pbes2::Kdf, EncryptionScheme};
    if let EncryptionScheme::Pbes2(p) = scheme {
        if let Kdf::Scrypt(s) = &p.kdf {
            let mem = 128 * u128::from(s.block_size) * u128::from(s.cost_parameter);
            if mem > u128::from(SCRYPT_MAX_MEMORY) {
                return Err(KeyError::ScryptTooCostly);
            }
        }
    }
    Ok(())
}

/// Decrypts an `ENCRYPTED PRIVATE KEY` block into a PKCS#8 key.
fn decrypt_pkcs8(block: &[u8], password: Option<&str>) -> Result<KeyDer, KeyError> {
    let (_, der) = pkcs8::der::pem::decode_vec(block).map_err(|_| KeyError::NotAvailable)?;
    let info =
        EncryptedPrivateKeyInfoRef::from_der(&der).map_err(|_| KeyError::UnsupportedScheme)?;
    let Some(password) = password else {
        return Err(KeyError::DecryptionFailed);
    };
    check_scrypt(&info.encryption_algorithm)?;
    // Decrypted in place, so the plaintext is only ever in `buf`.
    let mut buf = Zeroizing::new(info.encrypted_data.as_bytes().to_vec());
    let n = match info
        .encryption_algorithm
        .decrypt_in_place(password.as_bytes(), &mut buf)
    {
        Ok(plain) => plain.len(),
        Err(pkcs8::pkcs5::Error::DecryptFailed) => return Err(KeyError::DecryptionFailed),
        Err(_) => return Err(KeyError::UnsupportedScheme),
    };
    // (Truncating keeps the capacity: the padding is wiped with it.)
    buf.truncate(n);
    // A wrong password passes the padding check once in ~256 tries: what
    // comes out is then not a key.
    if PrivateKeyInfoRef::from_der(&buf).is_err() {
        return Err(KeyError::DecryptionFailed);
    }
    Ok(KeyDer {
        kind: Kind::Pkcs8,
        der: buf,
    })
}

/// Reads a private key from a PEM file's contents, decrypting it with
/// `password` if it is encrypted. An unencrypted key ignores the password,
/// as GnuTLS does.
pub fn read(pem: &[u8], password: Option<&str>) -> Result<KeyDer, KeyError> {
    if let Some(block) = pem_block(pem, "ENCRYPTED PRIVATE KEY") {
        return decrypt_pkcs8(block, password);
    }
    if pem.windows(22).any(|w| w == b"Proc-Type: 4,ENCRYPTED") {
        return Err(KeyError::LegacyEncryption);
    }
    let mut key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotAvailable)?;
    let kind = match &key {
        PrivateKeyDer::Pkcs1(_) => Kind::Pkcs1,
        PrivateKeyDer::Sec1(_) => Kind::Sec1,
        _ => Kind::Pkcs8,
    };
    let der = Zeroizing::new(key.secret_der().to_vec());
    key.zeroize();
    Ok(KeyDer { kind, der })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A P-256 key made by openssl, plain (PKCS#8), then written by
    /// `openssl` with the given arguments and password `s3cret`.
    fn openssl(args: &[&str]) -> Option<(Vec<u8>, Vec<u8>)> {
        // (One folder per call: tests run in parallel.)
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("blockd-key-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let plain = dir.join("plain.pem");
        let out = dir.join("out.pem");
        let ok = Command::new("openssl")
            .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
            .arg("ec_paramgen_curve:P-256")
            .arg("-out")
            .arg(&plain)
            .status()
            .ok()?
            .success();
        assert!(ok, "openssl genpkey");
        let ok = Command::new("openssl")
            .args(args)
            .args(["-passout", "pass:s3cret", "-in"])
            .arg(&plain)
            .arg("-out")
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        assert!(ok, "openssl {args:?}");
        let r = (std::fs::read(&plain).ok()?, std::fs::read(&out).ok()?);
        let _ = std::fs::remove_dir_all(&dir);
        Some(r)
    }

    fn have_openssl() -> bool {
        let ok = Command::new("openssl").arg("version").output().is_ok();
        if !ok {
            eprintln!("skipped: no openssl");
        }
        ok
    }

    /// The DER of the plain PKCS#8 key that `openssl genpkey` wrote.
    fn plain_der(pem: &[u8]) -> Vec<u8> {
        read(pem, None).unwrap().der.to_vec()
    }

    #[test]
    fn pkcs8_pbes2_decrypts_with_the_right_password_only() {
        if !have_openssl() {
            return;
        }
        for args in [
            &["pkcs8", "-topk8", "-v2", "aes-256-cbc"][..],
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-128-cbc",
                "-v2prf",
                "hmacWithSHA1",
            ],
            &["pkcs8", "-topk8", "-v2", "des3"],
            &["pkcs8", "-topk8", "-scrypt"],
        ] {
            let (plain, enc) = openssl(args).unwrap();
            assert!(
                pem_block(&enc, "ENCRYPTED PRIVATE KEY").is_some(),
                "{args:?}"
            );
            let k = read(&enc, Some("s3cret")).unwrap();
            assert!(k.is_pkcs8());
            assert_eq!(*k.der, plain_der(&plain), "{args:?}");
            k.signing_key().unwrap();
            assert_eq!(
                read(&enc, Some("wrong")).unwrap_err(),
                KeyError::DecryptionFailed,
                "{args:?}"
            );
            assert_eq!(
                read(&enc, Some("")).unwrap_err(),
                KeyError::DecryptionFailed
            );
            assert_eq!(read(&enc, None).unwrap_err(), KeyError::DecryptionFailed);
        }
    }

    #[test]
    fn plain_keys_ignore_the_password() {
        if !have_openssl() {
            return;
        }
        let (plain, sec1) = openssl(&["ec"]).unwrap();
        for pem in [&plain, &sec1] {
            let k = read(pem, Some("anything")).unwrap();
            k.signing_key().unwrap();
            assert_eq!(read(pem, None).unwrap().der, k.der);
        }
        assert!(read(&plain, None).unwrap().is_pkcs8());
        assert!(!read(&sec1, None).unwrap().is_pkcs8());
    }

    #[test]
    fn legacy_and_pbes1_are_refused_with_a_reason() {
        if !have_openssl() {
            return;
        }
        let (_, legacy) = openssl(&["ec", "-aes256"]).unwrap();
        assert!(legacy.windows(9).any(|w| w == b"Proc-Type"));
        assert_eq!(
            read(&legacy, Some("s3cret")).unwrap_err(),
            KeyError::LegacyEncryption
        );
        let (_, pkcs12) = openssl(&["pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES"]).unwrap();
        assert_eq!(
            read(&pkcs12, Some("s3cret")).unwrap_err(),
            KeyError::UnsupportedScheme
        );
    }

    #[test]
    fn scrypt_memory_is_bounded() {
        use pkcs8::pkcs5::{pbes2::Kdf, EncryptionScheme};
        if !have_openssl() {
            return;
        }
        let (_, enc) = openssl(&["pkcs8", "-topk8", "-scrypt"]).unwrap();
        let block = pem_block(&enc, "ENCRYPTED PRIVATE KEY").unwrap();
        let (_, der) = pkcs8::der::pem::decode_vec(block).unwrap();
        let mut info = EncryptedPrivateKeyInfoRef::from_der(&der).unwrap();
        let mut with_n = |n: u64| {
            let EncryptionScheme::Pbes2(p) = &mut info.encryption_algorithm else {
                panic!("not PBES2");
            };
            let Kdf::Scrypt(s) = &mut p.kdf else {
                panic!("not scrypt");
            };
            // openssl's default: r = 8.
            assert_eq!(s.block_size, 8);
            s.cost_parameter = n;
            check_scrypt(&info.encryption_algorithm)
        };
        // openssl's default N (16 MiB), then 1 GiB, then 2 GiB.
        assert_eq!(with_n(16384), Ok(()));
        assert_eq!(with_n(1 << 20), Ok(()));
        assert_eq!(with_n(1 << 21), Err(KeyError::ScryptTooCostly));
    }

    #[test]
    fn no_key_is_not_available() {
        assert_eq!(read(b"junk\n", None).unwrap_err(), KeyError::NotAvailable);
        assert_eq!(
            read(
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n!!\n-----END ENCRYPTED PRIVATE KEY-----\n",
                Some("x")
            )
            .unwrap_err(),
            KeyError::NotAvailable
        );
        assert_eq!(
            KeyError::DecryptionFailed.to_string(),
            "Decryption has failed."
        );
    }
}
