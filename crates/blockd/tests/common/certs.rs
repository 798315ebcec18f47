//! Test certificates made at test time (rcgen): a CA and credential
//! directories with QEMU's file names (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA and the credential directories signed by it.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

fn dn(p: &mut CertificateParams, parts: &[(DnType, &str)]) {
    let mut d = rcgen::DistinguishedName::new();
    for (t, v) in parts {
        d.push(t.clone(), *v);
    }
    p.distinguished_name = d;
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        dn(&mut p, &[(DnType::CommonName, name)]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// Writes `dir` with this CA and a server (`names`) or client
    /// certificate; `expired`: valid only in January 2020.
    pub fn issue(&self, dir: &Path, server: Option<&[&str]>, expired: bool) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let who = match server {
            Some(names) => {
                dn(&mut p, &[(DnType::CommonName, names[0])]);
                for n in names {
                    p.subject_alt_names.push(match n.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName((*n).try_into().unwrap()),
                    });
                }
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                "server"
            }
            None => {
                dn(
                    &mut p,
                    &[
                        (DnType::CountryName, "GB"),
                        (DnType::OrganizationName, "Cthulhu, Inc."),
                        (DnType::CommonName, "client one"),
                    ],
                );
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                "client"
            }
        };
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 2, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{who}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{who}-key.pem")), key.serialize_pem()).unwrap();
        dir.to_path_buf()
    }
}
