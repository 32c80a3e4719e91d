//! A real Prometheus scrapes a mesh with the scrape configuration `strait install` ships (its
//! relabelling fed the labels Kubernetes discovery would give); PromQL returns the traffic the
//! test sent, and every query of the shipped Grafana dashboards is valid and returns data.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use strait_e2e::{Mesh, ServiceDef};
use strait_testbed::{Pod, SidecarOpts};

const PROMETHEUS: &str = "10.88.0.1:9090";
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The shipped configuration, its Kubernetes discovery replaced by static targets carrying the
/// same `__meta_kubernetes_*` labels, scraping every second.
fn prometheus_config(pods: &[(&Pod, &str)], decoy: &Pod) -> Result<Value> {
    let text = std::fs::read_to_string(Path::new(REPO).join("install/prometheus/prometheus.yml"))?;
    let mut config: Value = serde_yaml_ng::from_str(&text)?;
    config["global"]["scrape_interval"] = json!("1s");
    let jobs = config["scrape_configs"]
        .as_array_mut()
        .context("scrape_configs")?;
    for job in jobs.iter_mut() {
        let job = job.as_object_mut().context("a job")?;
        job.remove("kubernetes_sd_configs").context("discovery")?;
        let targets = match job["job_name"].as_str() {
            Some("strait-proxies") => {
                let mut targets: Vec<Value> = pods
                    .iter()
                    .map(|(pod, ns)| {
                        json!({"targets": [format!("{}:4191", pod.ip)], "labels": {
                            "__meta_kubernetes_pod_container_name": "strait-proxy",
                            "__meta_kubernetes_pod_container_port_name": "strait-admin",
                            "__meta_kubernetes_namespace": ns,
                            "__meta_kubernetes_pod_name": pod.name,
                        }})
                    })
                    .collect();
                // The application's own port: the relabelling must drop it.
                targets.push(
                    json!({"targets": [format!("{}:8080", decoy.ip)], "labels": {
                        "__meta_kubernetes_pod_container_name": "app",
                        "__meta_kubernetes_pod_container_port_name": "http",
                        "__meta_kubernetes_namespace": "default",
                        "__meta_kubernetes_pod_name": decoy.name,
                    }}),
                );
                targets
            }
            Some("strait-control-plane") => vec![json!({"targets": ["10.88.0.1:9990"], "labels": {
                "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "strait",
                "__meta_kubernetes_pod_label_app_kubernetes_io_component": "control-plane",
                "__meta_kubernetes_pod_container_port_name": "admin",
                "__meta_kubernetes_pod_name": "strait-control-plane-0",
            }})],
            other => bail!("unexpected job {other:?}"),
        };
        job.insert("static_configs".into(), Value::Array(targets));
    }
    Ok(config)
}

/// Runs `query` on the Prometheus; returns its result vector.
fn query(mesh: &Mesh, q: &str) -> Result<Vec<Value>> {
    let out = mesh.net.exec_in(
        &mesh.net.bridge_ns,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{PROMETHEUS}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ],
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("{q}: {out}"))?;
    if v["status"] != "success" {
        bail!("{q}: {out}");
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The single value of `q`, if it has exactly one.
fn scalar(mesh: &Mesh, q: &str) -> Result<Option<f64>> {
    let r = query(mesh, q)?;
    Ok(match r.as_slice() {
        [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
        _ => None,
    })
}

/// Every PromQL expression of the shipped dashboards, with Grafana's variables filled in.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(Path::new(REPO).join("install/grafana"))? {
        let path = entry?.path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        for panel in d["panels"].as_array().context("panels")? {
            for target in panel["targets"].as_array().context("targets")? {
                let expr = target["expr"].as_str().context("expr")?;
                let filled = expr
                    .replace("$__rate_interval", "30s")
                    .replace("$target", ".*")
                    .replace("$port", ".*");
                let name = format!("{} / {}", d["title"], panel["title"]);
                out.push((name, filled));
            }
        }
    }
    Ok(out)
}

