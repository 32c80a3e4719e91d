//! OpenTelemetry tracing and access logs: a request carrying the application's trace context
//! crosses two proxies; an OTLP collector receives both hops' spans, linked into that trace, and
//! the application sees the inbound hop as its parent. A collector that is down costs spans,
//! never requests.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;
use strait_e2e::{metric, Mesh};
use strait_testbed::{Pod, Proc, SidecarOpts};

const COLLECTOR: &str = "10.88.0.1:4317";

/// The spans the collector printed so far.
fn collected(mesh: &Mesh, collector: &Proc) -> Vec<Value> {
    mesh.net
        .output(collector)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn spans_of(mesh: &Mesh, collector: &Proc, trace: &str, n: usize) -> Result<Vec<Value>> {
    let mut found = Vec::new();
    mesh.eventually(Duration::from_secs(10), || {
        found = collected(mesh, collector)
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect();
        Ok(found.len() >= n)
    })
    .with_context(|| format!("{n} spans of trace {trace}: got {found:?}"))?;
    Ok(found)
}

fn by_kind(spans: &[Value], kind: i64) -> &Value {
    spans
        .iter()
        .find(|s| s["kind"] == kind)
        .unwrap_or_else(|| panic!("a span of kind {kind} in {spans:?}"))
}

/// The value of header `name` in the text of the app's `/headers`.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// A mesh with identity where client and server proxies send spans to `collector` and write
/// access logs.
fn setup(tag: &str, collector: &str, extra: &[(&str, &str)]) -> Result<(Mesh, Pod, Pod)> {
    let mesh = Mesh::with_identity(tag, "24h")?;
    let url = format!("http://{collector}");
    let mut env = vec![
        ("STRAIT_TRACE_COLLECTOR", url.as_str()),
        ("STRAIT_ACCESS_LOG", "json"),
    ];
    env.extend_from_slice(extra);
    let opts = SidecarOpts {
        env: env.clone(),
        ..Default::default()
    };
    let server = mesh.pod_as("server", "web", &opts)?;
    mesh.serve_web(&server)?;
    let client = mesh.pod_in("client", "a", "client", &opts)?;
    Ok((mesh, client, server))
}

#[test]
fn a_traced_request_gets_a_client_and_a_server_span_linked_into_the_apps_trace() -> Result<()> {
    let bin = strait_testbed::bin("strait-testapp")?;
    let (mesh, client, server) = setup("trace", COLLECTOR, &[])?;
    let collector = mesh.net.spawn_in(
        &mesh.net.bridge_ns,
        "collector",
        None,
        &[
            &bin.to_string_lossy(),
            "otlp-collector",
            "--listen",
            COLLECTOR,
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&collector, "listening on", Duration::from_secs(10))?;

    // W3C trace context from the client application.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let seen = mesh.curl(
        &client,
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{app_span}-01"),
            "-H",
            "tracestate: vendor=kept",
            "http://10.96.0.10/headers",
        ],
    )?;
    let spans = spans_of(&mesh, &collector, trace, 2)?;
    let outbound = by_kind(&spans, 3); // CLIENT
    let inbound = by_kind(&spans, 2); // SERVER
    assert_eq!(outbound["parent_span_id"], app_span, "{spans:?}");
    assert_eq!(inbound["parent_span_id"], outbound["span_id"], "{spans:?}");
    // The application continues the trace under the inbound hop.
    let inbound_id = inbound["span_id"].as_str().unwrap_or_default();
    assert_eq!(
        header(&seen, "traceparent"),
        Some(format!("00-{trace}-{inbound_id}-01").as_str()),
        "{seen}"
    );
    assert_eq!(header(&seen, "tracestate"), Some("vendor=kept"), "{seen}");
    // The latency histogram carries the sampled request's trace as an exemplar (OpenMetrics).
    let om = mesh.curl(
        &client,
        &[
            "-H",
            "Accept: application/openmetrics-text; version=1.0.0",
            "http://127.0.0.1:4191/metrics",
        ],
    )?;
    assert!(
        om.lines()
            .any(|l| l.starts_with("strait_response_latency_seconds_bucket")
                && l.contains(&format!("# {{trace_id=\"{trace}\"}}"))),
        "{om}"
    );
    // What the proxies tell each other stays between them.
    assert!(
        !seen.contains("strait-dst-service") && !seen.contains("strait-src-workload"),
        "{seen}"
    );
    for (span, pod) in [(outbound, "client"), (inbound, "server")] {
        let a = &span["attributes"];
        assert_eq!(span["name"], "GET", "{span}");
        assert_eq!(a["http.request.method"], "GET", "{span}");
        assert_eq!(a["url.path"], "/headers", "{span}");
        assert_eq!(a["http.response.status_code"], "200", "{span}");
        assert_eq!(
            a["strait.client.id"], "spiffe://cluster.local/ns/a/sa/client",
            "{span}"
        );
        assert_eq!(
            a["strait.server.id"], "spiffe://cluster.local/ns/default/sa/web",
            "{span}"
        );
        assert_eq!(a["strait.tls"], "true", "{span}");
        // Each workload is its own service: `<pod>.<namespace>` in local mode.
        let name = format!("{pod}.default");
        assert_eq!(span["resource"]["service.name"], name, "{span}");
        assert_eq!(span["resource"]["k8s.pod.name"], pod, "{span}");
    }
    assert_eq!(outbound["attributes"]["server.address"], "10.96.0.10");
    // No port in the authority: the port the connection was made to.
    assert_eq!(outbound["attributes"]["server.port"], "80", "{outbound}");
    assert_eq!(inbound["attributes"]["server.port"], "8080", "{inbound}");

    // The server proxy's access log has the request, with the trace.
    let log = std::fs::read_to_string(mesh.net.dir.join("server-proxy.log"))?;
    let entry: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["trace_id"] == trace)
        .with_context(|| format!("an access log line of trace {trace} in {log}"))?;
    assert_eq!(entry["direction"], "inbound");
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/headers");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["classification"], "success");
    assert_eq!(entry["client_id"], "spiffe://cluster.local/ns/a/sa/client");
    assert_eq!(entry["span_id"], inbound["span_id"]);
    assert_eq!(entry["response_bytes"].as_u64(), Some(seen.len() as u64));
    // Integer microseconds; who asked and where it went; one request id for every hop and the
    // application (given by the client's proxy: the request had none).
    assert!(entry["duration_us"].is_u64(), "{entry}");
    assert!(
        entry["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{}:", client.ip))),
        "{entry}"
    );
    assert_eq!(
        entry["upstream"].as_str(),
        Some(format!("{}:8080", server.ip).as_str()),
        "{entry}"
    );
    let id = entry["request_id"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 36, "{entry}");
    assert_eq!(header(&seen, "x-request-id"), Some(id), "{seen}");
    let client_log = std::fs::read_to_string(mesh.net.dir.join("client-proxy.log"))?;
    let outbound_entry: Value = client_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["trace_id"] == trace)
        .with_context(|| format!("the client proxy's line of trace {trace}"))?;
    assert_eq!(outbound_entry["request_id"], id, "{outbound_entry}");
    assert_eq!(
        outbound_entry["upstream"].as_str(),
        Some(format!("{}:8080", server.ip).as_str()),
        "{outbound_entry}"
    );

    // Secrets in the query are not logged (the default list), the rest is.
    mesh.curl(
        &client,
        &["http://10.96.0.10/headers?page=2&X-Amz-Signature=s3cr3t&access_token=t0k3n"],
    )?;
    mesh.eventually(Duration::from_secs(5), || {
        let log = std::fs::read_to_string(mesh.net.dir.join("server-proxy.log"))?;
        Ok(log.contains(
            "\"path\":\"/headers?page=2&X-Amz-Signature=REDACTED&access_token=REDACTED\"",
        ))
    })?;
    for log in ["server-proxy.log", "client-proxy.log"] {
        let text = std::fs::read_to_string(mesh.net.dir.join(log))?;
        assert!(!text.contains("s3cr3t") && !text.contains("t0k3n"), "{log}");
    }

    // B3 single header: continued, and answered in B3 as well.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let seen = mesh.curl(
        &client,
        &[
            "-H",
            &format!("b3: {b3_trace}-e457b5a2e4d86bd1-1"),
            "http://10.96.0.10/headers",
        ],
    )?;
    let spans = spans_of(&mesh, &collector, b3_trace, 2)?;
    let inbound = by_kind(&spans, 2);
    let inbound_id = inbound["span_id"].as_str().unwrap_or_default();
    assert_eq!(
        by_kind(&spans, 3)["parent_span_id"],
        "e457b5a2e4d86bd1",
        "{spans:?}"
    );
    let b3 = header(&seen, "b3").unwrap_or_default();
    assert!(
        b3.starts_with(&format!("{b3_trace}-{inbound_id}-1")),
        "{seen}"
    );

    // The parent said "not sampled": no span, and the header reaches the app untouched.
    let quiet = "11111111111111111111111111111111";
    let unsampled = format!("00-{quiet}-2222222222222222-00");
    let seen = mesh.curl(
        &client,
        &[
            "-H",
            &format!("traceparent: {unsampled}"),
            "http://10.96.0.10/headers",
        ],
    )?;
    assert_eq!(header(&seen, "traceparent"), Some(unsampled.as_str()));
    // A sampled request sent after it is exported; the unsampled one never is.
    let after = "33333333333333333333333333333333";
    mesh.curl(
        &client,
        &[
            "-H",
            &format!("traceparent: 00-{after}-4444444444444444-01"),
            "http://10.96.0.10/",
        ],
    )?;
    spans_of(&mesh, &collector, after, 2)?;
    assert!(
        collected(&mesh, &collector)
            .iter()
            .all(|s| s["trace_id"] != quiet),
        "an unsampled trace was exported"
    );

    // Semantic conventions: a 4xx is an error of the CLIENT span (`error.type` the status),
    // not of the SERVER span; a method outside the standard ones is `_OTHER`, its span named
    // `HTTP`, the method kept in `http.request.method_original`.
    let odd = "55555555555555555555555555555555";
    mesh.curl(
        &client,
        &[
            "-X",
            "PURGE",
            "-H",
            &format!("traceparent: 00-{odd}-6666666666666666-01"),
            "http://10.96.0.10/status/404",
        ],
    )?;
    let spans = spans_of(&mesh, &collector, odd, 2)?;
    let (out, inb) = (by_kind(&spans, 3), by_kind(&spans, 2));
    assert_eq!(out["status_code"], 2, "{out}");
    assert_eq!(out["attributes"]["error.type"], "404", "{out}");
    assert_eq!(inb["status_code"], 0, "{inb}");
    assert!(inb["attributes"].get("error.type").is_none(), "{inb}");
    for span in [out, inb] {
        assert_eq!(span["name"], "HTTP", "{span}");
        assert_eq!(
            span["attributes"]["http.request.method"], "_OTHER",
            "{span}"
        );
        assert_eq!(
            span["attributes"]["http.request.method_original"], "PURGE",
            "{span}"
        );
    }

    // With an HTTPRoute, the CLIENT span is named `{method} {route}`.
    mesh.config.write(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-route, namespace: default}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n\
         \x20 - backendRefs: [{name: web, port: 80}]\n",
    )?;
    let routed = "77777777777777777777777777777777";
    let mut out = Value::Null;
    mesh.eventually(Duration::from_secs(10), || {
        mesh.curl(
            &client,
            &[
                "-H",
                &format!("traceparent: 00-{routed}-8888888888888888-01"),
                "http://10.96.0.10/",
            ],
        )?;
        let spans = spans_of(&mesh, &collector, routed, 2)?;
        out = spans
            .iter()
            .rev()
            .find(|s| s["kind"] == 3)
            .cloned()
            .unwrap_or_default();
        Ok(out["name"] == "GET httproute default/web-route#0")
    })
    .with_context(|| format!("{out}"))?;

    let m = mesh.metrics(&server)?;
    assert!(
        metric(&m, "strait_trace_spans_exported_total", &[]).unwrap_or(0.0) >= 3.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn with_the_collector_down_every_request_succeeds_and_spans_are_dropped_and_counted() -> Result<()>
{
    // 10.88.0.254 is on the bridge but nobody has it: connections to it get no answer at all.
    let (mesh, client, _server) = setup(
        "trace-down",
        "10.88.0.254:4317",
        &[
            ("STRAIT_TRACE_SAMPLE_RATIO", "1"),
            ("STRAIT_TRACE_QUEUE_SIZE", "16"),
        ],
    )?;
    let load = mesh.load(&client, "http://10.96.0.10/", 3)?;
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(20))?;
    assert!(sent >= 50, "the load ran: sent={sent}");
    assert_eq!(ok, sent, "every request succeeds with the collector down");
    let m = mesh.metrics(&client)?;
    let dropped = metric(
        &m,
        "strait_trace_spans_dropped_total",
        &["reason=\"queue_full\""],
    )
    .unwrap_or(0.0);
    // The first spans wait in the stalled export and the queue holds 16: the rest are dropped.
    assert!(
        dropped > 0.0,
        "spans beyond the queue are dropped and counted\n{m}"
    );
    assert_eq!(
        metric(&m, "strait_trace_spans_exported_total", &[]),
        Some(0.0),
        "{m}"
    );
    Ok(())
}

