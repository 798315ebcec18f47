//! LUKS encryption of rbd images, done by librbd (QEMU's
//! `qemu_rbd_encryption_load` for `encrypt` when opening, and
//! `qemu_rbd_encryption_format` for `blockdev-create`), with QEMU's
//! messages.
//!
//! ```text
//! open:   rbd_open ─► encrypt? ─► rbd_encryption_load(format, passphrase)
//!                                  └─► rbd_stat: the payload's size
//! create: rbd_create ─► rbd_open ─► rbd_encryption_format ─► resize so
//!         that the payload has the requested size; on failure rbd_remove
//! ```
//!
//! The passphrase is the value of a `secret` object (`key-secret`), in a
//! buffer wiped when dropped; librbd copies what it keeps.
//!
//! Debian 12's librbd is 1.16 (Ceph 16): `rbd_encryption_format` and
//! `rbd_encryption_load` with LUKS1 and LUKS2. The format `luks-any`
//! (`RBD_ENCRYPTION_FORMAT_LUKS`) and layered encryption (`parent`,
//! `rbd_encryption_load2`) came with librbd 1.17 (Ceph 17): refused as
//! QEMU built against librbd 1.16 refuses them ("RBD library does not
//! support layered encryption"; `luks-any` falls to QEMU's default case,
//! "unknown image encryption format: 2: Operation not supported").

use blockd_core::error::strerror;
use blockd_core::BlockError;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::image::{CipherAlg, Encryption, Image};
use crate::options::{RbdEncryptionOptions, RbdImageEncryptionFormat};
use crate::secrets::Secrets;

fn enotsup() -> String {
    strerror(&std::io::Error::from_raw_os_error(libc::ENOTSUP))
}

fn io_err(msg: String) -> BlockError {
    BlockError::new(blockd_core::ErrorKind::Io, msg)
}

/// `qcrypto_secret_lookup`: the passphrase in secret `id`.
fn passphrase(secrets: Option<&dyn Secrets>, id: &str) -> Result<Zeroizing<Vec<u8>>, BlockError> {
    let Some(s) = secrets else {
        return Err(BlockError::not_found(format!("No secret with id '{id}'")));
    };
    s.lookup(id).map_err(BlockError::invalid)
}

/// QEMU's default case for a format librbd (or the operation) lacks.
fn unknown_format(f: RbdImageEncryptionFormat) -> BlockError {
    BlockError::unsupported(format!(
        "unknown image encryption format: {}: {}",
        f.index(),
        enotsup()
    ))
}

/// The librbd 1.16 format of a QAPI one (`luks-any` has none).
fn librbd_format(f: RbdImageEncryptionFormat) -> Result<Encryption, BlockError> {
    match f {
        RbdImageEncryptionFormat::Luks => Ok(Encryption::Luks1),
        RbdImageEncryptionFormat::Luks2 => Ok(Encryption::Luks2),
        RbdImageEncryptionFormat::LuksAny => Err(unknown_format(f)),
    }
}

/// Loads the encryption of an open image (blocking), as `qemu_rbd_open`
/// does before it asks for the image's size.
pub fn load(
    image: &Image,
    e: &RbdEncryptionOptions,
    secrets: Option<&dyn Secrets>,
) -> Result<(), BlockError> {
    if e.parent.is_some() {
        return Err(BlockError::unsupported(
            "RBD library does not support layered encryption",
        ));
    }
    let format = librbd_format(e.format)?;
    let pass = passphrase(secrets, &e.key_secret)?;
    image
        .encryption_load(format, &pass)
        .map_err(|err| io_err(format!("encryption load fail: {}", strerror(&err))))
}

/// `QCryptoCipherAlgo`: QEMU's ciphers (librbd formats with AES only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)]
pub enum QCryptoCipherAlgo {
    #[serde(rename = "aes-128")]
    Aes128,
    #[serde(rename = "aes-192")]
    Aes192,
    #[serde(rename = "aes-256")]
    Aes256,
    #[serde(rename = "des")]
    Des,
    #[serde(rename = "3des")]
    TripleDes,
    #[serde(rename = "cast5-128")]
    Cast5_128,
    #[serde(rename = "serpent-128")]
    Serpent128,
    #[serde(rename = "serpent-192")]
    Serpent192,
    #[serde(rename = "serpent-256")]
    Serpent256,
    #[serde(rename = "twofish-128")]
    Twofish128,
    #[serde(rename = "twofish-192")]
    Twofish192,
    #[serde(rename = "twofish-256")]
    Twofish256,
    #[serde(rename = "sm4")]
    Sm4,
}

/// `RbdEncryptionCreateOptions`: how `blockdev-create` formats the new
/// image. `luks` and `luks2` take the passphrase's secret and a cipher;
/// `luks-any` takes nothing (and fails: it names no format to write).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdEncryptionCreateOptions {
    /// The format.
    pub format: RbdImageEncryptionFormat,
    /// The id of the `secret` object holding the passphrase.
    #[serde(rename = "key-secret")]
    pub key_secret: Option<String>,
    /// The cipher (default aes-256).
    #[serde(rename = "cipher-alg")]
    pub cipher_alg: Option<QCryptoCipherAlgo>,
}

