//! The control channel inside the trust model: discovery and policy over TLS 1.3, with the
//! proxy's workload certificate as its proof of identity (mTLS).
//!
//! The control plane presents its own certificate (SPIFFE ID
//! `spiffe://<trust-domain>/ns/strait-system/sa/strait-control-plane`, which proxies check)
//! and requires a client certificate chaining to the trust anchors. Each call then knows its
//! caller's SPIFFE ID ([`Caller`]), and the discovery service authorizes by it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strait_identity::tls::{Credentials, TrustAnchors};
use strait_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Who is calling: the TCP peer and, over mTLS, the SPIFFE ID of its certificate.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub addr: Option<SocketAddr>,
    pub id: Option<SpiffeId>,
}

impl Caller {
    /// The caller of `request`: from the mTLS connection, or just its address (plaintext).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        match request.extensions().get::<Caller>() {
            Some(c) => c.clone(),
            None => Caller {
                addr: request.remote_addr(),
                id: None,
            },
        }
    }
}

/// An mTLS connection tonic can serve; its calls carry a [`Caller`].
pub struct MtlsIo {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    caller: Caller,
}

impl MtlsIo {
    pub fn new(tls: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let (tcp, session) = tls.get_ref();
        let caller = Caller {
            addr: tcp.peer_addr().ok(),
            id: strait_identity::tls::peer_identity(session.peer_certificates()),
        };
        Self { tls, caller }
    }
}

impl tonic::transport::server::Connected for MtlsIo {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for MtlsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The server side of the control channel: TLS 1.3, HTTP/2, a client certificate chaining to
/// `anchors` required.
pub fn server_config(
    anchors: Arc<TrustAnchors>,
    credentials: Arc<Credentials>,
) -> Result<Arc<rustls::ServerConfig>, strait_identity::tls::TlsError> {
    let mut config = strait_identity::tls::server_config(anchors, credentials)?;
    config.alpn_protocols = vec![strait_identity::tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Where the anchors that verify proxies come from.
#[derive(Debug, Clone)]
pub enum AnchorSource {
    /// A PEM bundle file, re-read every second.
    File(PathBuf),
    /// The issuer's own certificate (no bundle configured): certificates it signs verify.
    Issuer(Arc<crate::identity::Issuer>),
}

impl AnchorSource {
    fn pem(&self) -> Result<String, String> {
        match self {
            AnchorSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read the trust anchors {} (--trust-anchors): {e}",
                    path.display()
                )
            }),
            AnchorSource::Issuer(issuer) => Ok(issuer.current().cert_pem().to_string()),
        }
    }

    /// The anchors now.
    pub fn load(&self) -> Result<Arc<TrustAnchors>, String> {
        let pem = self.pem()?;
        TrustAnchors::from_pem(&pem)
            .map(Arc::new)
            .map_err(|e| format!("the trust anchors are unusable (--trust-anchors): {e}"))
    }

    /// The bundle now, PEM.
    pub fn current_pem(&self) -> Result<String, String> {
        self.pem()
    }

    /// Keeps `anchors` (and `published`, what proxies follow) in step with the source (a
    /// rotation adds or removes anchors without a restart); a bad bundle is logged and the
    /// current one kept.
    pub async fn watch(
        self,
        anchors: Arc<TrustAnchors>,
        published: tokio::sync::watch::Sender<String>,
    ) {
        let mut last = self.pem().unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Ok(pem) = self.pem() else { continue };
            if pem == last {
                continue;
            }
            match anchors.replace_pem(&pem) {
                Ok(()) => {
                    tracing::info!("trust anchors changed; proxies follow them");
                    published.send_replace(pem.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the new trust anchors are unusable; keeping the current ones")
                }
            }
            last = pem;
        }
    }
}