#[test]
fn the_control_plane_traces_certificate_issuance_with_its_token_check_and_discovery_pushes(
) -> Result<()> {
    let bin = strait_testbed::bin("strait-testapp")?;
    let mesh = Mesh::with_identity("cp-trace", "24h")?;
    let collector = mesh.net.spawn_in(
        &mesh.net.bridge_ns,
        "collector",
        None,
        &[
            &bin.to_string_lossy(),
            "otlp-collector",
            "--listen",
            "10.88.0.1:4319",
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&collector, "listening on", Duration::from_secs(10))?;
    let mesh = mesh.with_control_plane_args(&["--trace-collector", "http://10.88.0.1:4319"])?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod("client")?;
    assert!(mesh
        .curl(&client, &["http://10.96.0.10/"])?
        .contains("hello"));

    let mut spans = Vec::new();
    mesh.eventually(Duration::from_secs(10), || {
        spans = collected(&mesh, &collector);
        let named = |n: &str| spans.iter().filter(|s| s["name"] == n).count();
        let destination_push = spans
            .iter()
            .any(|s| s["name"] == "discovery push" && s["attributes"]["kind"] == "destination");
        Ok(named("certify") >= 2 && named("token lookup") >= 2 && destination_push)
    })
    .with_context(|| format!("control-plane spans: {spans:?}"))?;
    // Each issuance is a trace of its own, the token check its child.
    let certify: Vec<&Value> = spans.iter().filter(|s| s["name"] == "certify").collect();
    for c in &certify {
        assert_eq!(c["resource"]["service.name"], "strait-control-plane", "{c}");
        assert_eq!(c["attributes"]["result"], "issued", "{c}");
        assert!(
            spans.iter().any(|t| t["name"] == "token lookup"
                && t["parent_span_id"] == c["span_id"]
                && t["trace_id"] == c["trace_id"]),
            "no token check under {c}: {spans:?}"
        );
    }
    assert!(certify.iter().any(|c| c["attributes"]["asked"]
        .as_str()
        .is_some_and(|a| a.ends_with("/sa/web"))));
    let push = spans
        .iter()
        .find(|s| s["name"] == "discovery push" && s["attributes"]["kind"] == "destination")
        .with_context(|| format!("{spans:?}"))?;
    assert_eq!(push["attributes"]["destination"], "10.96.0.10:80", "{push}");
    // Counted on its /metrics.
    mesh.eventually(Duration::from_secs(5), || {
        let m = mesh.curl(&server, &["http://10.88.0.1:9990/metrics"])?;
        Ok(
            strait_e2e::metric(&m, "strait_control_plane_trace_spans_exported_total", &[])
                .unwrap_or(0.0)
                >= 3.0,
        )
    })?;
    Ok(())
}
