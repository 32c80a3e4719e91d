//! This proxy's identity: a key generated in memory (never written anywhere), a certificate
//! from the control plane's identity API, renewed at 70% of its lifetime, and the TLS
//! configurations built on them.
//!
//! The proxy reports ready only once it has a certificate. A failed renewal is retried with
//! backoff while the current certificate stays valid. The trust anchors file is re-read when it
//! changes, so anchors rotate without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use strait_api::identity::identity_client::IdentityClient;
use strait_api::identity::CertifyRequest;
use strait_identity::tls::{self, Credentials, TrustAnchors, ALPN_H2, ALPN_HTTP1};
use strait_identity::SpiffeId;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source} (--{setting})")]
    Read {
        setting: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trust anchors in {path}: {source}")]
    Anchors {
        path: PathBuf,
        #[source]
        source: tls::TlsError,
    },
    #[error("cannot reach the identity API at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("the identity API refused the CSR: {0}")]
    Refused(String),
    #[error("{0}")]
    Local(String),
}

/// Where a TLS connection goes: its configuration and the name sent as SNI.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// The anchors the handshake verified against: a pooled connection made before they
    /// changed is made again (and so verified again) before its next request.
    pub anchors: Arc<TrustAnchors>,
    /// A pooled connection older than this is made again, so none outlives the certificates
    /// it was verified with.
    pub max_age: Duration,
    /// Opaque TCP: the peer proxy's mesh port, dialled instead of the destination's port,
    /// which follows the handshake in a [`transport header`](crate::transport_header); the
    /// peer then never has to guess whether TLS is coming.
    pub mesh_port: Option<u16>,
}

/// The TLS targets of one peer proxy, by what is carried.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub h2: TlsTarget,
    pub http1: TlsTarget,
    pub tcp: TlsTarget,
}

/// Peer TLS configurations by peer identity, held by the endpoints that use them.
#[derive(Debug, Default)]
struct PeerCache {
    map: std::collections::HashMap<SpiffeId, std::sync::Weak<PeerTls>>,
    prune_at: usize,
}

/// The SNI a client sends to reach the workload `id` through its proxy: a DNS-shaped name the
/// inbound side compares with its own, to tell mesh TLS from the application's own TLS.
pub fn mesh_sni(id: &SpiffeId) -> String {
    format!(
        "{}.{}.serviceaccount.identity.strait.{}",
        id.service_account(),
        id.namespace(),
        id.trust_domain()
    )
}

/// Where the trust anchors come from: a file (re-read when it changes, so anchors rotate without
/// a restart) or the PEM itself (Kubernetes: set by the injector; rotated by restarting pods).
#[derive(Debug, Clone)]
pub enum AnchorSource {
    File(PathBuf),
    Inline(String),
}

impl AnchorSource {
    fn path(&self) -> PathBuf {
        match self {
            AnchorSource::File(p) => p.clone(),
            AnchorSource::Inline(_) => PathBuf::from("STRAIT_TRUST_ANCHORS_PEM"),
        }
    }
}

#[derive(Debug)]
pub struct Identity {
    /// How long a mesh connection may live (`--max-connection-age`); set by the proxy.
    pub max_connection_age: Duration,
    /// The port on which peer proxies take opaque TCP with a transport header: the inbound
    /// port, the same on every proxy of the mesh (4143); set by the proxy.
    pub mesh_port: u16,
    /// Bumped when the trust anchors are replaced: open inbound mesh connections re-check.
    pub anchors_changed: tokio::sync::watch::Sender<u64>,
    pub id: SpiffeId,
    pub anchors: Arc<TrustAnchors>,
    pub creds: Arc<Credentials>,
    pub server_config: Arc<rustls::ServerConfig>,
    pub sni: String,
    addr: String,
    server_name: String,
    anchors_source: AnchorSource,
    token_path: PathBuf,
    peers: std::sync::Mutex<PeerCache>,
}

