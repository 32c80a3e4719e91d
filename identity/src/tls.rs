//! TLS 1.3 between proxies, with SPIFFE identities.
//!
//! - [`TrustAnchors`]: the bundle of roots, swappable at run time (anchor rotation).
//! - [`Credentials`]: this workload's certificate and key, swappable at run time (renewal); it
//!   resolves the certificate for both the client and the server side.
//! - [`SpiffeServerVerifier`]: the client side checks the server's chain against the anchors and
//!   that its one SPIFFE ID is exactly the identity discovery announced.
//! - [`MeshClientVerifier`]: the server side requires a client certificate chaining to the
//!   anchors; [`peer_identity`] then reads the client's SPIFFE ID.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::ca::{pem_blocks, spiffe_ids};
use crate::SpiffeId;

/// ALPN of HTTP/2 between proxies (pooled, multiplexed).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1 between proxies (upgrades: WebSocket, CONNECT).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

pub fn provider() -> Arc<CryptoProvider> {
    // One for the process: every configuration shares it (it holds only algorithm tables).
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust anchors contain no certificate")]
    NoAnchors,
    #[error("a trust anchor is not a valid CA certificate: {0}")]
    BadAnchor(String),
    #[error("the workload key or certificate is unusable: {0}")]
    BadCredentials(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The roots every peer's chain must lead to. Several roots may be trusted at once, so an anchor
/// can be rotated without downtime (add the new, move the issuer, remove the old).
#[derive(Debug)]
pub struct TrustAnchors {
    roots: ArcSwap<RootCertStore>,
    client_verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
    /// Bumped by every replacement, so open connections can tell the bundle changed.
    generation: std::sync::atomic::AtomicU64,
}

fn root_store(pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in pem_blocks(pem, "CERTIFICATE") {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| TlsError::BadAnchor(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoAnchors);
    }
    Ok(roots)
}

fn webpki_client_verifier(roots: &RootCertStore) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
        .build()
        .map_err(|e| TlsError::BadAnchor(e.to_string()))
}

impl TrustAnchors {
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let roots = root_store(pem)?;
        let verifier = webpki_client_verifier(&roots)?;
        Ok(Self {
            roots: ArcSwap::from_pointee(roots),
            client_verifier: ArcSwap::from_pointee(verifier),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many times the bundle was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a peer's certificate chain (leaf first, as the handshake gave it) still chains
    /// to the current anchors: what an open connection is re-checked with after a change.
    pub fn still_trusts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return false;
        };
        self.client_verifier
            .load()
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }

    /// Replaces the bundle (a bad bundle is refused and the current one kept).
    pub fn replace_pem(&self, pem: &str) -> Result<(), TlsError> {
        let roots = root_store(pem)?;
        let verifier = webpki_client_verifier(&roots)?;
        self.roots.store(Arc::new(roots));
        self.client_verifier.store(Arc::new(verifier));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.load_full()
    }
}

/// This workload's certificate chain and key, replaced on every renewal.
#[derive(Debug, Default)]
pub struct Credentials {
    current: ArcSwapOption<CertifiedKey>,
}

impl Credentials {
    /// Installs a new chain (leaf first) and its PKCS#8 key.
    pub fn install(&self, chain_der: Vec<Vec<u8>>, pkcs8_key: Vec<u8>) -> Result<(), TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_key));
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadCredentials(e.to_string()))?;
        let chain = chain_der.into_iter().map(CertificateDer::from).collect();
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, signing))));
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        self.is_ready()
    }
}

/// Checks the server's chain against the anchors and its SPIFFE ID against the one expected.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Arc<TrustAnchors>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(anchors: Arc<TrustAnchors>, expected: SpiffeId) -> Self {
        Self {
            anchors,
            expected,
            provider: provider(),
        }
    }
}

