//! The identity API: a proxy sends a CSR and a ServiceAccount token; the CA signs the CSR only
//! for the SPIFFE ID of the account the token proves.
//!
//! Served over TLS with a certificate from the same issuer (the proxies trust the anchors and
//! check the DNS name). The issuer's files are re-read when they change, so the issuer can be
//! rotated (also onto a new anchor) without restarting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::Instrument as _;

use arc_swap::ArcSwap;
use strait_api::identity::identity_server::Identity;
use strait_api::identity::{CertifyRequest, CertifyResponse};
use strait_identity::ca::{CertificateAuthority, CsrError};
use strait_identity::tls::Credentials;
use strait_identity::SpiffeId;
use tonic::{Request, Response, Status};

use crate::tokens::{Authenticator, TokenError};

/// The issuer, reloaded from its files. Its key is never kept as text: only the signing
/// authority (whose Debug shows no key) and a digest of the key file, to notice changes.
#[derive(Debug)]
pub struct Issuer {
    cert: PathBuf,
    key: PathBuf,
    ca: ArcSwap<CertificateAuthority>,
    /// The certificate PEM and the SHA-256 of the key PEM last loaded.
    loaded: std::sync::Mutex<(String, KeyDigest)>,
}

/// SHA-256 of a key file: enough to tell that it changed, useless to an attacker.
#[derive(Clone, PartialEq, Eq)]
struct KeyDigest([u8; 32]);

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

impl KeyDigest {
    fn of(pem: &str) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, pem.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("cannot read {path}: {source} (--issuer-cert / --issuer-key)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the issuer in {cert} / {key} is unusable: {source}")]
    Invalid {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: strait_identity::ca::CaError,
    },
}

impl Issuer {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, IssuerError> {
        let (cert_pem, key_pem) = read_pair(&cert, &key)?;
        let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(|source| {
            IssuerError::Invalid {
                cert: cert.clone(),
                key: key.clone(),
                source,
            }
        })?;
        let digest = KeyDigest::of(&key_pem);
        Ok(Self {
            cert,
            key,
            ca: ArcSwap::from_pointee(ca),
            loaded: std::sync::Mutex::new((cert_pem, digest)),
        })
    }

    pub fn current(&self) -> Arc<CertificateAuthority> {
        self.ca.load_full()
    }

    /// Re-reads the files; returns whether the issuer changed. A bad pair is logged and the
    /// current issuer kept.
    pub fn reload(&self) -> bool {
        let Ok((cert_pem, key_pem)) = read_pair(&self.cert, &self.key) else {
            return false;
        };
        let digest = KeyDigest::of(&key_pem);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == digest {
            return false;
        }
        match CertificateAuthority::from_pem(&cert_pem, &key_pem) {
            Ok(ca) => {
                self.ca.store(Arc::new(ca));
                *loaded = (cert_pem, digest);
                tracing::info!(cert = %self.cert.display(), "issuer reloaded");
                true
            }
            Err(e) => {
                // Half-written during a rotation, or a mismatched pair: retried next time.
                tracing::warn!(cert = %self.cert.display(), error = %e, "new issuer files unusable; keeping the current issuer");
                false
            }
        }
    }
}

/// The certificate PEM, and the key PEM in memory that is wiped when dropped.
fn read_pair(
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(String, zeroize::Zeroizing<String>), IssuerError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| IssuerError::Read {
            path: path.clone(),
            source,
        })
    };
    Ok((read(cert)?, zeroize::Zeroizing::new(read(key)?)))
}

/// Serves `Certify`.
#[derive(Debug, Clone)]
pub struct IdentityService {
    pub tokens: Authenticator,
    pub metrics: Arc<crate::admin::Metrics>,
    pub issuer: Arc<Issuer>,
    pub trust_domain: String,
    pub leaf_lifetime: Duration,
    /// Certificate requests per caller address ([`crate::limits`]).
    pub rate: Arc<crate::limits::RateLimit>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let span = tracing::info_span!(
            "certify",
            asked = %request.get_ref().identity,
            result = tracing::field::Empty
        );
        let result = self.certify_inner(request).instrument(span.clone()).await;
        span.record(
            "result",
            match &result {
                Ok(_) => "issued".to_string(),
                Err(s) => format!("{:?}", s.code()),
            },
        );
        result
    }
}

