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
    // Every connection rode mTLS to the server's proxy, by its mesh port: counted there under
    // the application's port.
    let sm = mesh.metrics(&server)?;
    assert!(
        metric(
            &sm,
            "strait_tcp_open_total",
            &["direction=\"inbound\"", "target=\"3307\""]
        )
        .unwrap_or(0.0)
            >= 5.0,
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
    // Learned from the first: the port speaks first.
    let learned = mesh.curl(&server, &["http://127.0.0.1:4191/protocols"])?;
    assert!(
        learned.contains("\"destination\":\"port 3307\""),
        "{learned}"
    );
    // ... and still serves mesh TLS on it: the meshed client keeps its greeting over mTLS.
    assert_eq!(greetings(&mesh, &client, "10.96.0.30:3307", 2)?.len(), 2);

    // A declared opaque port (3306), unmeshed clients: no timer looks for a ClientHello (a mesh
    // peer would have come by the mesh port), the greeting decides at once. Each from a new
    // address, so nothing learned about one client helps the next.
    mesh.net.start_app(
        &server,
        "mysql",
        &[
            "banner",
            "--listen",
            "0.0.0.0:3306",
            "--text",
            "MARIADB-GREETING",
        ],
    )?;
    let mut firsts = Vec::new();
    for name in ["outsider-a", "outsider-b"] {
        let outsider = mesh.net.pod(name)?;
        firsts.extend(greetings(
            &mesh,
            &outsider,
            &format!("{}:3306", server.ip),
            1,
        )?);
    }
    println!(
        "unmeshed clients' first connection to an opaque port, time to greeting (ms): {firsts:?}"
    );
    assert!(
        firsts.iter().copied().fold(f64::MAX, f64::min) < 40.0,
        "a first connection from an unmeshed client waited for a ClientHello: {firsts:?} ms"
    );
    // The meshed client reaches it over mTLS by the mesh port.
    greetings(&mesh, &client, &format!("{}:3306", server.ip), 1)?;
    let sm = mesh.metrics(&server)?;
    assert_eq!(
        metric(
            &sm,
            "strait_tcp_open_total",
            &["direction=\"inbound\"", "target=\"3306\""]
        ),
        Some(3.0),
        "{sm}"
    );

    // A port only a Service declares opaque (the pod says nothing): the control plane tells
    // the serving proxy, which does no detection there inbound either, so there is nothing to
    // learn about it.
    mesh.net.start_app(
        &server,
        "db2",
        &[
            "banner",
            "--listen",
            "0.0.0.0:3308",
            "--text",
            "MARIADB-GREETING",
        ],
    )?;
    let mut declared = ServiceDef::new("db2", "10.96.0.41", 3308, 3308, &[&server]);
    declared.opaque = true;
    mesh.config.service(&declared)?;
    let outsider_c = mesh.net.pod("outsider-c")?;
    // The new inbound policy reaches the server's proxy within the control plane's rescan
    // (100 ms here) and a push.
    std::thread::sleep(Duration::from_millis(1000));
    let first = greetings(&mesh, &outsider_c, &format!("{}:3308", server.ip), 1)?;
    println!(
        "unmeshed client's first connection to a Service-declared opaque port (ms): {first:?}"
    );
    let learned = mesh.curl(&server, &["http://127.0.0.1:4191/protocols"])?;
    assert!(
        !learned.contains("\"destination\":\"port 3308\""),
        "a declared opaque port was detected (and learned) instead: {learned}"
    );

    // A peer cannot use the mesh port to reach the proxy's own ports: a Service that sends
    // the client's proxy to the server's port 4143 makes it send a header naming 4143, which
    // is refused and closed unanswered.
    mesh.config.service(&ServiceDef::new(
        "loop",
        "10.96.0.40",
        4143,
        4143,
        &[&server],
    ))?;
    mesh.eventually(Duration::from_secs(10), || {
        let sm = mesh.metrics(&server)?;
        let _ = mesh.net.exec(
            &client,
            &[
                "python3",
                "-c",
                "import socket\ns = socket.create_connection(('10.96.0.40', 4143), timeout=2)\ns.sendall(b'hello')\ns.settimeout(2)\nprint('read', s.recv(100))",
            ],
        );
        Ok(metric(
            &sm,
            "strait_inbound_refused_total",
            &["reason=\"proxy port\"", "target=\"4143\""],
        )
        .is_some())
    })?;

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