/// `qemu_rbd_convert_luks_create_options`' choice of cipher.
fn cipher(alg: Option<QCryptoCipherAlgo>) -> Result<CipherAlg, BlockError> {
    match alg {
        None | Some(QCryptoCipherAlgo::Aes256) => Ok(CipherAlg::Aes256),
        Some(QCryptoCipherAlgo::Aes128) => Ok(CipherAlg::Aes128),
        Some(a) => Err(BlockError::unsupported(format!(
            "unknown encryption algorithm: {}: {}",
            a as u32,
            enotsup()
        ))),
    }
}

/// Formats a new image (blocking): the LUKS header goes at its start, and
/// the image grows by the header's size so that the payload keeps the
/// size asked for (`qemu_rbd_encryption_format`).
pub fn format(
    image: &Image,
    e: &RbdEncryptionCreateOptions,
    secrets: Option<&dyn Secrets>,
) -> Result<(), BlockError> {
    let raw = image
        .size()
        .map_err(|err| io_err(format!("cannot get raw image size: {}", strerror(&err))))?;
    let format = librbd_format(e.format)?;
    // The schema requires key-secret for luks and luks2.
    let id = e.key_secret.as_deref().unwrap_or_default();
    let pass = passphrase(secrets, id)?;
    let alg = cipher(e.cipher_alg)?;
    image
        .encryption_format(format, alg, &pass)
        .map_err(|err| io_err(format!("encryption format fail: {}", strerror(&err))))?;
    let effective = image.size().map_err(|err| {
        io_err(format!(
            "cannot get effective image size: {}",
            strerror(&err)
        ))
    })?;
    image
        .resize(raw + raw.saturating_sub(effective))
        .map_err(|err| {
            io_err(format!(
                "cannot resize image after format: {}",
                strerror(&err)
            ))
        })
}

/// `qemu_rbd_get_specific_info`'s probe: the format whose magic the
/// first 8 bytes of the image (as the node reads it) carry. LUKS headers
/// of librbd's layered encryption start "RBDL" instead of "LUKS".
pub fn probe(head: &[u8]) -> Option<RbdImageEncryptionFormat> {
    let (magic, version) = (head.get(..6)?, head.get(6..8)?);
    if magic != b"LUKS\xba\xbe" && magic != b"RBDL\xba\xbe" {
        return None;
    }
    match version {
        [0, 1] => Some(RbdImageEncryptionFormat::Luks),
        [0, 2] => Some(RbdImageEncryptionFormat::Luks2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::RbdImageEncryptionFormat as F;

    #[test]
    fn refusals_have_qemus_words() {
        assert_eq!(
            librbd_format(F::LuksAny).unwrap_err().msg,
            "unknown image encryption format: 2: Operation not supported"
        );
        assert_eq!(librbd_format(F::Luks2).unwrap(), Encryption::Luks2);
        assert_eq!(
            cipher(Some(QCryptoCipherAlgo::Twofish256)).unwrap_err().msg,
            "unknown encryption algorithm: 11: Operation not supported"
        );
        assert_eq!(
            cipher(Some(QCryptoCipherAlgo::Aes192)).unwrap_err().msg,
            "unknown encryption algorithm: 1: Operation not supported"
        );
        assert_eq!(cipher(None).unwrap(), CipherAlg::Aes256);
        assert_eq!(
            cipher(Some(QCryptoCipherAlgo::Aes128)).unwrap(),
            CipherAlg::Aes128
        );
        assert_eq!(
            passphrase(None, "p").unwrap_err().msg,
            "No secret with id 'p'"
        );
    }

    #[test]
    fn probe_knows_luks_magic() {
        assert_eq!(probe(b"LUKS\xba\xbe\0\x01rest"), Some(F::Luks));
        assert_eq!(probe(b"LUKS\xba\xbe\0\x02"), Some(F::Luks2));
        assert_eq!(probe(b"RBDL\xba\xbe\0\x02"), Some(F::Luks2));
        assert_eq!(probe(b"LUKS\xba\xbe\0\x03"), None);
        assert_eq!(probe(b"\0\0\0\0\0\0\0\0"), None);
        assert_eq!(probe(b"LUKS"), None);
    }

    #[test]
    fn options_parse_as_the_schema_has_them() {
        let o: RbdEncryptionOptions = serde_json::from_value(serde_json::json!(
            {"format": "luks2", "key-secret": "k",
             "parent": {"format": "luks-any", "key-secret": "p"}}
        ))
        .unwrap();
        assert_eq!(o.parent.unwrap().format, F::LuksAny);
        let c: RbdEncryptionCreateOptions = serde_json::from_value(
            serde_json::json!({"format": "luks", "key-secret": "k", "cipher-alg": "3des"}),
        )
        .unwrap();
        assert_eq!(c.cipher_alg, Some(QCryptoCipherAlgo::TripleDes));
    }
}