impl IdentityService {
    async fn certify_inner(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        if let Err(wait) = self.rate.take(request.remote_addr().map(|a| a.ip())) {
            self.metrics.certificate("refused", "rate_limited");
            return Err(Status::resource_exhausted(format!(
                "too many certificate requests from this address; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }
        let req = request.into_inner();
        let token = String::from_utf8(req.token).unwrap_or_default();
        let (ns, sa) = match self.tokens.authenticate(token.trim()).await {
            Ok(account) => account,
            Err(e @ TokenError::ReviewFailed { .. }) => {
                self.metrics.certificate("refused", "token_review");
                tracing::warn!(asked = %req.identity, error = %e, "refused: cannot check the token");
                return Err(Status::unavailable(e.to_string()));
            }
            Err(e) => {
                self.metrics.certificate("refused", "token");
                tracing::warn!(asked = %req.identity, error = %e, "refused: bad token");
                return Err(Status::unauthenticated(e.to_string()));
            }
        };
        let caller = SpiffeId::new(&self.trust_domain, &ns, &sa)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !req.identity.is_empty() && req.identity != caller.to_string() {
            self.metrics.certificate("refused", "identity");
            tracing::warn!(%caller, asked = %req.identity, "refused: the token is for another identity");
            return Err(Status::permission_denied(format!(
                "the token is for {caller}, not {}",
                req.identity
            )));
        }
        let signed = self
            .issuer
            .current()
            .sign_csr(
                &req.certificate_signing_request,
                &caller,
                self.leaf_lifetime,
            )
            .map_err(|e| {
                self.metrics.certificate("refused", "csr");
                tracing::warn!(%caller, error = %e, "refused: bad CSR");
                match e {
                    CsrError::Malformed(_) | CsrError::BadSignature | CsrError::WrongKey => {
                        Status::invalid_argument(e.to_string())
                    }
                    CsrError::ForbiddenSan(_)
                    | CsrError::WrongIdentity { .. }
                    | CsrError::NoIdentity(_) => Status::permission_denied(e.to_string()),
                    CsrError::Signing(_) => Status::internal(e.to_string()),
                }
            })?;
        let valid_until = signed
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.metrics.certificate("signed", "");
        tracing::info!(%caller, valid_until, "certificate issued");
        Ok(Response::new(CertifyResponse {
            leaf_certificate: signed.leaf_der,
            intermediate_certificates: signed.intermediates_der,
            valid_until_unix_seconds: valid_until,
        }))
    }
}

const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Issues the identity server's first certificate, before the server accepts connections (a
/// client arriving earlier would be refused for want of a certificate).
pub fn install_server_certificate(
    issuer: &Issuer,
    creds: &Credentials,
    id: &SpiffeId,
    dns_name: &str,
) -> Result<(), String> {
    let (chain, key) = issuer
        .current()
        .issue_server(id, dns_name, SERVER_CERT_LIFETIME)
        .map_err(|e| format!("cannot issue the identity server certificate: {e}"))?;
    creds
        .install(chain, key)
        .map_err(|e| format!("cannot install the identity server certificate: {e}"))
}

/// The identity server's own certificate: re-issued at half its life and whenever the issuer
/// changes (the first one comes from [`install_server_certificate`]).
pub async fn keep_server_certificate(
    issuer: Arc<Issuer>,
    creds: Arc<Credentials>,
    id: SpiffeId,
    dns_name: String,
) {
    const LIFETIME: Duration = SERVER_CERT_LIFETIME;
    let mut issued_at: Option<std::time::Instant> = creds.is_ready().then(std::time::Instant::now);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let changed = issuer.reload();
        if !changed && issued_at.is_some_and(|t| t.elapsed() < LIFETIME / 2) {
            continue;
        }
        match issuer.current().issue_server(&id, &dns_name, LIFETIME) {
            Ok((chain, key)) => match creds.install(chain, key) {
                Ok(()) => issued_at = Some(std::time::Instant::now()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the identity server certificate")
                }
            },
            Err(e) => tracing::error!(error = %e, "cannot issue the identity server certificate"),
        }
    }
}

/// A TLS stream tonic can serve.
pub struct TlsIo(pub tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    /// The TCP peer, so calls know their caller's address (for per-caller limits).
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts TLS connections (handshakes run concurrently, each bounded to 10 s) and yields them.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, std::io::Error>> {
    accept_tls(listener, config, "identity", TlsIo)
}

/// Accepts TLS connections with `config`, wrapping each completed one with `wrap`.
pub fn accept_tls<T: Send + 'static>(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    what: &'static str,
    wrap: fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> T,
) -> tokio_stream::wrappers::ReceiverStream<Result<T, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(wrap(tls))).await;
                    }
                    Ok(Err(e)) => {
                        strait_admin::log_limited!(tracing::Level::INFO, "tls handshake failed", what, %peer, what, error = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::debug!(what, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_key_never_appears_in_debug_output() {
        let dir = std::env::temp_dir().join(format!("strait-issuer-dbg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let g = strait_identity::ca::generate(
            "cluster.local",
            std::time::Duration::from_secs(86400),
            std::time::Duration::from_secs(3600),
        )
        .expect("ca");
        let (cert, key) = (dir.join("issuer.crt"), dir.join("issuer.key"));
        std::fs::write(&cert, &g.issuer_cert_pem).expect("write");
        std::fs::write(&key, &g.issuer_key_pem).expect("write");
        let issuer = Issuer::load(cert, key).expect("load");
        let debug = format!("{issuer:?}");
        let key_body: String = g
            .issuer_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(!debug.contains(&key_body[..40]), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
        assert!(!issuer.reload(), "unchanged files are no change");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
