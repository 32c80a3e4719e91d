//! The certificate authority: a trust anchor (root) and an issuer (intermediate) signed by it,
//! and leaf certificates for workloads signed by the issuer.
//!
//! A CSR is checked before anything is signed: its own signature, an ECDSA P-256 key, and no
//! subject alternative name other than exactly one URI equal to the SPIFFE ID the caller was
//! authenticated as. The certificate is then built from the CA's own parameters, never from
//! what the CSR asks for: one URI SAN (critical, as the subject is empty), EKU server and client
//! auth, digital signature only, and a NotAfter that never passes the issuer's.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::SpiffeId;

/// secp256r1 / prime256v1.
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// Clock skew tolerated between the CA and the proxies.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CSR was refused. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not valid DER: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify")]
    BadSignature,
    #[error("the CSR's key must be ECDSA P-256")]
    WrongKey,
    #[error("the CSR asks for {0}; only one URI SAN, the caller's own SPIFFE ID, is signed")]
    ForbiddenSan(String),
    #[error("the CSR asks for {asked}, but the caller is {caller}")]
    WrongIdentity { asked: String, caller: String },
    #[error("the CSR has no URI SAN: it must ask for {0}")]
    NoIdentity(String),
    #[error("the issuer could not sign: {0}")]
    Signing(String),
}

/// Why the CA could not be loaded or generated.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what}: {message}")]
    Invalid { what: &'static str, message: String },
}

fn invalid(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |e| CaError::Invalid {
        what,
        message: e.to_string(),
    }
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Signed {
    pub leaf_der: Vec<u8>,
    /// The issuer's certificate (intermediates between the leaf and the anchor).
    pub intermediates_der: Vec<Vec<u8>>,
    pub not_after: SystemTime,
}

/// PEM files of a new installation.
#[derive(Debug, Clone)]
pub struct GeneratedCa {
    pub anchor_cert_pem: String,
    pub anchor_key_pem: String,
    pub issuer_cert_pem: String,
    pub issuer_key_pem: String,
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(invalid("generating a P-256 key"))
}

fn ca_params(common_name: &str, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + lifetime);
    params
}

/// A new trust anchor (self-signed) and an issuer signed by it, ECDSA P-256.
pub fn generate(
    trust_domain: &str,
    anchor_lifetime: Duration,
    issuer_lifetime: Duration,
) -> Result<GeneratedCa, CaError> {
    let anchor_key = new_key()?;
    let anchor_params = ca_params(&format!("root.{trust_domain}"), anchor_lifetime, None);
    let anchor = anchor_params
        .self_signed(&anchor_key)
        .map_err(invalid("self-signing the trust anchor"))?;
    let (issuer_cert_pem, issuer_key_pem) = issue_issuer(
        &anchor.pem(),
        &anchor_key.serialize_pem(),
        trust_domain,
        issuer_lifetime,
    )?;
    Ok(GeneratedCa {
        anchor_cert_pem: anchor.pem(),
        anchor_key_pem: anchor_key.serialize_pem(),
        issuer_cert_pem,
        issuer_key_pem,
    })
}

