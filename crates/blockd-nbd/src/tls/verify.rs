//! Peer checks after the handshake (QEMU's
//! `qcrypto_tls_session_check_certificate`), and the verifiers that let
//! the handshake through to them.
//!
//! During the handshake the verifiers only check the peer's handshake
//! signature (proof that it holds its certificate's key): the chain,
//! dates, revocation, host name and authorization are checked once the
//! handshake is done, as GnuTLS sessions in QEMU do, so that a refused
//! peer gets QEMU's message and is dropped without an alert.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};

use super::{TlsRegistry, X509Creds};

/// Client side: any server certificate passes the handshake.
#[derive(Debug)]
pub(crate) struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl AcceptAnyServerCert {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        AcceptAnyServerCert { provider }
    }
}

/// The handshake signature checks both verifiers leave to the provider
/// (only the certificate checks are their own).
fn tls12(
    p: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls12_signature(message, cert, dss, &p.signature_verification_algorithms)
}

fn tls13(
    p: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(message, cert, dss, &p.signature_verification_algorithms)
}

fn schemes(p: &CryptoProvider) -> Vec<SignatureScheme> {
    p.signature_verification_algorithms.supported_schemes()
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Server side with `verify-peer`: asks for a client certificate (as
/// GnuTLS's `GNUTLS_CERT_REQUEST`: not required by the handshake), lets
/// any through. It names no CA: GnuTLS clients then send the certificate
/// they have even when another CA signed it, so that the server can say
/// why it refuses it, as QEMU's server does.
#[derive(Debug)]
pub(crate) struct OfferClientAuth {
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
}

impl OfferClientAuth {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        OfferClientAuth {
            hints: Vec::new(),
            provider,
        }
    }
}

impl ClientCertVerifier for OfferClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// GnuTLS's reasons for a chain that does not verify
/// (`gnutls_certificate_verify_peers2` status bits as QEMU words them).
fn reason(e: &Error) -> &'static str {
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "The certificate hasn't got a known issuer"
        }
        Error::InvalidCertificate(CertificateError::Revoked) => "The certificate has been revoked",
        _ => "The certificate is not trusted",
    }
}

/// Verifies `end` (with `intermediates`) against `roots` (and `crls`) for
/// the use of a server certificate (`server`) or a client certificate.
pub(crate) fn chain(
    roots: Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
    server: bool,
    end: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), &'static str> {
    let prov = super::load::provider();
    let now = UnixTime::now();
    let res = if server {
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, prov)
            .with_crls(crls.iter().cloned())
            .build()
            .map_err(|_| "Invalid certificate")?;
        // The name is checked apart (QEMU's order: chain, then name).
        let any = ServerName::try_from("localhost").map_err(|_| "Invalid certificate")?;
        match v.verify_server_cert(end, intermediates, &any, &[], now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(()),
            r => r.map(|_| ()),
        }
    } else {
        let v = WebPkiClientVerifier::builder_with_provider(roots, prov)
            .with_crls(crls.iter().cloned())
            .build()
            .map_err(|_| "Invalid certificate")?;
        v.verify_client_cert(end, intermediates, now).map(|_| ())
    };
    res.map_err(|e| reason(&e))
}

/// The peer's certificate chain, first the end entity's.
fn split<'a>(
    certs: Option<&'a [CertificateDer<'static>]>,
) -> Result<(&'a CertificateDer<'static>, &'a [CertificateDer<'static>]), String> {
    match certs {
        Some([end, rest @ ..]) => Ok((end, rest)),
        _ => Err("Verify failed: No certificate was found.".into()),
    }
}

/// Server side: checks a client (`verify-peer`: chain; then `tls-authz`
/// on its distinguished name). Nothing is checked without `verify-peer`.
pub fn check_client(
    creds: &X509Creds,
    certs: Option<&[CertificateDer<'static>]>,
    authz: Option<&(String, Arc<TlsRegistry>)>,
) -> Result<(), String> {
    if !creds.verify_peer {
        return Ok(());
    }
    let (end, rest) = split(certs)?;
    chain(creds.roots.clone(), &creds.crls, false, end, rest)?;
    if let Some((id, reg)) = authz {
        let dn = super::dn::subject_dn(end).unwrap_or_default();
        if !reg.is_allowed_by_id(id, &dn)? {
            return Err(format!("TLS x509 authz check for {dn} is denied"));
        }
    }
    Ok(())
}

/// Client side: checks the server (`verify-peer`: chain, then the host
/// name).
pub fn check_server(
    creds: &X509Creds,
    certs: Option<&[CertificateDer<'static>]>,
    hostname: Option<&str>,
) -> Result<(), String> {
    if !creds.verify_peer {
        return Ok(());
    }
    let (end, rest) = split(certs)?;
    chain(creds.roots.clone(), &creds.crls, true, end, rest)?;
    let Some(h) = hostname else {
        return Err("No hostname for certificate validation".into());
    };
    let mismatch = || format!("Certificate does not match the hostname {h}");
    let name = ServerName::try_from(h.to_string()).map_err(|_| mismatch())?;
    let parsed = ParsedCertificate::try_from(end).map_err(|_| mismatch())?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|_| mismatch())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    fn ca(name: &str) -> (KeyPair, rcgen::Certificate) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let c = p.self_signed(&key).unwrap();
        (key, c)
    }

    fn leaf(
        ca: &(KeyPair, rcgen::Certificate),
        names: &[&str],
        expired: bool,
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 2, 1);
        }
        p.signed_by(&key, &ca.1, &ca.0).unwrap().der().clone()
    }

    fn roots(ca: &(KeyPair, rcgen::Certificate)) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(ca.1.der().clone()).unwrap();
        Arc::new(r)
    }

    #[test]
    fn chains_fail_with_gnutls_reasons() {
        let (a, b) = (ca("A"), ca("B"));
        let good = leaf(&a, &["localhost"], false);
        assert_eq!(chain(roots(&a), &[], true, &good, &[]), Ok(()));
        assert_eq!(chain(roots(&a), &[], false, &good, &[]), Ok(()));
        assert_eq!(
            chain(roots(&b), &[], true, &good, &[]),
            Err("The certificate hasn't got a known issuer")
        );
        let old = leaf(&a, &["localhost"], true);
        assert_eq!(
            chain(roots(&a), &[], false, &old, &[]),
            Err("The certificate is not trusted")
        );
    }

    fn creds(ca: &(KeyPair, rcgen::Certificate), verify_peer: bool) -> X509Creds {
        X509Creds {
            endpoint: super::super::Endpoint::Client,
            verify_peer,
            roots: roots(ca),
            crls: Vec::new(),
            server: None,
            client: None,
        }
    }

    #[test]
    fn servers_are_checked_by_name_after_the_chain() {
        let a = ca("A");
        let c = creds(&a, true);
        let cert = [leaf(&a, &["localhost", "127.0.0.1"], false)];
        assert_eq!(check_server(&c, Some(&cert), Some("localhost")), Ok(()));
        assert_eq!(check_server(&c, Some(&cert), Some("127.0.0.1")), Ok(()));
        assert_eq!(
            check_server(&c, Some(&cert), Some("otherhost")).unwrap_err(),
            "Certificate does not match the hostname otherhost"
        );
        assert_eq!(
            check_server(&c, Some(&cert), None).unwrap_err(),
            "No hostname for certificate validation"
        );
        // Without verify-peer nothing is checked.
        assert_eq!(
            check_server(&creds(&ca("B"), false), Some(&cert), None),
            Ok(())
        );
        assert_eq!(
            check_client(&c, None, None).unwrap_err(),
            "Verify failed: No certificate was found."
        );
    }
}