#[test]
fn prometheus_scrapes_the_proxies_and_every_dashboard_query_returns_data() -> Result<()> {
    let mesh = Mesh::with_identity("prom", "24h")?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    mesh.net.start_app(
        &server,
        "grpc",
        &["grpc", "--listen", "0.0.0.0:9000", "--name", "grpcserver"],
    )?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.20",
        9000,
        9000,
        &[&server],
    ))?;
    // Tracing to a port nobody listens on, every request sampled: dropped spans are counted.
    let client = mesh.pod_in(
        "client",
        "a",
        "client",
        &SidecarOpts {
            env: vec![
                ("STRAIT_TRACE_COLLECTOR", "http://10.88.0.1:4399"),
                ("STRAIT_TRACE_SAMPLE_RATIO", "1"),
                ("STRAIT_TRACE_QUEUE_SIZE", "4"),
            ],
            ..Default::default()
        },
    )?;

    let config = prometheus_config(&[(&client, "a"), (&server, "default")], &server)?;
    let config_file = mesh.net.dir.join("prometheus.yml");
    std::fs::write(&config_file, serde_json::to_string_pretty(&config)?)?;
    let config_path = config_file.to_string_lossy();
    let check = std::process::Command::new("promtool")
        .args(["check", "config", &config_path])
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout) + String::from_utf8_lossy(&check.stderr)
    );
    let data = mesh.net.dir.join("prometheus-data");
    let prometheus = mesh.net.spawn_in(
        &mesh.net.bridge_ns,
        "prometheus",
        None,
        &[
            "prometheus",
            &format!("--config.file={config_path}"),
            &format!("--storage.tsdb.path={}", data.to_string_lossy()),
            &format!("--web.listen-address={PROMETHEUS}"),
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&prometheus, "Server is ready", Duration::from_secs(30))?;

    // 40 successes and 10 failures over HTTP, 3 OK and 1 NOT_FOUND over gRPC.
    let mut urls = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
    // Interleaved: never enough failures in a row to eject the endpoint.
    for _ in 0..10 {
        urls.extend(std::iter::repeat_n("http://10.96.0.10/", 4));
        urls.push("http://10.96.0.10/status/500");
    }
    let codes = mesh.curl(&client, &urls)?;
    assert_eq!(codes.lines().filter(|c| *c == "200").count(), 40, "{codes}");
    let bin = strait_testbed::bin("strait-testapp")?;
    let bin = bin.to_string_lossy();
    for fail in ["0", "0", "0", "5"] {
        mesh.net.exec(
            &client,
            &[
                &bin,
                "grpc-client",
                "--addr",
                "http://10.96.0.20:9000",
                "unary",
                "--fail-code",
                fail,
            ],
        )?;
    }

    let web = "direction=\"outbound\",target=~\"web.*\"";
    let total = format!("sum(strait_response_total{{{web}}})");
    mesh.eventually(Duration::from_secs(15), || {
        Ok(scalar(&mesh, &total)? == Some(50.0))
    })
    .with_context(|| format!("{total}: {:?}", query(&mesh, &total)))?;
    let success = format!(
        "sum(strait_response_total{{{web},classification=\"success\"}}) / sum(strait_response_total{{{web}}})"
    );
    assert_eq!(scalar(&mesh, &success)?, Some(0.8));
    // The same requests, seen by the server's proxy, labelled by the relabelling.
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_response_total{direction=\"inbound\",namespace=\"default\",pod=\"server\",status_code=\"500\",client_id=\"spiffe://cluster.local/ns/a/sa/client\"})"
        )?,
        Some(10.0)
    );
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_response_total{direction=\"outbound\",target=~\"echo.*\",grpc_status=\"5\"})"
        )?,
        Some(1.0)
    );
    // Labels in the shape users query: the destination service, namespace and workload on
    // both sides (the proxies tell each other over mTLS), the client's workload and namespace.
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_response_total{direction=\"outbound\",dst_namespace=\"default\",dst_service=\"web\",dst_workload=\"server\",src_namespace=\"default\",src_workload=\"client\"})"
        )?,
        Some(50.0)
    );
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_response_total{direction=\"inbound\",dst_namespace=\"default\",dst_service=\"web\",dst_workload=\"server\",src_namespace=\"default\",src_workload=\"client\",status_code=\"500\"})"
        )?,
        Some(10.0)
    );
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_response_size_bytes_count{direction=\"inbound\",dst_service=\"web\"})"
        )?,
        Some(50.0)
    );
    assert_eq!(
        scalar(
            &mesh,
            "sum(strait_request_size_bytes_count{direction=\"outbound\",dst_service=\"web\"})"
        )?,
        Some(50.0)
    );
    // What the server's proxy tells the client's stays between them (after the counts above).
    let head = mesh.curl(
        &client,
        &["-s", "-D", "-", "-o", "/dev/null", "http://10.96.0.10/"],
    )?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("strait-"), "{head}");
    // Two proxies and the control plane are scraped; the application's port is not.
    assert_eq!(
        scalar(&mesh, "count(up{job=\"strait-proxies\"} == 1)")?,
        Some(2.0)
    );
    mesh.eventually(Duration::from_secs(5), || {
        Ok(scalar(&mesh, "sum(strait_control_plane_connected_proxies)")? == Some(2.0))
    })
    .with_context(|| format!("{:?}", query(&mesh, "up")))?;

    // Rates need two samples inside their window.
    std::thread::sleep(Duration::from_secs(3));
    let queries = dashboard_queries()?;
    assert!(queries.len() >= 25, "{queries:?}");
    // promtool checks each expression's syntax, as recording rules.
    let rules = json!({"groups": [{"name": "dashboards", "rules": queries.iter().enumerate()
        .map(|(i, (_, q))| json!({"record": format!("strait:dashboard_query_{i}"), "expr": q}))
        .collect::<Vec<_>>()}]});
    let rules_file = mesh.net.dir.join("dashboard-rules.yml");
    std::fs::write(&rules_file, serde_json::to_string(&rules)?)?;
    let check = std::process::Command::new("promtool")
        .args(["check", "rules", &rules_file.to_string_lossy()])
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout) + String::from_utf8_lossy(&check.stderr)
    );
    let empty: Vec<&(String, String)> = queries
        .iter()
        .filter(|(_, q)| query(&mesh, q).map_or(true, |r| r.is_empty()))
        .collect();
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
    // Every binary's /metrics passes `promtool check metrics` as a plain scrape (text 0.0.4,
    // after traffic: every family present), and offers OpenMetrics to a scraper that asks.
    let control_plane = "http://10.88.0.1:9990/metrics".to_string();
    for url in ["http://127.0.0.1:4191/metrics".to_string(), control_plane] {
        let body = mesh.curl(&client, &[&url])?;
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        check
            .stdin
            .take()
            .map(|mut s| std::io::Write::write_all(&mut s, body.as_bytes()))
            .transpose()?;
        let out = check.wait_with_output()?;
        assert!(
            out.status.success(),
            "promtool check metrics {url}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let negotiated = mesh.curl(
            &client,
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{content_type}",
                "-H",
                "Accept: application/openmetrics-text; version=1.0.0",
                &url,
            ],
        )?;
        assert!(
            negotiated.starts_with("application/openmetrics-text"),
            "{url}: {negotiated}"
        );
    }
    Ok(())
}
