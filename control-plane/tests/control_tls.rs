//! The control channel over the real transport: discovery served over mTLS, callers
//! authorized by the SPIFFE ID of their certificate.

use std::sync::Arc;
use std::time::Duration;

use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{InboundRequest, WatchRequest};
use strait_api::shared::DiscoveryServer;
use strait_control_plane::admin::Metrics;
use strait_control_plane::control_tls::MtlsIo;
use strait_control_plane::discovery::DiscoveryService;
use strait_control_plane::index::MeshIndex;
use strait_identity::ca::{generate, CertificateAuthority};
use strait_identity::tls::{Credentials, TrustAnchors};
use strait_identity::SpiffeId;
use tokio::sync::watch;

const DAY: Duration = Duration::from_secs(86400);

struct Pki {
    ca: CertificateAuthority,
    anchors: Arc<TrustAnchors>,
}

fn new_pki(trust_domain: &str) -> Pki {
    let g = generate(trust_domain, DAY * 365, DAY * 30).expect("ca");
    Pki {
        ca: CertificateAuthority::from_pem(&g.issuer_cert_pem, &g.issuer_key_pem).expect("issuer"),
        anchors: Arc::new(TrustAnchors::from_pem(&g.anchor_cert_pem).expect("anchors")),
    }
}

/// A workload certificate for `id`, as the identity API issues it.
fn workload(pki: &Pki, id: &SpiffeId) -> Arc<Credentials> {
    let (key, csr) = strait_identity::ca::new_csr(id).expect("csr");
    let signed = pki.ca.sign_csr(&csr, id, DAY).expect("signed");
    let creds = Arc::new(Credentials::default());
    let mut chain = vec![signed.leaf_der];
    chain.extend(signed.intermediates_der);
    creds.install(chain, key.serialize_der()).expect("install");
    creds
}

fn control_plane_id() -> SpiffeId {
    SpiffeId::new("cluster.local", "strait-system", "strait-control-plane").expect("id")
}

/// Serves discovery over mTLS on a loopback port, as the control plane does.
async fn serve(pki: &Pki) -> std::net::SocketAddr {
    serve_with_anchors(pki, None).await
}

async fn serve_with_anchors(
    pki: &Pki,
    anchors: Option<watch::Receiver<String>>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_creds = Arc::new(Credentials::default());
    let (chain, key) = pki
        .ca
        .issue_server(
            &control_plane_id(),
            "identity.strait-system.svc.cluster.local",
            DAY,
        )
        .expect("server cert");
    server_creds.install(chain, key).expect("install");
    let config =
        strait_control_plane::control_tls::server_config(pki.anchors.clone(), server_creds)
            .expect("config");
    let (_tx, rx) = watch::channel(Arc::new(MeshIndex::default()));
    let (_stop_tx, stopping) = watch::channel(false);
    // Keep the senders alive for the test's life.
    std::mem::forget((_tx, _stop_tx));
    let mut service = DiscoveryService::new(rx, Arc::new(Metrics::default()), stopping)
        .requiring_identity("cluster.local");
    if let Some(anchors) = anchors {
        service = service.with_trust_anchors(anchors);
    }
    let incoming =
        strait_control_plane::identity::accept_tls(listener, config, "discovery", MtlsIo::new);
    tokio::spawn(
        strait_control_plane::limits::server()
            .add_service(DiscoveryServer::new(service))
            .serve_with_incoming(incoming),
    );
    addr
}

/// A discovery client over TLS presenting `creds` (or no certificate), trusting `anchors`.
async fn client(
    addr: std::net::SocketAddr,
    anchors: Arc<TrustAnchors>,
    creds: Arc<Credentials>,
) -> Result<DiscoveryClient<tonic::transport::Channel>, tonic::transport::Error> {
    let config = strait_identity::tls::client_config(
        anchors,
        creds,
        control_plane_id(),
        Some(strait_identity::tls::ALPN_H2),
    )
    .expect("client config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from(
                    "identity.strait-system.svc.cluster.local",
                )
                .expect("name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(DiscoveryClient::new(channel))
}

fn watch_request() -> WatchRequest {
    WatchRequest {
        target: "10.96.0.10:80".into(),
        proxy: "default/web".into(),
    }
}

#[tokio::test]
async fn a_proxy_with_its_workload_certificate_is_served_its_own_policy_only() {
    let pki = new_pki("cluster.local");
    let addr = serve(&pki).await;
    let web = SpiffeId::new("cluster.local", "default", "web").expect("id");
    let mut c = client(addr, pki.anchors.clone(), workload(&pki, &web))
        .await
        .expect("mTLS connection");
    let mut stream = c.watch(watch_request()).await.expect("watch").into_inner();
    assert!(stream.message().await.expect("answer").is_some());
    let own = c
        .watch_inbound(InboundRequest {
            identity: web.to_string(),
            proxy: "default/web".into(),
        })
        .await
        .expect("its own policy");
    drop(own);
    let other = c
        .watch_inbound(InboundRequest {
            identity: "spiffe://cluster.local/ns/default/sa/db".into(),
            proxy: "default/web".into(),
        })
        .await
        .expect_err("another workload's policy");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other}");
}

#[tokio::test]
async fn plaintext_and_tls_without_a_certificate_are_refused() {
    let pki = new_pki("cluster.local");
    let addr = serve(&pki).await;
    // Plain HTTP/2: the server speaks TLS only.
    let plain = async {
        let mut c = DiscoveryClient::connect(format!("http://{addr}")).await?;
        c.watch(watch_request()).await.map_err(Into::into)
    };
    let plain: Result<_, Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .expect("plaintext answered or failed in time");
    assert!(plain.is_err(), "plaintext discovery was served");
    // TLS without a client certificate.
    let no_cert = Arc::new(Credentials::default());
    let refused = match client(addr, pki.anchors.clone(), no_cert).await {
        Err(_) => true,
        Ok(mut c) => c.watch(watch_request()).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from another CA (another trust root) is refused in the handshake.
    let other = new_pki("cluster.local");
    let id = SpiffeId::new("cluster.local", "default", "web").expect("id");
    let refused = match client(addr, pki.anchors.clone(), workload(&other, &id)).await {
        Err(_) => true,
        Ok(mut c) => c.watch(watch_request()).await.is_err(),
    };
    assert!(refused, "a certificate of another root was served");
}

#[tokio::test]
async fn proxies_follow_the_trust_anchors_over_the_control_channel() {
    let pki = new_pki("cluster.local");
    let (tx, rx) = watch::channel("-----BEGIN CERTIFICATE-----\nfirst\n".to_string());
    let addr = serve_with_anchors(&pki, Some(rx)).await;
    let web = SpiffeId::new("cluster.local", "default", "web").expect("id");
    let mut c = client(addr, pki.anchors.clone(), workload(&pki, &web))
        .await
        .expect("mTLS connection");
    let mut stream = c
        .watch_trust_anchors(strait_api::discovery::TrustAnchorsRequest {
            proxy: "default/web".into(),
        })
        .await
        .expect("served")
        .into_inner();
    let first = stream.message().await.expect("answer").expect("a bundle");
    assert!(first.pem.contains("first"));
    // A rotation step: the bundle changes, every follower hears it.
    tx.send_replace("-----BEGIN CERTIFICATE-----\nfirst+second\n".to_string());
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("in time")
        .expect("answer")
        .expect("a bundle");
    assert!(next.pem.contains("first+second"));
    std::mem::forget(tx);
}
