//! HTTP/2, gRPC, WebSocket and raw TCP through the mesh, with real clients (h2load, curl, a
//! tonic client, a tungstenite client) and servers.

use strait_e2e::{metric, Mesh, ServiceDef};

#[test]
fn h2c_and_grpc_unary_streaming_trailers_and_errors() -> anyhow::Result<()> {
    let mesh = Mesh::new("grpc")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "h2server"],
    )?;
    mesh.net.start_app(
        &server,
        "grpc",
        &["grpc", "--listen", "0.0.0.0:9000", "--name", "grpcserver"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.20",
        9000,
        9000,
        &[&server],
    ))?;
    let client = mesh.meshed_pod("client")?;

    // h2c with prior knowledge stays HTTP/2 end to end.
    let out = mesh.curl(
        &client,
        &["--http2-prior-knowledge", "-i", "http://10.96.0.10/headers"],
    )?;
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.contains("version: HTTP/2.0"),
        "the app sees HTTP/2: {out}"
    );

    // Multiplexed load from h2load: every request succeeds.
    let out = mesh.net.exec(
        &client,
        &[
            "h2load",
            "-n",
            "400",
            "-c",
            "2",
            "-m",
            "16",
            "http://10.96.0.10/",
        ],
    )?;
    assert!(out.contains("400 succeeded, 0 failed"), "{out}");

    let grpc = |args: &[&str]| -> anyhow::Result<String> {
        let bin = strait_testbed::bin("strait-testapp")?;
        let bin = bin.to_string_lossy();
        let mut cmd = vec![
            bin.as_ref(),
            "grpc-client",
            "--addr",
            "http://10.96.0.20:9000",
        ];
        cmd.extend_from_slice(args);
        mesh.net.exec(&client, &cmd)
    };
    assert_eq!(
        grpc(&["unary", "--message", "hi"])?.trim(),
        "ok served_by=grpcserver message=hi"
    );
    // A non-OK status and its metadata (a trailers-only response) arrive as sent.
    let out = grpc(&["unary", "--fail-code", "5"])?;
    assert_eq!(
        out.trim(),
        "status code=5 message=\"failure 5 requested\" x-fail-reason=requested"
    );
    // Server streaming: 100 messages in order, then OK in the trailers.
    assert_eq!(
        grpc(&["stream", "--count", "100"])?.trim(),
        "received=100\nstatus code=0"
    );
    // Trailers after data frames carry a non-OK status.
    let out = grpc(&["stream", "--count", "10", "--fail-code", "9"])?;
    assert_eq!(
        out.trim(),
        "received=10\nstatus code=9 message=\"failure 9 requested\" x-fail-reason=requested"
    );
    // Bidirectional streaming, one reply per message.
    assert_eq!(grpc(&["chat", "--count", "50"])?.trim(), "chatted=50");

    let m = mesh.metrics(&client)?;
    assert!(
        metric(
            &m,
            "strait_request_total",
            &["target=\"echo.default.svc.cluster.local:9000\""]
        ) >= Some(5.0),
        "{m}"
    );
    Ok(())
}

#[test]
fn websocket_echo_through_the_mesh() -> anyhow::Result<()> {
    let mesh = Mesh::new("ws")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "ws"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    let bin = strait_testbed::bin("strait-testapp")?;
    let out = mesh.net.exec(
        &client,
        &[
            &bin.to_string_lossy(),
            "ws-client",
            "--url",
            "ws://10.96.0.10/ws",
            "--messages",
            "20",
        ],
    )?;
    assert!(out.contains("handshake status=101"), "{out}");
    assert!(out.contains("echoed 20 messages"), "{out}");
    Ok(())
}

#[test]
fn server_first_on_an_opaque_port_and_client_first_tcp_on_an_ordinary_port() -> anyhow::Result<()> {
    let mesh = Mesh::new("tcp")?;
    let server = mesh.meshed_pod_with(
        "server",
        &strait_testbed::SidecarOpts {
            // A long detection timeout makes any accidental detection on the opaque port obvious.
            env: vec![("STRAIT_DETECT_TIMEOUT", "5s")],
            ..Default::default()
        },
    )?;
    mesh.net.start_app(
        &server,
        "mysql",
        &[
            "banner",
            "--listen",
            "0.0.0.0:3306",
            "--text",
            "MYSQL-BANNER",
        ],
    )?;
    mesh.net
        .start_app(&server, "echo", &["echo", "--listen", "0.0.0.0:7000"])?;
    mesh.config
        .service(&ServiceDef::new("db", "10.96.0.30", 3306, 3306, &[&server]))?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.31",
        7000,
        7000,
        &[&server],
    ))?;
    let client = mesh.meshed_pod_with(
        "client",
        &strait_testbed::SidecarOpts {
            env: vec![("STRAIT_DETECT_TIMEOUT", "5s")],
            ..Default::default()
        },
    )?;
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();

    // Server speaks first (3306 is a default opaque port): the banner arrives with no detection delay.
    let out = mesh
        .net
        .exec(&client, &[&bin, "tcp-client", "--addr", "10.96.0.30:3306"])?;
    assert!(out.contains("reply=MYSQL-BANNER"), "{out}");
    let ms: f64 = out
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        ms < 100.0,
        "server-first banner took {ms} ms (detection must be skipped): {out}"
    );
    assert!(
        out.contains("after_half_close=after"),
        "half-close keeps the other direction: {out}"
    );

    // Client speaks first with a non-HTTP protocol on an ordinary port: detected as TCP at once.
    let out = mesh.net.exec(
        &client,
        &[
            &bin,
            "tcp-client",
            "--addr",
            "10.96.0.31:7000",
            "--send",
            "PING",
        ],
    )?;
    assert!(out.contains("reply=PING"), "{out}");
    assert!(out.contains("after_half_close=after"), "{out}");
    let ms: f64 = out
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        ms < 1000.0,
        "client-first TCP must not wait for the 5 s detection timeout: {ms} ms"
    );

    let m = mesh.metrics(&client)?;
    assert!(
        metric(&m, "strait_protocol_detect_total", &["protocol=\"tcp\""]) >= Some(1.0),
        "{m}"
    );
    // The client spoke at once: no speculative connection was needed.
    assert_eq!(
        metric(&m, "strait_protocol_speculation_total", &[]),
        None,
        "{m}"
    );
    Ok(())
}

#[test]
fn ipv6_service_through_both_sidecars() -> anyhow::Result<()> {
    let mesh = Mesh::new("ipv6")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "[::]:8080", "--name", "server6"],
    )?;
    mesh.config.write(
        "web6.yaml",
        &format!(
            r#"kind: Service
metadata: {{name: web6, namespace: default}}
spec: {{clusterIP: "fd00:96::10", ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
kind: EndpointSlice
metadata: {{name: web6, namespace: default, labels: {{kubernetes.io/service-name: web6}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: ["{}"]}}]
"#,
            server.ip6
        ),
    )?;
    let client = mesh.meshed_pod("client")?;
    let out = mesh.curl(&client, &["-g", "http://[fd00:96::10]/headers"])?;
    assert!(out.contains("host: [fd00:96::10]"), "{out}");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &["target=\"web6.default.svc.cluster.local:80\""]
        ),
        Some(1.0),
        "{m}"
    );
    let m = mesh.metrics(&server)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &["direction=\"inbound\"", "target=\"8080\""]
        ),
        Some(1.0),
        "{m}"
    );
    Ok(())
}
