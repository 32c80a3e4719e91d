//! `strait stat` reads the proxies of a running mesh and shows the traffic a bounded load sends:
//! per service from the caller's proxy, per client identity from the server's.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;
use strait_e2e::Mesh;
use strait_testbed::SidecarOpts;

/// `strait stat` run in the bridge namespace (where every pod's admin port is reachable).
fn stat(mesh: &Mesh, args: &[&str]) -> Result<Vec<Value>> {
    let bin = strait_testbed::bin("strait")?;
    let bin = bin.to_string_lossy();
    let mut cmd = vec![bin.as_ref(), "stat", "--interval", "2s", "-o", "json"];
    cmd.extend_from_slice(args);
    let out = mesh.net.exec_in(&mesh.net.bridge_ns, &cmd)?;
    let rows: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    Ok(rows.as_array().cloned().unwrap_or_default())
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("a row {name} in {rows:?}"))
}

#[test]
fn stat_shows_each_services_rate_success_and_latency_from_the_proxies() -> Result<()> {
    let mesh = Mesh::with_identity("stat", "24h")?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    let client = mesh.pod_in("client", "a", "client", &SidecarOpts::default())?;
    // Warm the destination up, then a steady 20 requests per second for 12 s.
    mesh.curl(&client, &["http://10.96.0.10/"])?;
    let load = mesh.load(&client, "http://10.96.0.10/", 12)?;
    std::thread::sleep(Duration::from_secs(1));

    let client_admin = format!("{}:4191", client.ip);
    let server_admin = format!("{}:4191", server.ip);
    let rows = stat(&mesh, &["--proxy", &client_admin])?;
    let web = row(&rows, "web.default.svc.cluster.local:80");
    let rps = web["rps"].as_f64().unwrap_or(0.0);
    assert!((14.0..=26.0).contains(&rps), "about 20 req/s: {web}");
    assert_eq!(web["success_rate"], 1.0, "{web}");
    for q in ["p50_ms", "p95_ms", "p99_ms"] {
        assert!(web[q].as_f64().is_some_and(|v| v > 0.0), "{q}: {web}");
    }
    // The client's view by the workload that answered (the server's proxy says it over mTLS).
    let rows = stat(&mesh, &["--proxy", &client_admin, "--by", "dst-workload"])?;
    let w = row(&rows, "server");
    let rps = w["rps"].as_f64().unwrap_or(0.0);
    assert!((14.0..=26.0).contains(&rps), "{w}");
    // The server's view, by client identity; a dead proxy address is reported, not fatal.
    let rows = stat(
        &mesh,
        &[
            "--proxy",
            &server_admin,
            "--proxy",
            "10.88.0.254:4191",
            "--direction",
            "inbound",
            "--by",
            "client-id",
        ],
    )?;
    let a = row(&rows, "spiffe://cluster.local/ns/a/sa/client");
    let rps = a["rps"].as_f64().unwrap_or(0.0);
    assert!((14.0..=26.0).contains(&rps), "{a}");
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(20))?;
    assert_eq!(sent, ok);
    Ok(())
}
