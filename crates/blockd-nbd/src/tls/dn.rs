//! A certificate's distinguished name as GnuTLS's `gnutls_x509_crt_get_dn`
//! writes it, which is what QEMU hands to `tls-authz` objects
//! (`qcrypto_tls_session_check_certificate`).
//!
//! Recorded with qemu-nbd 10.0.2 (`--tls-authz` with an `authz-simple`
//! object and the `qauthz*` trace events): the relative names come in
//! the certificate's order (not RFC 4514's reversed one), joined by `,`,
//! the attributes of a multi-valued name by `+`, values escaped as RFC
//! 4514 says, e.g.
//! `C=GB,ST=England,L=London,O=Cthulhu\, Inc.,OU=R&D\+Dev,CN=client one`.

use x509_parser::prelude::*;

/// GnuTLS's short names for attribute types (`_oid2str` in
/// lib/x509/common.c), by dotted OID.
const NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "SN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "GN"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// Escapes a value as RFC 4514 section 2.4 asks.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The subject of `cert` (DER) in GnuTLS's form; `None` if it does not
/// parse.
pub fn subject_dn(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(name_dn(cert.subject()))
}

/// A name in GnuTLS's form.
pub fn name_dn(name: &X509Name<'_>) -> String {
    let mut rdns = Vec::new();
    for rdn in name.iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let known = NAMES.iter().find(|(o, _)| *o == oid).map(|p| p.1);
            let text = match atv.as_str() {
                Ok(s) => Some(s.to_string()),
                // BMPString and the like: GnuTLS decodes them too.
                Err(_) => decode_other(atv.attr_value()),
            };
            parts.push(match (known, text) {
                (Some(k), Some(t)) => format!("{k}={}", escape(&t)),
                _ => format!("{oid}=#{}", hex(atv.attr_value().data)),
            });
        }
        rdns.push(parts.join("+"));
    }
    rdns.join(",")
}

fn decode_other(v: &x509_parser::der_parser::asn1_rs::Any<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    match v.tag() {
        Tag::BmpString => {
            let u: Vec<u16> = v
                .data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&u).ok()
        }
        Tag::TeletexString | Tag::VisibleString | Tag::UniversalString => {
            std::str::from_utf8(v.data).ok().map(str::to_string)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_rfc4514() {
        assert_eq!(escape("Cthulhu, Inc."), "Cthulhu\\, Inc.");
        assert_eq!(escape("R&D+Dev"), "R&D\\+Dev");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(escape("a\"b\\c<d>e;"), "a\\\"b\\\\c\\<d\\>e\\;");
    }

    #[test]
    fn names_come_in_certificate_order() {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "GB");
        dn.push(rcgen::DnType::OrganizationName, "Cthulhu, Inc.");
        dn.push(rcgen::DnType::CommonName, "client one");
        p.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            subject_dn(cert.der()).unwrap(),
            "C=GB,O=Cthulhu\\, Inc.,CN=client one"
        );
    }
}
