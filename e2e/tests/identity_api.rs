//! The control plane's identity API, called the way a proxy calls it (TLS, a token, a CSR), on
//! loopback: it signs only the caller's own SPIFFE ID and refuses everything else clearly.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use strait_api::identity::identity_client::IdentityClient;
use strait_api::identity::CertifyRequest;
use tonic::Code;

struct ControlPlane {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

fn csr(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri"))
}

#[tokio::test]
async fn the_ca_signs_only_the_callers_own_identity() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-identity-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config"))?;
    let ca = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(86400 * 365),
        Duration::from_secs(86400 * 30),
    )?;
    std::fs::write(dir.join("anchors.pem"), &ca.anchor_cert_pem)?;
    std::fs::write(dir.join("issuer.crt"), &ca.issuer_cert_pem)?;
    std::fs::write(dir.join("issuer.key"), &ca.issuer_key_pem)?;
    std::fs::write(
        dir.join("config/tokens.yaml"),
        "kind: Secret\nmetadata: {name: web-token, namespace: shop, annotations: {kubernetes.io/service-account.name: web}}\n\
         type: kubernetes.io/service-account-token\nstringData: {token: web-token-value}\n",
    )?;
    let identity_addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join("control-plane.log");
    let child = Command::new(strait_testbed::bin("strait-control-plane")?)
        .args(["--config-dir", &dir.join("config").to_string_lossy()])
        .args(["--state-dir", &dir.join("state").to_string_lossy()])
        .args(["--discovery-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--identity-addr", &identity_addr])
        .args(["--issuer-cert", &dir.join("issuer.crt").to_string_lossy()])
        .args(["--issuer-key", &dir.join("issuer.key").to_string_lossy()])
        .args(["--leaf-lifetime", "1h"])
        .env("STRAIT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let cp = ControlPlane { child, log };
    let start = Instant::now();
    while !std::fs::read_to_string(&cp.log)?.contains("serving identity") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "control plane did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A TLS client that trusts the anchors and checks the server's DNS name, as a proxy does.
    let anchors = strait_identity::tls::TrustAnchors::from_pem(&ca.anchor_cert_pem)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(strait_identity::tls::dns_client_config(
        &anchors,
    )?));
    let name = rustls::pki_types::ServerName::try_from("identity.strait-system.svc.cluster.local")?;
    let addr = identity_addr.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{identity_addr}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (tls, name, addr) = (tls.clone(), name.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls.connect(name, tcp).await?))
            }
        }))
        .await?;
    let mut client = IdentityClient::new(channel);
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let call = |identity: &str, token: &str, csr: Vec<u8>| CertifyRequest {
        identity: identity.to_string(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    };

    // The caller's own identity: signed, for that identity only, chained to the issuer.
    let ok = client
        .certify(call(web, "web-token-value", csr(vec![uri(web)])))
        .await?
        .into_inner();
    assert_eq!(strait_identity::ca::spiffe_ids(&ok.leaf_certificate), [web]);
    assert_eq!(ok.intermediate_certificates.len(), 1);
    let lifetime = ok.valid_until_unix_seconds
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
    assert!(
        (3500..=3600).contains(&lifetime),
        "leaf lifetime {lifetime}s, configured 1h"
    );

    let refused = |r: Result<tonic::Response<_>, tonic::Status>| r.expect_err("must be refused");
    // Another service account's SPIFFE ID, with web's token.
    let admin = "spiffe://cluster.local/ns/shop/sa/admin";
    let s = refused(
        client
            .certify(call(admin, "web-token-value", csr(vec![uri(admin)])))
            .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message()
            .contains("the token is for spiffe://cluster.local/ns/shop/sa/web"),
        "{s:?}"
    );
    // The same, not declared in the request: the CSR alone asks for admin.
    let s = refused(
        client
            .certify(call("", "web-token-value", csr(vec![uri(admin)])))
            .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // The right ID plus an extra DNS SAN.
    let extra = csr(vec![uri(web), SanType::DnsName("web.shop.svc".try_into()?)]);
    let s = refused(client.certify(call(web, "web-token-value", extra)).await);
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("DNSName"), "{s:?}");
    // An unknown token, and a CSR that is not one.
    let s = refused(
        client
            .certify(call(web, "stolen", csr(vec![uri(web)])))
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = refused(
        client
            .certify(call(web, "web-token-value", b"not a csr".to_vec()))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // Every refusal left a log line naming why.
    let log = std::fs::read_to_string(&cp.log)?;
    assert_eq!(log.matches("refused").count(), 5, "{log}");
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
