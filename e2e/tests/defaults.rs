//! Secure defaults: authorization that fails closed (default policies at the namespace and pod
//! levels, no allow-all before the first policy) and no plaintext to a cluster destination that
//! discovery could not vouch for.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::{Pod, SidecarOpts};

/// The status code of `GET url` from `pod` ("000" when the connection was closed unanswered).
fn status(mesh: &Mesh, pod: &Pod, url: &str) -> anyhow::Result<String> {
    let (_, out, _) = mesh.net.try_exec(
        pod,
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ],
    )?;
    Ok(out.trim().to_string())
}

fn namespace(name: &str, default: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, annotations: {{strait.io/default-inbound-policy: {default}}}}}\n"
    )
}

#[test]
fn default_policies_of_the_namespace_and_the_pod_decide_unselected_ports() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("defaults", "24h")?;
    mesh.config
        .write("ns.yaml", &namespace("shop", "all-authenticated"))?;
    let server = mesh.pod_in("server", "shop", "web", &SidecarOpts::default())?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    // The same namespace, but the pod's own default lets everyone in.
    let open = mesh.pod_in(
        "open",
        "shop",
        "open",
        &SidecarOpts {
            env: vec![("STRAIT_DEFAULT_INBOUND_POLICY", "all-unauthenticated")],
            ..Default::default()
        },
    )?;
    mesh.net.start_app(
        &open,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "open"],
    )?;
    let mut svc = ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]);
    svc.namespace = "shop".into();
    svc.service_account = "web".into();
    mesh.config.service(&svc)?;
    let client = mesh.pod_in("client", "shop", "client", &SidecarOpts::default())?;
    let plain = mesh.net.pod("plain")?; // no sidecar, no identity

    let server_url = format!("http://{}:8080/", server.ip);
    let open_url = format!("http://{}:8080/", open.ip);
    // all-authenticated (the namespace's): a mesh identity gets in, plaintext does not.
    assert_eq!(status(&mesh, &client, "http://10.96.0.10/")?, "200");
    assert_eq!(status(&mesh, &plain, &server_url)?, "403");
    // all-unauthenticated (the pod's own): plaintext gets in.
    assert_eq!(status(&mesh, &plain, &open_url)?, "200");

    // The namespace turns to deny: within a second or two, nobody reaches the server.
    mesh.config.write("ns.yaml", &namespace("shop", "deny"))?;
    mesh.eventually(Duration::from_secs(3), || {
        Ok(status(&mesh, &client, "http://10.96.0.10/")? == "403")
    })?;
    assert_eq!(status(&mesh, &plain, &server_url)?, "403");
    assert_eq!(
        status(&mesh, &plain, &open_url)?,
        "200",
        "the pod's default wins"
    );
    let m = mesh.metrics(&server)?;
    assert!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"default policy\""]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );

    // The control plane goes away: the last policy keeps being enforced.
    mesh.net
        .kill(&mesh.control_plane, nix::sys::signal::Signal::SIGKILL)?;
    assert_eq!(status(&mesh, &client, "http://10.96.0.10/")?, "403");
    assert_eq!(status(&mesh, &plain, &server_url)?, "403");
    Ok(())
}

#[test]
fn a_proxy_that_never_got_its_policy_refuses_inbound() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("nopolicy", "24h")?;
    // Its certificate comes from the identity API; its policy never comes (discovery is not
    // where it looks).
    let server = mesh.pod_as(
        "server",
        "web",
        &SidecarOpts {
            env: vec![
                ("STRAIT_CONTROL_PLANE_ADDR", "10.88.0.1:9"),
                ("STRAIT_DISCOVERY_TIMEOUT", "300ms"),
            ],
            ..Default::default()
        },
    )?;
    mesh.serve_web(&server)?;
    let client = mesh.pod_as("client", "client", &SidecarOpts::default())?;
    let plain = mesh.net.pod("plain")?;
    let out = mesh.curl(&client, &["-s", "-i", "http://10.96.0.10/"])?;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("the destination has no inbound policy yet"),
        "{out}"
    );
    assert_eq!(
        status(&mesh, &plain, &format!("http://{}:8080/", server.ip))?,
        "403"
    );
    let m = mesh.metrics(&server)?;
    assert!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &["reason=\"policy pending\""]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn with_discovery_down_a_cluster_destination_is_refused_not_sent_in_plaintext() -> anyhow::Result<()>
{
    let mesh = Mesh::new("cpdown")?;
    let outside = mesh.net.pod("outside")?;
    mesh.net.start_app(
        &outside,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "outside"],
    )?;
    // Discovery never answers this proxy; the cluster is 10.96.0.0/12 here, so the pods'
    // 10.88.0.0/16 is outside it.
    let client = mesh.meshed_pod_with(
        "client",
        &SidecarOpts {
            env: vec![
                ("STRAIT_CONTROL_PLANE_ADDR", "10.88.0.1:9"),
                ("STRAIT_DISCOVERY_TIMEOUT", "300ms"),
                ("STRAIT_CLUSTER_NETWORKS", "10.96.0.0/12"),
            ],
            ..Default::default()
        },
    )?;
    let out = mesh.curl(&client, &["-s", "-i", "http://10.96.0.50/"])?;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("discovery has not answered"), "{out}");
    // Outside the cluster networks: passed through as before.
    let out = mesh.curl(&client, &[&format!("http://{}:8080/", outside.ip)])?;
    assert_eq!(out.trim(), "hello from outside");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_discovery_unavailable_total", &[]),
        Some(1.0),
        "{m}"
    );
    Ok(())
}
