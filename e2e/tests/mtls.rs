//! Identity and mutual TLS between proxies: what crosses the wire, who may connect, and who
//! may answer.

use std::time::Duration;

use strait_e2e::{metric, workload_cert, Mesh, ServiceDef};
use strait_testbed::SidecarOpts;

#[test]
fn traffic_between_proxies_is_tls13_and_a_marker_never_crosses_in_plaintext() -> anyhow::Result<()>
{
    let mesh = Mesh::with_identity("mtls", "24h")?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.net.start_app(
        &server,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.net
        .start_app(&server, "echo", &["echo", "--listen", "0.0.0.0:7000"])?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    mesh.config.service(&ServiceDef::new(
        "tcpecho",
        "10.96.0.31",
        7000,
        7000,
        &[&server],
    ))?;
    let client = mesh.pod_as("client", "frontend", &SidecarOpts::default())?;
    let outsider = mesh.net.pod("outsider")?;

    let pcap = mesh.net.dir.join("capture.pcap");
    // Captured at the server pod's interface: every byte to and from the server crosses it.
    let dump = mesh.net.spawn_in(
        &server.ns,
        "tcpdump",
        None,
        &[
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-n",
            "-w",
            &pcap.to_string_lossy(),
            "tcp",
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&dump, "listening on eth0", Duration::from_secs(10))?;

    let secret = "STRAIT-MARKER-3f9c1a-http";
    let out = mesh.curl(
        &client,
        &[
            "-H",
            &format!("x-marker: {secret}"),
            "--data-binary",
            secret,
            "http://10.96.0.10/echo",
        ],
    )?;
    assert_eq!(out, secret, "the request and its echo cross the mesh");
    let bin = strait_testbed::bin("strait-testapp")?;
    let tcp_secret = "STRAIT-MARKER-3f9c1a-tcp";
    let out = mesh.net.exec(
        &client,
        &[
            &bin.to_string_lossy(),
            "tcp-client",
            "--addr",
            "10.96.0.31:7000",
            "--send",
            tcp_secret,
        ],
    )?;
    assert!(out.contains(&format!("reply={tcp_secret}")), "{out}");
    // Control: a client outside the mesh talks plaintext (the pod is permissive); the capture
    // must see that marker, which shows it would see the others if they leaked.
    let plain = "STRAIT-MARKER-plaintext-control";
    let out = mesh.curl(
        &outsider,
        &[
            "--data-binary",
            plain,
            &format!("http://{}:8080/echo", server.ip),
        ],
    )?;
    assert_eq!(out, plain);

    std::thread::sleep(Duration::from_millis(300));
    mesh.net.kill(&dump, nix::sys::signal::Signal::SIGINT)?;
    let captured = std::fs::read(&pcap)?;
    let has = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(plain.as_bytes()),
        "the capture sees plaintext traffic ({} bytes)",
        captured.len()
    );
    assert!(
        !has(secret.as_bytes()),
        "the HTTP marker crossed in plaintext"
    );
    assert!(
        !has(tcp_secret.as_bytes()),
        "the TCP marker crossed in plaintext"
    );
    // A TLS 1.3 ServerHello carries supported_versions (0x002b) = TLS 1.3 (0x0304).
    assert!(
        has(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello in the capture"
    );

    // The server side saw the client's identity.
    let m = mesh.metrics(&client)?;
    assert!(
        metric(&m, "strait_identity_certify_total", &["result=\"ok\""]) >= Some(1.0),
        "{m}"
    );
    assert!(
        metric(&m, "strait_identity_cert_expiry_timestamp_seconds", &[]) > Some(1.7e9),
        "{m}"
    );
    Ok(())
}

#[test]
fn a_strict_pod_refuses_plaintext_and_a_permissive_pod_accepts_it() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("strict", "24h")?;
    let strict = mesh.pod_as(
        "strict",
        "strict",
        &SidecarOpts {
            env: vec![("STRAIT_INBOUND_MODE", "strict")],
            ..Default::default()
        },
    )?;
    let permissive = mesh.pod_as("permissive", "permissive", &SidecarOpts::default())?;
    for pod in [&strict, &permissive] {
        mesh.net.start_app(
            pod,
            "http",
            &["http", "--listen", "0.0.0.0:8080", "--name", &pod.name],
        )?;
    }
    mesh.config.service(&ServiceDef::new(
        "strict",
        "10.96.0.10",
        80,
        8080,
        &[&strict],
    ))?;
    let client = mesh.pod_as("client", "frontend", &SidecarOpts::default())?;
    let outsider = mesh.net.pod("outsider")?;

    // From the mesh: mTLS, accepted.
    assert_eq!(
        mesh.curl(&client, &["http://10.96.0.10/"])?.trim(),
        "hello from strict"
    );
    // From outside the mesh: plaintext, refused by the strict pod, accepted by the permissive one.
    let (ok, out, err) = mesh.net.try_exec(
        &outsider,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/", strict.ip),
        ],
    )?;
    assert!(!ok, "plaintext must be refused: {out}");
    assert!(
        err.contains("Empty reply") || err.contains("reset") || err.contains("Recv failure"),
        "{err}"
    );
    assert_eq!(
        mesh.curl(&outsider, &[&format!("http://{}:8080/", permissive.ip)])?
            .trim(),
        "hello from permissive"
    );
    let m = mesh.metrics(&strict)?;
    assert_eq!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"plaintext\"", "target=\"8080\""]
        ),
        Some(1.0),
        "{m}"
    );
    Ok(())
}