/// A serving certificate for a server known by DNS names (the injection webhook), with the
/// self-signed CA that signed it (the webhook configuration's `caBundle`).
#[derive(Debug, Clone)]
pub struct ServingPki {
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA and a serving certificate for `dns_names` signed by it, ECDSA P-256.
pub fn generate_serving(
    ca_name: &str,
    dns_names: &[String],
    lifetime: Duration,
) -> Result<ServingPki, CaError> {
    let ca_key = new_key()?;
    let ca_cert = ca_params(ca_name, lifetime, Some(0))
        .self_signed(&ca_key)
        .map_err(invalid("self-signing the serving CA"))?;
    let ca = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key)
        .map_err(invalid("reading the serving CA"))?;
    let key = new_key()?;
    let mut params = CertificateParams::new(dns_names.to_vec())
        .map_err(invalid("building the serving certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names.first().map_or("server", String::as_str),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = offset(now - BACKDATE);
    params.not_after = offset(now + lifetime);
    let cert = params
        .signed_by(&key, &ca)
        .map_err(invalid("signing the serving certificate"))?;
    Ok(ServingPki {
        ca_cert_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// NotAfter of the first certificate of a PEM bundle.
pub fn pem_not_after(pem: &str) -> Result<SystemTime, CaError> {
    not_after_of_pem(pem)
}

/// A new issuer signed by an existing anchor (for issuer rotation and anchor rotation). The
/// issuer's NotAfter never passes the anchor's.
pub fn issue_issuer(
    anchor_cert_pem: &str,
    anchor_key_pem: &str,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(String, String), CaError> {
    let anchor_key =
        KeyPair::from_pem(anchor_key_pem).map_err(invalid("reading the anchor key"))?;
    let anchor_not_after = not_after_of_pem(anchor_cert_pem)?;
    let anchor = Issuer::from_ca_cert_pem(anchor_cert_pem, anchor_key)
        .map_err(invalid("reading the anchor certificate"))?;
    let key = new_key()?;
    let mut params = ca_params(&format!("issuer.{trust_domain}"), lifetime, Some(0));
    params.not_after = params.not_after.min(offset(anchor_not_after));
    let cert = params
        .signed_by(&key, &anchor)
        .map_err(invalid("signing the issuer"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn not_after_of_pem(pem: &str) -> Result<SystemTime, CaError> {
    let der = pem_to_der(pem).ok_or(CaError::Invalid {
        what: "reading a certificate",
        message: "no CERTIFICATE block in the PEM".into(),
    })?;
    not_after_of_der(&der)
}

fn not_after_of_der(der: &[u8]) -> Result<SystemTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Invalid {
        what: "parsing a certificate",
        message: e.to_string(),
    })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// The DER of the first CERTIFICATE block of `pem`.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    pem_blocks(pem, "CERTIFICATE").into_iter().next()
}

/// The DER of every `label` block of `pem`.
pub fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == label)
        .map(|p| p.contents)
        .collect()
}

/// The issuer: signs workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: Vec<u8>,
    issuer_pem: String,
    issuer_not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("issuer_not_after", &self.issuer_not_after)
            .finish()
    }
}

impl CertificateAuthority {
    /// Loads the issuer's certificate and key.
    pub fn from_pem(issuer_cert_pem: &str, issuer_key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(issuer_key_pem).map_err(invalid("reading the issuer key"))?;
        let issuer_der = pem_to_der(issuer_cert_pem).ok_or(CaError::Invalid {
            what: "reading the issuer certificate",
            message: "no CERTIFICATE block in the PEM".into(),
        })?;
        let issuer_not_after = not_after_of_der(&issuer_der)?;
        // A key that is not the certificate's would sign leaves whose chain is broken (this
        // happens mid-rotation, when one file is new and the other is not yet).
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| CaError::Invalid {
                what: "parsing the issuer certificate",
                message: e.to_string(),
            })?;
        if parsed.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::Invalid {
                what: "the issuer key",
                message: "it is not the key of the issuer certificate".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(issuer_cert_pem, key)
            .map_err(invalid("reading the issuer certificate"))?;
        Ok(Self {
            issuer,
            issuer_der,
            issuer_pem: issuer_cert_pem.to_string(),
            issuer_not_after,
        })
    }

    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// The issuer's certificate, PEM (no key).
    pub fn cert_pem(&self) -> &str {
        &self.issuer_pem
    }

    /// Checks `csr_der` and signs it for `caller`, valid for `lifetime` (capped by the issuer).
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        caller: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Signed, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(format!(
                "{} bytes after the CSR; send exactly one DER CertificationRequest",
                rest.len()
            )));
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY
            || curve.as_deref() != Some(OID_P256)
        {
            return Err(CsrError::WrongKey);
        }
        let mut uris = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        other => return Err(CsrError::ForbiddenSan(format!("{other:?}"))),
                    }
                }
            }
        }
        let expected = caller.to_string();
        match uris.as_slice() {
            [] => return Err(CsrError::NoIdentity(expected)),
            [one] if *one == expected => {}
            [one] => {
                return Err(CsrError::WrongIdentity {
                    asked: one.clone(),
                    caller: expected,
                })
            }
            many => return Err(CsrError::ForbiddenSan(format!("{} URI SANs", many.len()))),
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        let (leaf_der, not_after) = self.sign(&public_key, caller, None, lifetime)?;
        Ok(Signed {
            leaf_der,
            intermediates_der: vec![self.issuer_der.clone()],
            not_after,
        })
    }

    /// A certificate for a server the CA runs itself (the identity API), with a DNS name as well.
    pub fn issue_server(
        &self,
        id: &SpiffeId,
        dns_name: &str,
        lifetime: Duration,
    ) -> Result<(Vec<Vec<u8>>, Vec<u8>), CsrError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        let (leaf, _) = self.sign(&key, id, Some(dns_name), lifetime)?;
        Ok((vec![leaf, self.issuer_der.clone()], key.serialize_der()))
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        dns_name: Option<&str>,
        lifetime: Duration,
    ) -> Result<(Vec<u8>, SystemTime), CsrError> {
        let signing = |e: rcgen::Error| CsrError::Signing(e.to_string());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new(); // empty subject: the SAN is critical
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(signing)?)];
        if let Some(dns) = dns_name {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.try_into().map_err(signing)?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = (now + lifetime).min(self.issuer_not_after);
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(not_after);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(signing)?;
        Ok((cert.der().to_vec(), not_after))
    }
}

