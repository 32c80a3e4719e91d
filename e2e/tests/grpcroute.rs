//! GRPCRoute through the mesh with a real tonic client and servers: a method match and
//! weights, a service match that leaves other methods alone, and retries of UNAVAILABLE from a
//! flaky replica by the route's gRPC status codes.

use std::collections::HashMap;
use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::Pod;

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo
  namespace: default
  annotations: {strait.io/retry-grpc-codes: "14", strait.io/retry-attempts: "4"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 9000}]
  rules:
  - matches: [{method: {service: strait.test.v1.Echo, method: Unary}}]
    backendRefs:
    - {name: echo-v1, port: 9000, weight: 3}
    - {name: echo-flaky, port: 9000, weight: 1}
  - matches: [{method: {service: strait.test.v1.Echo}}]
    backendRefs: [{name: echo-v1, port: 9000}]
"#;

fn grpc(mesh: &Mesh, client: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();
    let mut cmd = vec![
        bin.as_ref(),
        "grpc-client",
        "--addr",
        "http://10.96.0.20:9000",
    ];
    cmd.extend_from_slice(args);
    mesh.net.exec(client, &cmd)
}

/// `ok served_by=<name>` lines by name, and the other lines.
fn served(out: &str) -> (HashMap<String, usize>, Vec<&str>) {
    let mut by = HashMap::new();
    let mut other = Vec::new();
    for line in out.lines() {
        match line
            .strip_prefix("ok served_by=")
            .and_then(|r| r.split_whitespace().next())
        {
            Some(name) => *by.entry(name.to_string()).or_default() += 1,
            None => other.push(line),
        }
    }
    (by, other)
}

#[test]
fn a_grpcroute_splits_a_method_and_retries_unavailable_by_status_code() -> anyhow::Result<()> {
    let mesh = Mesh::new("grpcroute")?;
    let v1 = mesh.meshed_pod("v1")?;
    let flaky = mesh.meshed_pod("flaky")?;
    let v2 = mesh.meshed_pod("v2")?;
    mesh.net.start_app(
        &v1,
        "grpc",
        &["grpc", "--listen", "0.0.0.0:9000", "--name", "v1"],
    )?;
    mesh.net.start_app(
        &v2,
        "grpc",
        &["grpc", "--listen", "0.0.0.0:9000", "--name", "v2"],
    )?;
    mesh.net.start_app(
        &flaky,
        "grpc",
        &[
            "grpc",
            "--listen",
            "0.0.0.0:9000",
            "--name",
            "flaky",
            "--fail-ratio",
            "0.3",
        ],
    )?;
    for (name, ip, pod) in [
        ("echo", "10.96.0.20", &v2),
        ("echo-v1", "10.96.0.21", &v1),
        ("echo-flaky", "10.96.0.22", &flaky),
    ] {
        mesh.config
            .service(&ServiceDef::new(name, ip, 9000, 9000, &[pod]))?;
    }
    let client = mesh.meshed_pod("client")?;
    // Before the route, every call goes to the service's own endpoint (v2).
    let (by, _) = served(&grpc(&mesh, &client, &["unary", "--repeat", "5"])?);
    assert_eq!(by.get("v2"), Some(&5), "{by:?}");
    mesh.config.write("route.yaml", ROUTE)?;
    mesh.eventually(Duration::from_secs(5), || {
        let (by, _) = served(&grpc(&mesh, &client, &["unary", "--repeat", "4"])?);
        Ok(!by.contains_key("v2"))
    })?;

    // Unary: 3:1 between v1 and the flaky replica, whose UNAVAILABLE answers are retried.
    let n = 400;
    let out = grpc(&mesh, &client, &["unary", "--repeat", &n.to_string()])?;
    let (by, other) = served(&out);
    let ok: usize = by.values().sum();
    assert!(
        ok >= n * 995 / 1000,
        "{ok}/{n} succeeded with retries: {by:?} {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(by.get("v2"), None, "the route took every call: {by:?}");
    let v1_share = by.get("v1").copied().unwrap_or(0) as f64 / ok as f64;
    // First attempts split 3:1; a retry picks a backend again, so some of the flaky
    // replica's failures end up answered by v1 (about 0.75 + 0.25 x 0.3 x 0.75 = 0.81).
    assert!(
        (0.72..=0.88).contains(&v1_share),
        "v1 got {v1_share:.3} of {by:?}"
    );
    let m = mesh.metrics(&client)?;
    let retries = metric(&m, "strait_retry_total", &[]).unwrap_or(0.0);
    assert!(
        retries >= 10.0,
        "the flaky replica's failures were retried: {retries}\n{m}"
    );

    // Another method of the service: the service match, to v1 only; streaming works.
    let out = grpc(&mesh, &client, &["stream", "--count", "50"])?;
    assert!(
        out.contains("received=50") && out.contains("status code=0"),
        "{out}"
    );
    // A bidirectional stream on a route with retries is not held back to buffer its body:
    // each message reaches the server as it is sent (a reply comes before the next).
    let out = grpc(&mesh, &client, &["chat", "--count", "20"])?;
    assert!(out.contains("chatted=20"), "{out}");
    // A failure the route does not retry (NOT_FOUND) comes back as it is.
    let out = grpc(&mesh, &client, &["unary", "--fail-code", "5"])?;
    assert!(out.contains("status code=5"), "{out}");
    Ok(())
}