impl Identity {
    pub fn new(
        id: SpiffeId,
        addr: String,
        server_name: String,
        anchors_source: AnchorSource,
        token_path: PathBuf,
    ) -> Result<Self, IdentityError> {
        let pem = match &anchors_source {
            AnchorSource::File(path) => {
                std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
                    setting: "trust-anchors",
                    path: path.clone(),
                    source,
                })?
            }
            AnchorSource::Inline(pem) => pem.clone(),
        };
        let anchors =
            Arc::new(
                TrustAnchors::from_pem(&pem).map_err(|source| IdentityError::Anchors {
                    path: anchors_source.path(),
                    source,
                })?,
            );
        let creds = Arc::new(Credentials::default());
        let server_config = Arc::new(
            tls::server_config(anchors.clone(), creds.clone())
                .map_err(|e| IdentityError::Local(e.to_string()))?,
        );
        Ok(Self {
            max_connection_age: Duration::from_secs(6 * 3600),
            mesh_port: 4143,
            anchors_changed: tokio::sync::watch::Sender::new(0),
            sni: mesh_sni(&id),
            id,
            anchors,
            creds,
            server_config,
            addr,
            server_name,
            anchors_source,
            token_path,
            peers: std::sync::Mutex::default(),
        })
    }

    /// Resolves when an inbound mesh connection whose client presented `chain` must end: at
    /// its maximum age, or at a change of anchors under which that chain no longer verifies.
    pub async fn connection_end(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> &'static str {
        let mut changes = self.anchors_changed.subscribe();
        let recheck = async {
            loop {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !self.anchors.still_trusts(&chain) {
                    return "its client's certificate no longer chains to the trust anchors";
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(self.max_connection_age) => "it reached --max-connection-age",
            why = recheck => why,
        }
    }

    /// Client configurations for connections to the peer `expected`: one set per peer
    /// identity, shared by all its endpoints (a 5,000-endpoint service of one ServiceAccount
    /// holds one, not 5,000). They follow anchor and certificate rotation on their own (they
    /// hold the shared anchors and credentials), so a cached set never goes stale.
    pub fn peer(&self, expected: &SpiffeId) -> Result<Arc<PeerTls>, IdentityError> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tls) = peers.map.get(expected).and_then(std::sync::Weak::upgrade) {
            return Ok(tls);
        }
        let tls = Arc::new(self.new_peer(expected)?);
        // Forget identities no endpoint uses any more, each time the map has doubled.
        if peers.map.len() >= peers.prune_at {
            peers.map.retain(|_, t| t.strong_count() > 0);
            peers.prune_at = (2 * peers.map.len()).max(64);
        }
        peers.map.insert(expected.clone(), Arc::downgrade(&tls));
        Ok(tls)
    }

    fn new_peer(&self, expected: &SpiffeId) -> Result<PeerTls, IdentityError> {
        let server_name = ServerName::try_from(mesh_sni(expected))
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        let target = |alpn: Option<&[u8]>, mesh_port| -> Result<TlsTarget, IdentityError> {
            let config = tls::client_config(
                self.anchors.clone(),
                self.creds.clone(),
                expected.clone(),
                alpn,
            )
            .map_err(|e| IdentityError::Local(e.to_string()))?;
            Ok(TlsTarget {
                config: Arc::new(config),
                server_name: server_name.clone(),
                anchors: self.anchors.clone(),
                max_age: self.max_connection_age,
                mesh_port,
            })
        };
        Ok(PeerTls {
            h2: target(Some(ALPN_H2), None)?,
            http1: target(Some(ALPN_HTTP1), None)?,
            tcp: target(None, Some(self.mesh_port))?,
        })
    }

    /// One CSR round trip: a fresh key, a CSR for our ID, the token as proof.
    async fn certify(&self) -> Result<SystemTime, IdentityError> {
        let token =
            tokio::fs::read(&self.token_path)
                .await
                .map_err(|source| IdentityError::Read {
                    setting: "identity-token-file",
                    path: self.token_path.clone(),
                    source,
                })?;
        let (key, csr) = strait_identity::ca::new_csr(&self.id)
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        let channel = self.channel().await?;
        let response = IdentityClient::new(channel)
            .certify(CertifyRequest {
                identity: self.id.to_string(),
                token,
                certificate_signing_request: csr,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => IdentityError::Unreachable {
                    addr: self.addr.clone(),
                    message: s.message().to_string(),
                },
                _ => IdentityError::Refused(format!("{:?}: {}", s.code(), s.message())),
            })?
            .into_inner();
        let mut chain = vec![response.leaf_certificate];
        chain.extend(response.intermediate_certificates);
        self.creds
            .install(chain, key.serialize_der())
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        Ok(SystemTime::UNIX_EPOCH
            + Duration::from_secs(response.valid_until_unix_seconds.max(0) as u64))
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, IdentityError> {
        let unreachable = |message: String| IdentityError::Unreachable {
            addr: self.addr.clone(),
            message,
        };
        let config = tls::dns_client_config(&self.anchors)
            .map_err(|e| IdentityError::Local(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| unreachable(e.to_string()))?;
        let addr = self.addr.clone();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        endpoint
            .connect_with_connector(tower::service_fn(move |_uri| {
                let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| {
                unreachable(format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ))
            })
    }

    /// Keeps the certificate fresh, forever. `first` is told once the first one is installed.
    pub async fn maintain(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        first: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut failures: u32 = 0;
        let mut valid_until: Option<SystemTime> = None;
        loop {
            let issued = SystemTime::now();
            let wait = match self.certify().await {
                Ok(not_after) => {
                    failures = 0;
                    valid_until = Some(not_after);
                    let secs = not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    metrics.cert_expiry.set(secs as i64);
                    metrics.certified(true);
                    tracing::info!(id = %self.id, valid_until = secs, "certificate installed");
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                    not_after
                        .duration_since(issued)
                        .unwrap_or_default()
                        .mul_f64(0.7)
                }
                Err(e) => {
                    failures += 1;
                    metrics.certified(false);
                    let backoff = Duration::from_millis(200)
                        .saturating_mul(1 << failures.min(5))
                        .min(Duration::from_secs(10));
                    let still_valid =
                        valid_until.and_then(|v| v.duration_since(SystemTime::now()).ok());
                    match still_valid {
                        Some(left) => strait_admin::log_limited!(
                            tracing::Level::WARN,
                            "certificate renewal failed",
                            "renewal",
                            error = %e,
                            retry_in = ?backoff,
                            expires_in = %humantime::format_duration(Duration::from_secs(left.as_secs())),
                            "certificate renewal failed; the current certificate stays in use until it expires, then /ready reports 503"
                        ),
                        None if valid_until.is_none() => tracing::warn!(
                            error = %e,
                            retry_in = ?backoff,
                            "no certificate yet: the identity API refused or could not be reached; not ready until one is issued"
                        ),
                        None => tracing::warn!(
                            error = %e,
                            retry_in = ?backoff,
                            "certificate renewal failed and the current certificate has expired"
                        ),
                    }
                    backoff
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
        }
    }

    /// Re-reads the anchors file every second; a change replaces the bundle. Inline anchors
    /// never change.
    pub async fn watch_anchors(self: Arc<Self>) {
        let AnchorSource::File(path) = &self.anchors_source else {
            return;
        };
        let path = path.clone();
        let mut last = std::fs::read_to_string(&path).unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok(pem) = tokio::fs::read_to_string(&path).await else {
                continue;
            };
            if pem == last {
                continue;
            }
            self.install_anchors(&pem, &path.display().to_string());
            last = pem;
        }
    }

    /// Replaces the anchors with `pem` (from `source`, for the log); open mesh connections
    /// re-check their peers. An unusable bundle is logged and the current one kept.
    fn install_anchors(&self, pem: &str, source: &str) {
        match self.anchors.replace_pem(pem) {
            Ok(()) => {
                tracing::info!(source, "trust anchors reloaded");
                self.anchors_changed.send_modify(|g| *g += 1);
            }
            Err(e) => {
                tracing::warn!(source, error = %e, "new trust anchors unusable; keeping the current ones")
            }
        }
    }

    /// With anchors given inline (Kubernetes: the injector set them when the pod was created),
    /// follows the control plane's bundle over the mTLS control channel, so a root rotation
    /// reaches running proxies without a restart. A file source is followed by
    /// [`Identity::watch_anchors`] instead.
    pub async fn follow_control_plane_anchors(
        self: Arc<Self>,
        mut client: strait_api::discovery::discovery_client::DiscoveryClient<
            tonic::transport::Channel,
        >,
        proxy: String,
    ) {
        // What the pod started with: the first answer is usually the same bundle.
        let AnchorSource::Inline(initial) = &self.anchors_source else {
            return;
        };
        let mut last = initial.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let request = strait_api::discovery::TrustAnchorsRequest {
                proxy: proxy.clone(),
            };
            match client.watch_trust_anchors(request).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(update)) = stream.message().await {
                        backoff = Duration::from_millis(100);
                        if update.pem.trim() != last.trim() && !update.pem.is_empty() {
                            self.install_anchors(&update.pem, "control plane");
                            last = update.pem;
                        }
                    }
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(reason = %status.message(), "the control plane publishes no trust anchors");
                    return;
                }
                Err(status) => {
                    tracing::debug!(error = %status, "trust-anchor stream unavailable; retrying")
                }
            }
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
