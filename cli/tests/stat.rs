//! `strait stat` against a Kubernetes API server (a fake one answering with captured shapes):
//! it lists the meshed, running pods and reads each proxy through the API server's pod proxy.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::{fake_api, write_kubeconfig};
use serde_json::{json, Value};

fn pod(name: &str, phase: &str, sidecar: bool) -> Value {
    let mut containers = vec![json!({"name": "app", "image": "app"})];
    let mut init = vec![];
    if sidecar {
        // The native sidecar: an init container that keeps running.
        init.push(json!({"name": "strait-proxy", "image": "strait", "restartPolicy": "Always"}));
    } else {
        containers.push(json!({"name": "other", "image": "x"}));
    }
    json!({"metadata": {"name": name, "namespace": "shop"},
           "spec": {"containers": containers, "initContainers": init},
           "status": {"phase": phase}})
}

const BEFORE: &str = r#"strait_response_total{direction="outbound",target="web:80",classification="success"} 10
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80"} 0
strait_response_latency_seconds_bucket{le="0.002",direction="outbound",target="web:80"} 10
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80"} 10
# EOF
"#;
const AFTER: &str = r#"strait_response_total{direction="outbound",target="web:80",classification="success"} 28
strait_response_total{direction="outbound",target="web:80",classification="failure"} 2
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80"} 10
strait_response_latency_seconds_bucket{le="0.002",direction="outbound",target="web:80"} 30
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80"} 30
# EOF
"#;

#[test]
fn stat_reads_every_running_meshed_pod_through_the_api_server() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let list = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
        "items": [pod("web-1", "Running", true), pod("web-2", "Pending", true), pod("legacy", "Running", false)]});
    let metrics = "/api/v1/namespaces/shop/pods/web-1:4191/proxy/metrics";
    let bodies = HashMap::from([
        (
            "/api/v1/namespaces/shop/pods".to_string(),
            vec![list.to_string()],
        ),
        (
            metrics.to_string(),
            vec![BEFORE.to_string(), AFTER.to_string()],
        ),
    ]);
    let (addr, calls) = runtime.block_on(fake_api(bodies));
    let dir = std::env::temp_dir().join(format!("strait-cli-stat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, addr);
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["stat", "-n", "shop", "--interval", "1s", "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("strait stat");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    let web = &rows[0];
    assert_eq!(web["name"], "web:80", "{rows}");
    // 20 responses over a bit more than the 1 s interval.
    let rps = web["rps"].as_f64().expect("rps");
    assert!(rps > 10.0 && rps <= 20.0, "{rows}");
    assert_eq!(web["success_rate"], 0.9, "{rows}");
    assert!(
        web["p99_ms"].as_f64().is_some_and(|v| v > 1.0 && v <= 2.0),
        "{rows}"
    );
    // Only the running meshed pod was read, twice.
    assert_eq!(calls[metrics].load(Ordering::SeqCst), 2);

    // Not a mesh: no meshed pod is an error that says so.
    let (addr, _) = runtime.block_on(fake_api(HashMap::from([(
        "/api/v1/namespaces/shop/pods".to_string(),
        vec![json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod("legacy", "Running", false)]}).to_string()],
    )])));
    write_kubeconfig(&kubeconfig, addr);
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["stat", "-n", "shop", "--interval", "1s"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("strait stat");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no meshed pods found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
