//! AuthorizationPolicy: which identities may reach a workload, enforced by its inbound proxy.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::SidecarOpts;

/// Holds one TCP connection to the echo service, sending a line every 100 ms; prints `open`
/// once echoed, then `closed after <s>` (seconds since the first echo) when the connection is
/// closed under it. Gives up after 20 s.
const HOLD_TCP: &str = r#"
import socket, sys, time
s = socket.create_connection(("10.96.0.31", 7000), timeout=5)
s.sendall(b"PING\n")
assert s.recv(64).startswith(b"PING"), "no echo"
print("open", flush=True)
start = time.time()
while time.time() - start < 20:
    time.sleep(0.1)
    try:
        s.sendall(b"PING\n")
        if not s.recv(64):
            break
    except OSError:
        break
else:
    sys.exit("still open after 20 s")
print("closed after %.3f" % (time.time() - start), flush=True)
"#;

fn policy(namespaces: &str) -> String {
    format!(
        "apiVersion: policy.strait.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: web-clients, namespace: default}}\n\
         spec:\n  targetRef: {{kind: ServiceAccount, name: web}}\n  allow:\n  - namespaces: [{namespaces}]\n"
    )
}

#[test]
fn a_policy_allowing_namespace_a_lets_a_in_and_keeps_b_out() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("authz", "24h")?;
    mesh.config.write("policy.yaml", &policy("a"))?;
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
        "echo",
        "10.96.0.31",
        7000,
        7000,
        &[&server],
    ))?;
    let client_a = mesh.pod_in("client-a", "a", "client", &SidecarOpts::default())?;
    let client_b = mesh.pod_in("client-b", "b", "client", &SidecarOpts::default())?;

    assert_eq!(
        mesh.curl(&client_a, &["http://10.96.0.10/"])?.trim(),
        "hello from server"
    );
    let out = mesh.curl(&client_b, &["-i", "http://10.96.0.10/"])?;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // The caller learns it was refused, not by which policy (the server's log says).
    assert!(
        out.contains("strait-proxy-error: forbidden by the destination's inbound policy"),
        "{out}"
    );
    assert!(
        !out.contains("web-clients"),
        "no policy name in the answer: {out}"
    );
    let server_log = mesh.net.logs();
    assert!(
        server_log.contains(
            "spiffe://cluster.local/ns/b/sa/client is not authorized: policies default/web-clients"
        ),
        "the log keeps the details:\n{server_log}"
    );
    // Opaque TCP: the connection is closed for B, served for A.
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();
    let tcp = |pod| {
        mesh.net.try_exec(
            pod,
            &[
                &bin,
                "tcp-client",
                "--addr",
                "10.96.0.31:7000",
                "--send",
                "PING",
            ],
        )
    };
    assert!(tcp(&client_a)?.1.contains("reply=PING"));
    let (_, out, _) = tcp(&client_b)?;
    assert!(
        !out.contains("reply=PING"),
        "B's connection must be closed unanswered: {out}"
    );
    // Refusals are counted with the client's identity.
    let m = mesh.metrics(&server)?;
    let b = "client_id=\"spiffe://cluster.local/ns/b/sa/client\"";
    assert_eq!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"unauthorized\"", "target=\"8080\"", b]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"unauthorized\"", "target=\"7000\"", b]
        ),
        Some(1.0),
        "{m}"
    );

    // An open TCP connection of A is closed within a second of a policy that revokes it.
    let script = mesh.net.dir.join("hold.py");
    std::fs::write(&script, HOLD_TCP)?;
    let hold = mesh
        .net
        .spawn(&client_a, "hold", &["python3", &script.to_string_lossy()])?;
    mesh.net.wait_log(&hold, "open", Duration::from_secs(10))?;
    mesh.config.write("policy.yaml", &policy("c"))?;
    let revoked = std::time::Instant::now();
    assert!(
        mesh.net.wait(&hold, Duration::from_secs(10))?,
        "{}",
        mesh.net.output(&hold)
    );
    let out = mesh.net.output(&hold);
    let closed_after: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("closed after "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(f64::MAX);
    eprintln!(
        "A's TCP connection was closed {closed_after:.2}s after the policy change ({:?} for the test)",
        revoked.elapsed()
    );
    assert!(closed_after < 2.0, "{out}");
    let m = mesh.metrics(&server)?;
    assert_eq!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"revoked\"", "target=\"7000\""]
        ),
        Some(1.0),
        "{m}"
    );

    // A policy change applies within a second, on the connections already open.
    mesh.config.write("policy.yaml", &policy("a, b"))?;
    let took = mesh.eventually(Duration::from_secs(2), || {
        Ok(mesh.curl(&client_b, &["http://10.96.0.10/"])?.trim() == "hello from server")
    })?;
    assert!(
        took < Duration::from_millis(1500),
        "policy update took {took:?}"
    );
    Ok(())
}
