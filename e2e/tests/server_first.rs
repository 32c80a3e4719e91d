//! Server-speaks-first protocols on ports nobody declared opaque: found on the first
//! connection by a speculative upstream connection, remembered after it, and free for clients
//! that speak first or say nothing.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::Pod;

/// Connects `count` times to `addr` from `pod`; returns each connection's time to the first
/// line, checking that it is the greeting.
fn greetings(mesh: &Mesh, pod: &Pod, addr: &str, count: usize) -> anyhow::Result<Vec<f64>> {
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();
    (0..count)
        .map(|_| {
            let out = mesh.net.exec(pod, &[&bin, "tcp-client", "--addr", addr])?;
            anyhow::ensure!(out.contains("reply=MARIADB-GREETING"), "{out}");
            anyhow::ensure!(out.contains("after_half_close=after"), "{out}");
            out.split("elapsed_ms=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no elapsed_ms: {out}"))
        })
        .collect()
}

#[test]
fn a_server_first_port_nobody_declared_is_found_on_the_first_connection_and_remembered(
) -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("srvfirst", "1h")?;
    let server = mesh.meshed_pod("server")?;
    // 3307: not an opaque port, and no Service annotation says so.
    mesh.net.start_app(
        &server,
        "db",
        &[
            "banner",
            "--listen",
            "0.0.0.0:3307",
            "--text",
            "MARIADB-GREETING",
        ],
    )?;
    mesh.serve_web(&server)?;
    mesh.config
        .service(&ServiceDef::new("db", "10.96.0.30", 3307, 3307, &[&server]))?;
    let client = mesh.meshed_pod("client")?;

    // Meshed client to the service: the first connection pays the short wait, not the 1 s
    // detection timeout; later ones skip detection.
    let meshed = greetings(&mesh, &client, "10.96.0.30:3307", 5)?;
    println!("meshed client, time to greeting (ms): {meshed:?}");
    assert!(meshed[0] < 500.0, "first connection stalled: {meshed:?}");
    assert!(
        meshed[1..].iter().all(|ms| *ms < 100.0),
        "later connections must not wait: {meshed:?}"
    );
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_protocol_speculation_total",
            &["direction=\"outbound\"", "outcome=\"server_first\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strait_protocol_server_first_known_total",
            &["direction=\"outbound\""]
        ),
        Some(4.0),
        "{m}"
    );
    let learned = mesh.curl(&client, &["http://127.0.0.1:4191/protocols"])?;
    assert!(
        learned.contains("\"destination\":\"10.96.0.30:3307\"")
            && learned.contains("\"speaker\":\"server-first\""),
        "{learned}"
    );
    // Every connection rode mTLS to the server's proxy (its inbound counts TLS clients).
    let sm = mesh.metrics(&server)?;
    assert!(
        metric(&sm, "strait_tcp_open_total", &["direction=\"inbound\""]).unwrap_or(0.0) >= 5.0,
        "{sm}"
    );

    // An unmeshed client to the meshed pod's port: the server's proxy learns it the same way.
    let outsider = mesh.net.pod("outsider")?;
    let target = format!("{}:3307", server.ip);
    let plain = greetings(&mesh, &outsider, &target, 4)?;
    println!("unmeshed client, time to greeting (ms): {plain:?}");
    assert!(plain[0] < 500.0, "first connection stalled: {plain:?}");
    assert!(
        plain[1..].iter().all(|ms| *ms < 100.0),
        "later connections must not wait: {plain:?}"
    );
    // Learned from the first: the port speaks first, and this client speaks plaintext (so its
    // next connections go to the application at once, without looking for a ClientHello).
    let learned = mesh.curl(&server, &["http://127.0.0.1:4191/protocols"])?;
    assert!(
        learned.contains("\"destination\":\"port 3307\""),
        "{learned}"
    );
    assert!(learned.contains(&outsider.ip.to_string()), "{learned}");
    // ... and still serves mesh TLS on it: the meshed client keeps its greeting over mTLS.
    assert_eq!(greetings(&mesh, &client, "10.96.0.30:3307", 2)?.len(), 2);

    // HTTP on the same machinery pays nothing: the client speaks first, no speculation.
    let out = mesh.curl(&client, &["http://10.96.0.10/"])?;
    assert!(out.contains("hello from server"), "{out}");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_protocol_speculation_total",
            &["outcome=\"client_first\""]
        ),
        None,
        "{m}"
    );

    // A client that connects and closes without a byte costs no upstream connection (on a
    // destination not known to speak first: a known one is connected at once, as it must be).
    let echo = mesh
        .net
        .start_app(&server, "echo", &["echo", "--listen", "0.0.0.0:7001"])?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.31",
        7001,
        7001,
        &[&server],
    ))?;
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();
    mesh.eventually(Duration::from_secs(10), || {
        let out = mesh.net.exec(
            &client,
            &[
                &bin,
                "tcp-client",
                "--addr",
                "10.96.0.31:7001",
                "--send",
                "PING",
            ],
        );
        Ok(out.is_ok_and(|o| o.contains("reply=PING")))
    })?;
    let accepted = |mesh: &Mesh| mesh.net.output(&echo).matches("accepted ").count();
    let before = accepted(&mesh);
    let out = mesh.net.exec(
        &client,
        &[
            "python3",
            "-c",
            "import socket\nfor _ in range(10):\n    socket.create_connection(('10.96.0.31', 7001), timeout=5).close()\nprint('closed 10')",
        ],
    )?;
    assert!(out.contains("closed 10"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        accepted(&mesh),
        before,
        "connections that sent nothing reached the server"
    );
    assert!(before >= 1, "the echo's log counts connections");
    Ok(())
}
