//! Per-route authorization and local rate limits, enforced by the server's proxy: an
//! AuthorizationPolicy about `/admin` lets only the ops namespace in while the port's policy
//! lets both namespaces reach the rest; an HTTPLocalRateLimitPolicy holds a client to its rate
//! over a bounded load (429 with Retry-After past it), with an override for another identity.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::SidecarOpts;

const POLICIES: &str = r#"apiVersion: policy.strait.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: admin-only, namespace: default}
spec:
  targetRef: {kind: ServiceAccount, name: web}
  port: 8080
  routes: [{path: {type: PathPrefix, value: /admin}}]
  allow: [{namespaces: [ops]}]
---
apiVersion: policy.strait.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: clients, namespace: default}
spec:
  targetRef: {kind: ServiceAccount, name: web}
  port: 8080
  allow: [{namespaces: [a, ops]}]
---
apiVersion: policy.strait.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: limited, namespace: default}
spec:
  targetRef: {kind: ServiceAccount, name: web}
  port: 8080
  routes: [{path: {type: PathPrefix, value: /limited}}]
  identity: {requestsPerSecond: 10}
  overrides:
  - requestsPerSecond: 1000
    clientRefs: [{kind: ServiceAccount, name: client, namespace: ops}]
"#;

#[test]
fn route_policies_and_rate_limits_hold_at_the_server() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("routepol", "24h")?;
    mesh.config.write("policy.yaml", POLICIES)?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.net.start_app(
        &server,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client_a = mesh.pod_in("client-a", "a", "client", &SidecarOpts::default())?;
    let ops = mesh.pod_in("client-ops", "ops", "client", &SidecarOpts::default())?;
    let status = |pod, path: &str| -> anyhow::Result<String> {
        let url = format!("http://10.96.0.10{path}");
        Ok(mesh
            .curl(pod, &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])?
            .trim()
            .to_string())
    };

    // The port's policy lets both in; the /admin route's policy only ops.
    assert_eq!(status(&client_a, "/")?, "200");
    assert_eq!(status(&ops, "/")?, "200");
    assert_eq!(status(&client_a, "/admin/users")?, "403");
    assert_eq!(status(&ops, "/admin/users")?, "200");
    let m = mesh.metrics(&server)?;
    assert_eq!(
        metric(
            &m,
            "strait_inbound_refused_total",
            &[
                "reason=\"route unauthorized\"",
                "client_id=\"spiffe://cluster.local/ns/a/sa/client\""
            ]
        ),
        Some(1.0),
        "{m}"
    );

    // 20 req/s for 4 s against a limit of 10/s with a second's burst: about 10 + 4 x 10 pass.
    let load = mesh.load(&client_a, "http://10.96.0.10/limited", 4)?;
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(20))?;
    assert!((76..=82).contains(&sent), "sent {sent}");
    assert!(
        (44..=56).contains(&ok),
        "{ok} of {sent} within the limit (50 expected)"
    );
    // Past the limit (15 at once against a bucket of 10): 429 with Retry-After.
    let out = mesh.curl(&client_a, &["-si", "http://10.96.0.10/limited?n=[1-15]"])?;
    let refused = out.matches("HTTP/1.1 429").count();
    assert!(refused >= 5, "{refused} of 15 refused: {out}");
    assert_eq!(out.matches("HTTP/1.1 200").count() + refused, 15, "{out}");
    let retry_after: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("retry-after: ")
                .or(l.strip_prefix("Retry-After: "))
        })
        .map(str::trim)
        .collect();
    assert_eq!(retry_after.len(), refused, "{out}");
    assert!(retry_after.iter().all(|v| *v == "1"), "{out}");
    // Other routes are not limited; ops has its own, larger bucket.
    assert_eq!(status(&client_a, "/")?, "200");
    let out = mesh.curl(
        &ops,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "http://10.96.0.10/limited?n=[1-30]",
        ],
    )?;
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 30, "{out}");
    let m = mesh.metrics(&server)?;
    let limited = metric(
        &m,
        "strait_inbound_refused_total",
        &["reason=\"rate limited\""],
    )
    .unwrap_or(0.0);
    assert!(
        limited >= 24.0,
        "rate-limited requests are counted: {limited}\n{m}"
    );
    Ok(())
}
