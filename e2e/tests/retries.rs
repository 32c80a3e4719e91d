//! Retries: safe requests are retried on the route's codes, within the retry budget.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::Pod;

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: retries, namespace: default}\n\
spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n\
\x20 - backendRefs: [{name: web, port: 80}]\n    retry: {codes: [503], attempts: 5, backoff: 5ms}\n";

/// The client's proxy does not eject the failing endpoint (STRAIT_EJECT_AFTER=0), so the
/// retry budget alone is what limits retries (circuit breaking is tested in breaker.rs).
fn mesh_with_backend(tag: &str, fail_ratio: &str) -> anyhow::Result<(Mesh, Pod)> {
    let mesh = Mesh::new(tag)?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &[
            "http",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "server",
            "--fail-ratio",
            fail_ratio,
        ],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    mesh.config.write("route.yaml", ROUTE)?;
    let client = mesh.meshed_pod_with(
        "client",
        &strait_testbed::SidecarOpts {
            env: vec![("STRAIT_EJECT_AFTER", "0")],
            ..Default::default()
        },
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok((mesh, client))
}

fn retries(mesh: &Mesh, client: &Pod) -> anyhow::Result<(f64, f64)> {
    let m = mesh.metrics(client)?;
    Ok((
        metric(
            &m,
            "strait_retry_total",
            &["target=\"web.default.svc.cluster.local:80\""],
        )
        .unwrap_or(0.0),
        metric(
            &m,
            "strait_retry_budget_exhausted_total",
            &["target=\"web.default.svc.cluster.local:80\""],
        )
        .unwrap_or(0.0),
    ))
}

#[test]
fn retries_turn_a_backend_failing_30_percent_into_at_least_99_5_percent_success_within_the_budget(
) -> anyhow::Result<()> {
    let (mesh, client) = mesh_with_backend("retry30", "0.3")?;
    // Six tries each: a request fails with probability 0.3^6 = 0.07%. Over 600 requests the
    // 99.5% bar allows 3 failures, which happens with probability ~0.1% (over 300 it allowed
    // 1, and 2 came about 2% of the time: the flake this length removes).
    let run = mesh.load(&client, "http://10.96.0.10/", 30)?;
    let (sent, ok) = mesh.finish_load(&run, Duration::from_secs(75))?;
    assert!(sent >= 560, "sent {sent}");
    assert!(ok as f64 >= 0.995 * sent as f64, "{ok}/{sent} succeeded");
    let (retried, exhausted) = retries(&mesh, &client)?;
    // About 0.3/0.7 of the requests need a retry; the budget (20% + 10/s over 10 s) covers it.
    assert!(
        retried > 0.2 * sent as f64 && retried < 0.8 * sent as f64,
        "{retried} retries for {sent} requests"
    );
    assert_eq!(
        exhausted, 0.0,
        "the budget was not needed beyond its allowance"
    );
    Ok(())
}

#[test]
fn a_1mb_post_is_not_retried_a_get_is_and_a_dead_backend_is_capped_by_the_budget(
) -> anyhow::Result<()> {
    let (mesh, client) = mesh_with_backend("retrycap", "1.0")?;
    // A POST with a 1 MB body: not idempotent and too big to replay, so not retried.
    let body = mesh.net.dir.join("body");
    std::fs::write(&body, vec![b'x'; 1024 * 1024])?;
    let out = mesh.curl(
        &client,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--data-binary",
            &format!("@{}", body.display()),
            "http://10.96.0.10/",
        ],
    )?;
    assert_eq!(out, "503");
    assert_eq!(
        retries(&mesh, &client)?.0,
        0.0,
        "the POST must not be retried"
    );
    // A GET is retried up to the route's 5 attempts.
    let out = mesh.curl(
        &client,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://10.96.0.10/",
        ],
    )?;
    assert_eq!(out, "503");
    assert_eq!(
        retries(&mesh, &client)?.0,
        5.0,
        "the GET is retried 5 times"
    );

    // Every request fails: retries stop at the budget, not at 5 per request.
    let started = std::time::Instant::now();
    let run = mesh.load(&client, "http://10.96.0.10/", 8)?;
    let (sent, ok) = mesh.finish_load(&run, Duration::from_secs(60))?;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(ok, 0);
    let (retried, exhausted) = retries(&mesh, &client)?;
    // Budget: in any window of ten one-second buckets, at most the 10/s x 10 s reserve
    // plus 20% of the requests. The run touches at most elapsed + 1 buckets; every ten of
    // them can spend a fresh reserve (the first bucket, which spent it, expires). Plus the
    // GET's 5.
    let windows = ((elapsed + 1.0) / 10.0).ceil();
    let cap = 100.0 * windows + 0.2 * sent as f64 + 5.0;
    assert!(
        retried <= cap,
        "{retried} retries for {sent} requests in {elapsed:.1} s; the budget allows {cap:.0}"
    );
    assert!(
        retried < 5.0 * sent as f64 / 2.0,
        "without a budget there would be {} retries",
        5 * sent
    );
    assert!(exhausted > 0.0, "budget exhaustion is counted");
    Ok(())
}