/// The one SPIFFE ID of a leaf certificate; `None` if it has none or several.
pub fn leaf_identity(leaf: &CertificateDer<'_>) -> Option<SpiffeId> {
    match spiffe_ids(leaf).as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.anchors.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match leaf_identity(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "the server is {id}, but discovery said {}",
                self.expected
            ))),
            None => Err(rustls::Error::General(
                "the server certificate has no single SPIFFE ID".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used between proxies".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Requires a client certificate chaining to the current anchors.
#[derive(Debug)]
pub struct MeshClientVerifier {
    anchors: Arc<TrustAnchors>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.anchors
            .client_verifier
            .load()
            .verify_client_cert(end_entity, intermediates, now)?;
        if leaf_identity(end_entity).is_none() {
            return Err(rustls::Error::General(
                "the client certificate has no single SPIFFE ID".into(),
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors
            .client_verifier
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors
            .client_verifier
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors
            .client_verifier
            .load()
            .supported_verify_schemes()
    }
}

/// The client side of a connection to a peer proxy whose identity must be `expected`.
pub fn client_config(
    anchors: Arc<TrustAnchors>,
    credentials: Arc<Credentials>,
    expected: SpiffeId,
    alpn: Option<&[u8]>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(anchors, expected)))
        .with_client_cert_resolver(credentials);
    config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    // No resumption: every connection proves its identity against the current anchors (a
    // resumed session would skip that). Connections are pooled, so little is lost.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The server side of the inbound proxy: mesh clients only, HTTP/2, HTTP/1.1 or raw TCP.
pub fn server_config(
    anchors: Arc<TrustAnchors>,
    credentials: Arc<Credentials>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier { anchors }))
        .with_cert_resolver(credentials);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A server that does not ask for client certificates (the control plane's identity API).
pub fn plain_server_config(credentials: Arc<Credentials>) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(credentials);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client for a server named by DNS (the control plane's identity API), trusting `anchors`.
pub fn dns_client_config(anchors: &TrustAnchors) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(anchors.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The SPIFFE ID of the peer of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(leaf_identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{self, CertificateAuthority};
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    struct Mesh {
        anchors_pem: String,
        ca: CertificateAuthority,
    }

    fn mesh() -> Mesh {
        let g = ca::generate(
            "cluster.local",
            Duration::from_secs(86400 * 365),
            Duration::from_secs(86400 * 30),
        )
        .expect("ca");
        Mesh {
            ca: CertificateAuthority::from_pem(&g.issuer_cert_pem, &g.issuer_key_pem)
                .expect("issuer"),
            anchors_pem: g.anchor_cert_pem,
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).expect("id")
    }

    fn creds(m: &Mesh, sa: &str) -> Arc<Credentials> {
        let (key, csr) = ca::new_csr(&id(sa)).expect("csr");
        let signed =
            m.ca.sign_csr(&csr, &id(sa), Duration::from_secs(600))
                .expect("sign");
        let c = Arc::new(Credentials::default());
        let mut chain = vec![signed.leaf_der];
        chain.extend(signed.intermediates_der);
        c.install(chain, key.serialize_der()).expect("install");
        c
    }

    /// Runs a handshake in memory; returns the client identity the server saw.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<Option<SpiffeId>, rustls::Error> {
        let name = ServerName::try_from("strait.mesh").expect("name");
        let mut c = ClientConnection::new(Arc::new(client), name)?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write");
            }
            s.read_tls(&mut &buf[..]).expect("read");
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write");
            }
            c.read_tls(&mut &buf[..]).expect("read");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
                return Ok(peer_identity(s.peer_certificates()));
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn peers_with_the_announced_identity_connect_and_see_each_other() {
        let m = mesh();
        let anchors = Arc::new(TrustAnchors::from_pem(&m.anchors_pem).expect("anchors"));
        let server = server_config(anchors.clone(), creds(&m, "web")).expect("server");
        let client = client_config(anchors, creds(&m, "frontend"), id("web"), Some(ALPN_H2))
            .expect("client");
        assert_eq!(
            handshake(client, server).expect("handshake"),
            Some(id("frontend"))
        );
    }

    #[test]
    fn a_server_with_another_identity_or_a_foreign_ca_is_refused() {
        let m = mesh();
        let anchors = Arc::new(TrustAnchors::from_pem(&m.anchors_pem).expect("anchors"));
        let server = server_config(anchors.clone(), creds(&m, "db")).expect("server");
        let client =
            client_config(anchors.clone(), creds(&m, "frontend"), id("web"), None).expect("client");
        let err = handshake(client, server).expect_err("wrong identity");
        assert!(err.to_string().contains("but discovery said"), "{err}");

        let foreign = mesh();
        let server = server_config(anchors.clone(), creds(&foreign, "web")).expect("server");
        let client =
            client_config(anchors, creds(&m, "frontend"), id("web"), None).expect("client");
        assert!(
            handshake(client, server).is_err(),
            "a chain from another CA is refused"
        );
    }

    #[test]
    fn a_client_without_a_mesh_certificate_is_refused() {
        let m = mesh();
        let anchors = Arc::new(TrustAnchors::from_pem(&m.anchors_pem).expect("anchors"));
        let server = server_config(anchors.clone(), creds(&m, "web")).expect("server");
        let no_cert = client_config(
            anchors.clone(),
            Arc::new(Credentials::default()),
            id("web"),
            None,
        )
        .expect("client");
        assert!(handshake(no_cert, server.clone()).is_err());
        let foreign = mesh();
        let foreign_client =
            client_config(anchors, creds(&foreign, "frontend"), id("web"), None).expect("client");
        assert!(handshake(foreign_client, server).is_err());
    }

    #[test]
    fn anchors_rotate_without_rebuilding_configs() {
        let old = mesh();
        let new = mesh();
        let anchors = Arc::new(TrustAnchors::from_pem(&old.anchors_pem).expect("anchors"));
        let server_creds = creds(&old, "web");
        let server = server_config(anchors.clone(), server_creds.clone()).expect("server");
        let client_creds = creds(&old, "frontend");
        let client =
            client_config(anchors.clone(), client_creds.clone(), id("web"), None).expect("client");
        handshake(client.clone(), server.clone()).expect("old");
        // Trust both, move the workloads to the new issuer, then drop the old anchor.
        anchors
            .replace_pem(&format!("{}{}", old.anchors_pem, new.anchors_pem))
            .expect("both");
        handshake(client.clone(), server.clone()).expect("old certs, both anchors");
        let moved_server = creds(&new, "web");
        let moved_client = creds(&new, "frontend");
        let server2 = server_config(anchors.clone(), moved_server).expect("server");
        let client2 =
            client_config(anchors.clone(), moved_client, id("web"), None).expect("client");
        handshake(client2.clone(), server2.clone()).expect("new certs, both anchors");
        anchors.replace_pem(&new.anchors_pem).expect("new only");
        handshake(client2, server2).expect("new certs, new anchor");
        assert!(
            handshake(client, server).is_err(),
            "old certs are no longer trusted"
        );
        assert!(
            anchors.replace_pem("not pem").is_err(),
            "a bad bundle is refused"
        );
    }
}
