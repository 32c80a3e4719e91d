//! Certificates and trust anchors rotate under steady traffic without losing a request.

use std::time::Duration;

use strait_e2e::{metric, Mesh};
use strait_testbed::{Pod, SidecarOpts};

fn mesh_with_server(tag: &str) -> anyhow::Result<(Mesh, Pod, Pod)> {
    let mesh = Mesh::with_identity(tag, "20s")?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    let client = mesh.pod_as("client", "frontend", &SidecarOpts::default())?;
    Ok((mesh, server, client))
}

fn renewals(mesh: &Mesh, pod: &Pod) -> anyhow::Result<f64> {
    Ok(metric(
        &mesh.metrics(pod)?,
        "strait_identity_certify_total",
        &["result=\"ok\""],
    )
    .unwrap_or(0.0))
}

#[test]
fn certificates_living_20s_rotate_under_2_minutes_of_traffic_without_a_lost_request(
) -> anyhow::Result<()> {
    // Two minutes of load by design: a longer deadline than the testbed's default, still well
    // inside this test's runner timeout (.config/nextest.toml).
    std::env::set_var("STRAIT_TEST_DEADLINE", "190s");
    let (mesh, server, client) = mesh_with_server("rotate")?;
    let load = mesh.load(&client, "http://10.96.0.10/", 120)?;
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(160))?;
    assert!(sent >= 2300, "sent {sent}");
    assert_eq!(ok, sent, "every request must succeed through the rotations");
    // 120 s at a renewal every 14 s (70% of 20 s): at least 8 certificates each.
    for pod in [&client, &server] {
        let n = renewals(&mesh, pod)?;
        assert!(n >= 8.0, "{} renewed only {n} times", pod.name);
    }
    // Renewals leave the mTLS control channel alone: the destination's stream was opened
    // once, and stayed open through every new certificate.
    let log = std::fs::read_to_string(mesh.net.dir.join("client-proxy.log"))?;
    assert_eq!(
        log.matches("discovery stream open target=10.96.0.10:80")
            .count(),
        1,
        "the discovery stream reconnected during renewals"
    );
    Ok(())
}

#[test]
fn trust_anchors_rotate_without_a_failed_request() -> anyhow::Result<()> {
    let (mesh, server, client) = mesh_with_server("anchors")?;
    let ca = mesh.ca.clone().expect("identity mesh");
    let old_anchor = std::fs::read_to_string(&ca.anchor_cert)?;
    let load = mesh.load(&client, "http://10.96.0.10/", 55)?;
    std::thread::sleep(Duration::from_secs(3));

    // 1. Trust both roots.
    let new = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(86400 * 365),
        Duration::from_secs(86400),
    )?;
    std::fs::write(&ca.anchors, format!("{old_anchor}{}", new.anchor_cert_pem))?;
    std::thread::sleep(Duration::from_secs(3));

    // 2. Move the issuer to the new root (key first; the control plane refuses a mismatched pair).
    let (cert, key) = strait_identity::ca::issue_issuer(
        &new.anchor_cert_pem,
        &new.anchor_key_pem,
        "cluster.local",
        Duration::from_secs(86400 * 30),
    )?;
    let before = (renewals(&mesh, &client)?, renewals(&mesh, &server)?);
    std::fs::write(&ca.issuer_key, key)?;
    std::fs::write(&ca.issuer_cert, cert)?;
    mesh.net.wait_log(
        &mesh.control_plane,
        "issuer reloaded",
        Duration::from_secs(5),
    )?;
    // Every proxy renews from the new issuer (at 70% of 20 s).
    mesh.eventually(Duration::from_secs(30), || {
        Ok(renewals(&mesh, &client)? >= before.0 + 2.0
            && renewals(&mesh, &server)? >= before.1 + 2.0)
    })?;

    // 3. Remove the old root.
    std::fs::write(&ca.anchors, &new.anchor_cert_pem)?;
    std::thread::sleep(Duration::from_secs(3));

    // A new pod makes only new connections, trusting only the new root: it gets its certificate
    // and reaches the server.
    let late = mesh.pod_as("late", "late", &SidecarOpts::default())?;
    assert_eq!(
        mesh.curl(&late, &["http://10.96.0.10/"])?.trim(),
        "hello from server"
    );

    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(90))?;
    assert!(sent >= 1000, "sent {sent}");
    assert_eq!(ok, sent, "no request may fail during the anchor rotation");
    Ok(())
}
