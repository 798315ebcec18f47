//! Loading `tls-creds-x509` credentials (QEMU's
//! `qcrypto_tls_creds_x509_load`, `qcrypto_tls_creds_get_path` and
//! `qcrypto_tls_creds_x509_sanity_check`), with QEMU's messages.
//!
//! Files in `dir`: `ca-cert.pem` (required), `ca-crl.pem` (optional,
//! server), `server-cert.pem` and `server-key.pem` (required, server),
//! `client-cert.pem` and `client-key.pem` (optional, client). A file that
//! cannot be read is "Unable to access credentials PATH: STRERROR".
//!
//! The key may be encrypted ([`super::key`]): its password comes from the
//! caller's lookup of the `passwordid` secret, made where QEMU makes it
//! (after the sanity checks and the CA list, and only when there are a
//! certificate and a key to load), so that errors come in QEMU's order.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use super::verify::{AcceptAnyServerCert, OfferClientAuth};
use super::Endpoint;

/// The properties of a `tls-creds-x509` object that loading uses.
#[derive(Debug, Clone)]
pub struct X509Options {
    /// Directory holding the files.
    pub dir: Option<String>,
    /// Client or server.
    pub endpoint: Endpoint,
    /// Whether the peer's certificate is checked.
    pub verify_peer: bool,
    /// Whether this side's certificates are checked when loaded.
    pub sanity_check: bool,
}

/// Loaded credentials.
pub struct X509Creds {
    /// Client or server.
    pub endpoint: Endpoint,
    /// Whether the peer's certificate is checked.
    pub verify_peer: bool,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
    pub(crate) server: Option<Arc<ServerConfig>>,
    pub(crate) client: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for X509Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Creds")
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

/// The ring provider, with AES-128-GCM preferred to AES-256-GCM: the
/// data path's cost is the record cipher, and the shorter key schedule
/// is faster on every CPU while being as safe for this use (TLS 1.3's
/// mandatory suite).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let aes128 = |s: &rustls::SupportedCipherSuite| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    };
    // A stable sort: AES-128-GCM first, the rest in ring's order.
    p.cipher_suites.sort_by_key(|s| !aes128(s));
    Arc::new(p)
}

/// `strerror` without Rust's " (os error N)".
fn strerror(e: &std::io::Error) -> String {
    crate::client::strerror(e)
}

/// QEMU's `qcrypto_tls_creds_get_path`: `Ok(None)` for a missing optional file.
fn path(dir: &str, name: &str, required: bool) -> Result<Option<String>, String> {
    let p = format!("{dir}/{name}");
    match std::fs::metadata(&p) {
        Ok(_) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {p}: {}",
            strerror(&e)
        )),
    }
}

fn read(p: &str) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("Cannot load CA cert list {p}: {}", strerror(&e)))
}

/// The certificates of a PEM file.
fn certs(data: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(data)
        .filter_map(Result::ok)
        .collect()
}

/// GnuTLS's words for a certificate that does not import.
fn import_error(data: &[u8]) -> &'static str {
    if certs(data).is_empty() {
        "Base64 unexpected header error."
    } else {
        "ASN1 parser: Error in DER parsing."
    }
}

/// Seconds since the epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `qcrypto_tls_creds_check_cert`: dates, basic constraints, key usage
/// and (not for a CA) key purpose.
fn check_cert(c: &X509Certificate<'_>, file: &str, server: bool, ca: bool) -> Result<(), String> {
    let who = if ca {
        "CA"
    } else if server {
        "server"
    } else {
        "client"
    };
    let v = c.validity();
    if v.not_after.timestamp() < now() {
        return Err(format!("The {who} certificate {file} has expired"));
    }
    if v.not_before.timestamp() > now() {
        return Err(format!("The {who} certificate {file} is not yet active"));
    }
    let role = if server { "server" } else { "client" };
    match c.basic_constraints() {
        Ok(Some(b)) if b.value.ca && !ca => {
            return Err(format!(
                "The certificate {file} basic constraints show a CA, but we need one for a {role}"
            ))
        }
        Ok(Some(b)) if !b.value.ca && ca => {
            return Err(format!(
                "The certificate {file} basic constraints do not show a CA"
            ))
        }
        Ok(None) if ca => {
            return Err(format!(
                "The certificate {file} is missing basic constraints for a CA"
            ))
        }
        Err(e) => {
            return Err(format!(
                "Unable to query certificate {file} basic constraints: {e}"
            ))
        }
        _ => {}
    }
    if let Ok(Some(ku)) = c.key_usage() {
        let (u, critical) = (ku.value, ku.critical);
        if critical && ca && !u.key_cert_sign() {
            return Err(format!(
                "Certificate {file} usage does not permit certificate signing"
            ));
        }
        if critical && !ca && !u.digital_signature() {
            return Err(format!(
                "Certificate {file} usage does not permit digital signature"
            ));
        }
        if critical && !ca && !u.key_encipherment() {
            return Err(format!(
                "Certificate {file} usage does not permit key encipherment"
            ));
        }
    }
    if !ca {
        if let Ok(Some(eku)) = c.extended_key_usage() {
            let p = eku.value;
            let allowed = p.any || if server { p.server_auth } else { p.client_auth };
            if eku.critical && !allowed {
                return Err(if server {
                    format!("Certificate {file} purpose does not allow use with a TLS server")
                } else {
                    format!("Certificate {file} purpose does not allow use with a TLS client")
                });
            }
        }
    }
    Ok(())
}