#[test]
fn a_client_from_a_foreign_ca_and_a_server_with_another_identity_are_refused() -> anyhow::Result<()>
{
    let mesh = Mesh::with_identity("foreign", "24h")?;
    let ca = mesh.ca.clone().expect("identity mesh");
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.net.start_app(
        &server,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    let outsider = mesh.net.pod("outsider")?;
    let sni = "web.default.serviceaccount.identity.strait.cluster.local";

    // openssl s_client with a certificate from a foreign CA, asking for the mesh name.
    let (cert, key, chain) = workload_cert(&mesh.net.dir, "foreign", "frontend", None)?;
    // No ALPN: the inbound proxy treats the stream as opaque TCP to the app, so a request
    // written through an accepted connection gets the app's answer.
    let s_client = format!(
        "(printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'; sleep 1) | timeout 10 openssl s_client -quiet -connect {}:8080 -servername {sni} -tls1_3 -cert {} -key {} -cert_chain {} -CAfile {} 2>&1",
        server.ip,
        cert.display(),
        key.display(),
        chain.display(),
        ca.anchors.display()
    );
    let (_, out, _) = mesh.net.try_exec(&outsider, &["bash", "-c", &s_client])?;
    assert!(
        !out.contains("hello from server"),
        "a foreign client certificate must be refused:\n{out}"
    );
    mesh.eventually(Duration::from_secs(5), || {
        Ok(metric(
            &mesh.metrics(&server)?,
            "strait_inbound_refused_total",
            &["reason=\"tls handshake\""],
        ) >= Some(1.0))
    })?;
    // The same with a certificate from the mesh's own CA is accepted (the test is not vacuous).
    let (cert, key, chain) = workload_cert(&mesh.net.dir, "member", "frontend", Some(&ca))?;
    let s_client_ok = s_client
        .replace(
            &mesh.net.dir.join("foreign.crt").display().to_string(),
            &cert.display().to_string(),
        )
        .replace(
            &mesh.net.dir.join("foreign.key").display().to_string(),
            &key.display().to_string(),
        )
        .replace(
            &mesh.net.dir.join("foreign-chain.crt").display().to_string(),
            &chain.display().to_string(),
        );
    let (_, out, _) = mesh
        .net
        .try_exec(&outsider, &["bash", "-c", &s_client_ok])?;
    assert!(
        out.contains("hello from server"),
        "a mesh client certificate is accepted:\n{out}"
    );

    // An impostor: a valid chain from the mesh CA, but the identity "impostor" where discovery
    // announces "web". The client proxy must refuse to talk to it.
    let impostor = mesh.net.pod("impostor")?;
    let (cert, key, chain) = workload_cert(&mesh.net.dir, "impostor", "impostor", Some(&ca))?;
    let s_server = mesh.net.spawn(
        &impostor,
        "s_server",
        &[
            "openssl",
            "s_server",
            "-accept",
            "8080",
            "-tls1_3",
            "-cert",
            &cert.to_string_lossy(),
            "-key",
            &key.to_string_lossy(),
            "-cert_chain",
            &chain.to_string_lossy(),
            "-www",
        ],
    )?;
    mesh.net
        .wait_log(&s_server, "ACCEPT", Duration::from_secs(10))?;
    mesh.config.write(
        "pod-impostor.yaml",
        "kind: Pod\nmetadata: {name: impostor, namespace: default}\nspec: {serviceAccountName: web}\n",
    )?;
    mesh.config.service(&ServiceDef::new(
        "web",
        "10.96.0.10",
        80,
        8080,
        &[&impostor],
    ))?;
    let client = mesh.pod_as("client", "frontend", &SidecarOpts::default())?;
    let out = mesh.curl(&client, &["-i", "http://10.96.0.10/"])?;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.contains("Strait-Proxy-Error: mTLS with")
            && out.contains("but discovery said spiffe://cluster.local/ns/default/sa/web"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_mesh_connection_does_not_outlive_its_maximum_age() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("maxage", "24h")?;
    let server = mesh.pod_as(
        "server",
        "echo",
        &SidecarOpts {
            env: vec![("STRAIT_MAX_CONNECTION_AGE", "2s")],
            ..Default::default()
        },
    )?;
    mesh.net
        .start_app(&server, "echo", &["echo", "--listen", "0.0.0.0:7000"])?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.31",
        7000,
        7000,
        &[&server],
    ))?;
    let client = mesh.pod_as("client", "client", &SidecarOpts::default())?;
    let hold = mesh.hold_tcp(&client, "10.96.0.31:7000")?;
    let lived = mesh.held_tcp_closed(&hold, Duration::from_secs(15))?;
    eprintln!("an mTLS TCP connection with a 2 s maximum age was closed after {lived:.2?}");
    assert!(lived < Duration::from_secs(4), "{lived:?}");
    let log = mesh.net.logs();
    assert!(log.contains("it reached --max-connection-age"), "{log}");
    Ok(())
}