/// A CSR for `id` with a new P-256 key: what a proxy sends. The key never leaves memory.
pub fn new_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), CaError> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(invalid("the SPIFFE ID as a URI"))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(invalid("building the CSR"))?;
    Ok((key, csr.der().to_vec()))
}

/// The SPIFFE IDs in a certificate's URI SANs.
pub fn spiffe_ids(cert_der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).expect("valid")
    }

    fn ca() -> (GeneratedCa, CertificateAuthority) {
        let g = generate(
            "cluster.local",
            Duration::from_secs(3600 * 24 * 365),
            Duration::from_secs(3600 * 24 * 30),
        )
        .expect("generate");
        let ca =
            CertificateAuthority::from_pem(&g.issuer_cert_pem, &g.issuer_key_pem).expect("load");
        (g, ca)
    }

    fn csr_with(sans: Vec<SanType>, alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn signs_a_csr_for_the_callers_own_id_with_a_capped_lifetime() {
        let (_, ca) = ca();
        let (_, csr) = new_csr(&id("web")).expect("csr");
        let signed = ca
            .sign_csr(&csr, &id("web"), Duration::from_secs(3600))
            .expect("signed");
        assert_eq!(
            spiffe_ids(&signed.leaf_der),
            ["spiffe://cluster.local/ns/shop/sa/web"]
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.leaf_der).expect("parse");
        let san = cert.subject_alternative_name().expect("ok").expect("san");
        assert!(san.critical, "SAN is critical with an empty subject");
        let eku = cert.extended_key_usage().expect("ok").expect("eku").value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        // NotAfter never passes the issuer's.
        let long = ca
            .sign_csr(&csr, &id("web"), Duration::from_secs(3600 * 24 * 3650))
            .expect("signed");
        assert!(long.not_after <= ca.issuer_not_after());
    }

    #[test]
    fn a_csr_with_trailing_data_is_refused() {
        let (_, ca) = ca();
        let (_, mut csr) = new_csr(&id("web")).expect("csr");
        csr.extend(std::iter::repeat_n(0x41, 1024 * 1024));
        let err = ca
            .sign_csr(&csr, &id("web"), Duration::from_secs(60))
            .expect_err("1 MB of junk after the DER");
        assert!(err.to_string().contains("bytes after the CSR"), "{err}");
    }

    #[test]
    fn an_issuer_key_that_is_not_the_certificates_is_refused() {
        let (a, _) = ca();
        let (b, _) = ca();
        let err = CertificateAuthority::from_pem(&a.issuer_cert_pem, &b.issuer_key_pem)
            .expect_err("mismatch");
        assert!(
            err.to_string()
                .contains("not the key of the issuer certificate"),
            "{err}"
        );
    }

    #[test]
    fn refuses_other_identities_extra_sans_and_wrong_keys() {
        let (_, ca) = ca();
        let life = Duration::from_secs(60);
        let other = csr_with(
            vec![uri("spiffe://cluster.local/ns/shop/sa/admin")],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        assert!(matches!(
            ca.sign_csr(&other, &id("web"), life),
            Err(CsrError::WrongIdentity { .. })
        ));
        let extra_dns = csr_with(
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/web"),
                SanType::DnsName("evil.example".try_into().expect("dns")),
            ],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        assert!(matches!(
            ca.sign_csr(&extra_dns, &id("web"), life),
            Err(CsrError::ForbiddenSan(_))
        ));
        let two_uris = csr_with(
            vec![
                uri("spiffe://cluster.local/ns/shop/sa/web"),
                uri("spiffe://cluster.local/ns/shop/sa/web"),
            ],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        assert!(matches!(
            ca.sign_csr(&two_uris, &id("web"), life),
            Err(CsrError::ForbiddenSan(_))
        ));
        let p384 = csr_with(
            vec![uri("spiffe://cluster.local/ns/shop/sa/web")],
            &rcgen::PKCS_ECDSA_P384_SHA384,
        );
        assert!(matches!(
            ca.sign_csr(&p384, &id("web"), life),
            Err(CsrError::WrongKey)
        ));
        let none = csr_with(vec![], &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            ca.sign_csr(&none, &id("web"), life),
            Err(CsrError::NoIdentity(_))
        ));
        assert!(matches!(
            ca.sign_csr(b"garbage", &id("web"), life),
            Err(CsrError::Malformed(_))
        ));
        let (_, mut tampered) = new_csr(&id("web")).expect("csr");
        let n = tampered.len();
        tampered[n - 5] ^= 0xff; // inside the signature
        assert!(ca.sign_csr(&tampered, &id("web"), life).is_err());
    }
}