/// `qcrypto_tls_creds_x509_sanity_check`.
fn sanity_check(server: bool, cacert: &str, cert: Option<&str>) -> Result<(), String> {
    let mut own = None;
    if let Some(f) = cert {
        let data = read(f)?;
        let der = certs(&data).into_iter().next();
        let parsed = der
            .as_ref()
            .and_then(|d| X509Certificate::from_der(d).ok().map(|_| d.clone()));
        match parsed {
            Some(d) => own = Some((f, d)),
            None => {
                return Err(format!(
                    "Unable to import {} certificate {f}: {}",
                    if server { "server" } else { "client" },
                    import_error(&data)
                ))
            }
        }
    }
    let data = read(cacert)?;
    let cas = certs(&data);
    if cas.is_empty() || cas.iter().any(|c| X509Certificate::from_der(c).is_err()) {
        return Err(format!("Unable to import CA certificate list {cacert}"));
    }
    if let Some((f, d)) = &own {
        let (_, c) = X509Certificate::from_der(d).map_err(|e| e.to_string())?;
        check_cert(&c, f, server, false)?;
    }
    for d in &cas {
        let (_, c) = X509Certificate::from_der(d).map_err(|e| e.to_string())?;
        check_cert(&c, cacert, server, true)?;
    }
    if let Some((f, d)) = &own {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(cas.clone());
        if let Err(reason) = super::verify::chain(Arc::new(roots), &[], server, d, &[]) {
            return Err(format!(
                "Our own certificate {f} failed validation against {cacert}: {reason}"
            ));
        }
    }
    Ok(())
}

/// A key's password: the value of the secret `passwordid` names, or
/// `None` without `passwordid`; `Err` is the lookup's message.
pub type Password = Result<Option<Zeroizing<String>>, String>;

/// The certificate chain and the key ring signs with, checked to match
/// (rustls' `with_single_cert`, from a key in a wiped buffer).
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &super::key::KeyDer,
) -> Result<Arc<SingleCertAndKey>, ()> {
    let ck = CertifiedKey::new(chain, key.signing_key().map_err(|_| ())?);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(SingleCertAndKey::from(ck)))
        }
        Err(_) => Err(()),
    }
}

impl X509Creds {
    /// Loads the credentials as QEMU's `tls-creds-x509` completion does.
    /// `password` is called when the key is about to be read, as QEMU
    /// looks up `passwordid`'s secret.
    pub fn load(o: &X509Options, password: impl FnOnce() -> Password) -> Result<X509Creds, String> {
        let Some(dir) = o.dir.as_deref() else {
            return Err("Missing 'dir' property value".into());
        };
        let server = o.endpoint == Endpoint::Server;
        let cacert = path(dir, "ca-cert.pem", true)?.unwrap_or_default();
        let (cacrl, cert, key) = if server {
            let crl = path(dir, "ca-crl.pem", false)?;
            let cert = path(dir, "server-cert.pem", true)?;
            let key = path(dir, "server-key.pem", true)?;
            (crl, cert, key)
        } else {
            let cert = path(dir, "client-cert.pem", false)?;
            let key = path(dir, "client-key.pem", false)?;
            (None, cert, key)
        };
        if o.sanity_check {
            sanity_check(server, &cacert, cert.as_deref())?;
        }
        let data = read(&cacert)?;
        let cas = certs(&data);
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(format!(
                "Cannot load CA certificate '{cacert}': Base64 decoding error."
            ));
        }
        let roots = Arc::new(roots);
        let mut chain_key = None;
        if let (Some(c), Some(k)) = (&cert, &key) {
            // QEMU looks the password up before GnuTLS reads the files,
            // and GnuTLS reads the key before the certificate.
            let password = password()?;
            let fail = |why: &str| format!("Cannot load certificate '{c}' & key '{k}': {why}");
            let kd = Zeroizing::new(std::fs::read(k).map_err(|e| fail(&strerror(&e)))?);
            let pk = super::key::read(&kd, password.as_deref().map(String::as_str))
                .map_err(|e| fail(&e.to_string()))?;
            let chain = certs(&read(c)?);
            if chain.is_empty() {
                // (Recorded with qemu-storage-daemon 10.0.2: sanity-check
                // off, a certificate file without a certificate.)
                return Err(fail("Base64 decoding error."));
            }
            let mismatch = fail("The certificate and the given key do not match.");
            chain_key = Some(certified(chain, &pk).map_err(|()| mismatch)?);
        }
        let mut crls = Vec::new();
        if let Some(f) = &cacrl {
            let d =
                std::fs::read(f).map_err(|e| format!("Cannot load CRL '{f}': {}", strerror(&e)))?;
            crls = CertificateRevocationListDer::pem_slice_iter(&d)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("Cannot load CRL '{f}': Base64 unexpected header error."))?;
        }
        let prov = provider();
        let mut creds = X509Creds {
            endpoint: o.endpoint,
            verify_peer: o.verify_peer,
            roots: roots.clone(),
            crls,
            server: None,
            client: None,
        };
        if server {
            let Some(resolver) = chain_key else {
                return Err("Missing 'dir' property value".into());
            };
            let b = ServerConfig::builder_with_provider(prov.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let b = if o.verify_peer {
                b.with_client_cert_verifier(Arc::new(OfferClientAuth::new(prov.clone())))
            } else {
                b.with_no_client_auth()
            };
            let mut cfg = b.with_cert_resolver(resolver);
            // Our order (AES-128-GCM first), not GnuTLS's (AES-256 first).
            cfg.ignore_client_order = true;
            creds.server = Some(Arc::new(cfg));
        } else {
            let b = ClientConfig::builder_with_provider(prov.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert::new(prov)));
            let cfg = match chain_key {
                Some(resolver) => b.with_client_cert_resolver(resolver),
                None => b.with_no_client_auth(),
            };
            creds.client = Some(Arc::new(cfg));
        }
        Ok(creds)
    }
}