#[test]
fn the_control_channel_is_mtls_and_refuses_callers_without_a_workload_certificate(
) -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("ctltls", "24h")?;
    // Every byte of discovery and policy, at the control plane's side of the bridge.
    let pcap = mesh.net.dir.join("control.pcap");
    let dump = mesh.net.spawn_in(
        &mesh.net.bridge_ns,
        "tcpdump",
        None,
        &[
            "tcpdump",
            "--immediate-mode",
            "-i",
            "any",
            "-n",
            "-w",
            &pcap.to_string_lossy(),
            "tcp port 8086",
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&dump, "listening on any", Duration::from_secs(10))?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    let client = mesh.pod_as("client", "frontend", &SidecarOpts::default())?;
    let out = mesh.curl(&client, &["http://10.96.0.10/"])?;
    assert!(out.contains("hello from server"), "{out}");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_discovery_connected", &[]),
        Some(1.0),
        "{m}"
    );

    // A process in a pod without a workload certificate cannot open a stream: plain HTTP/2
    // gets no gRPC answer, TLS without a client certificate is refused.
    let outsider = mesh.net.pod("outsider")?;
    let watch = "https://10.88.0.1:8086/strait.discovery.v1.Discovery/Watch";
    let grpc = [
        "-sS",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        "",
    ];
    let plain = watch.replace("https", "http");
    let mut args: Vec<&str> = vec!["curl", "--http2-prior-knowledge"];
    args.extend(grpc);
    args.push(&plain);
    let (ok, out, err) = mesh.net.try_exec(&outsider, &args)?;
    assert!(
        !ok || !out.starts_with("200"),
        "plaintext discovery answered: {out} {err}"
    );
    let mut args: Vec<&str> = vec!["curl", "-k", "--http2"];
    args.extend(grpc);
    args.push(watch);
    let (ok, out, err) = mesh.net.try_exec(&outsider, &args)?;
    assert!(
        !ok,
        "TLS without a client certificate was served: {out} {err}"
    );

    std::thread::sleep(Duration::from_millis(300));
    mesh.net.kill(&dump, nix::sys::signal::Signal::SIGINT)?;
    let captured = std::fs::read(&pcap)?;
    let has = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    assert!(
        captured.len() > 2000,
        "too little captured: {} bytes",
        captured.len()
    );
    // (The ClientHello's SNI, identity.strait-system.svc.cluster.local, is the one name in
    // clear, as in any TLS.)
    for plaintext in [
        "web.default.svc.cluster.local",
        "spiffe://cluster.local/ns/default",
        "hello from server",
    ] {
        assert!(
            !has(plaintext.as_bytes()),
            "{plaintext:?} crossed the control channel in plaintext"
        );
    }
    assert!(
        has(&[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello on the control channel"
    );
    Ok(())
}

#[test]
fn a_proxy_with_inline_anchors_follows_a_new_bundle_from_the_control_plane() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("anchfollow", "24h")?;
    let ca = mesh.ca.as_ref().expect("identity mesh");
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    // As in Kubernetes: the anchors were given inline when the pod was created.
    let pem = std::fs::read_to_string(&ca.anchors)?;
    let client = mesh.pod_as(
        "client",
        "frontend",
        &SidecarOpts {
            env: vec![("STRAIT_TRUST_ANCHORS_PEM", pem.as_str())],
            ..Default::default()
        },
    )?;
    assert!(mesh
        .curl(&client, &["http://10.96.0.10/"])?
        .contains("hello from server"));
    // Step 1 of a rotation: a second anchor joins the bundle the control plane mounts.
    let next = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(86400 * 365),
        Duration::from_secs(86400 * 30),
    )?;
    std::fs::write(&ca.anchors, format!("{pem}{}", next.anchor_cert_pem))?;
    let proxy_log = mesh.net.dir.join("client-proxy.log");
    mesh.eventually(Duration::from_secs(15), || {
        Ok(std::fs::read_to_string(&proxy_log)
            .unwrap_or_default()
            .contains("trust anchors reloaded source=\"control plane\""))
    })?;
    // The mesh keeps working under the two-anchor bundle.
    for _ in 0..5 {
        assert!(mesh
            .curl(&client, &["http://10.96.0.10/"])?
            .contains("hello from server"));
    }
    Ok(())
}
