//! AuthorizationPolicy: which identities may reach a workload, enforced by its inbound proxy.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::SidecarOpts;

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
        out.contains("Strait-Proxy-Error: forbidden by the destination's inbound policy"),
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
    let hold = mesh.hold_tcp(&client_a, "10.96.0.31:7000")?;
    mesh.config.write("policy.yaml", &policy("c"))?;
    let revoked = std::time::Instant::now();
    let closed_after = mesh.held_tcp_closed(&hold, Duration::from_secs(10))?;
    eprintln!(
        "A's TCP connection was closed {closed_after:.2?} after the policy change ({:?} for the test)",
        revoked.elapsed()
    );
    assert!(closed_after < Duration::from_secs(2), "{closed_after:?}");
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
