//! Traffic policy through the mesh: SMI TrafficSplit and Gateway API HTTPRoute weights and
//! matches, missing backends, request timeouts, and latency-aware balancing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strait_e2e::{served_by, Mesh, ServiceDef};
use strait_testbed::{Pod, SidecarOpts};

/// `n` sequential requests on one connection (curl URL globbing), with extra curl arguments.
fn requests(
    mesh: &Mesh,
    pod: &Pod,
    ip: &str,
    n: usize,
    extra: &[&str],
) -> anyhow::Result<HashMap<String, usize>> {
    let url = format!("http://{ip}/?n=[1-{n}]");
    let mut args: Vec<&str> = extra.to_vec();
    args.push(&url);
    Ok(served_by(&mesh.curl(pod, &args)?))
}

/// v1 and v2 pods, services `<root>` (-> v1), `<root>-v1`, `<root>-v2`, and a client.
fn canary_mesh(tag: &str, root: &str, ip: &str) -> anyhow::Result<(Mesh, Pod)> {
    let mesh = Mesh::new(tag)?;
    let v1 = mesh.meshed_pod("v1")?;
    let v2 = mesh.meshed_pod("v2")?;
    for pod in [&v1, &v2] {
        mesh.net.start_app(
            pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", &pod.name],
        )?;
    }
    let octets: Vec<&str> = ip.split('.').collect();
    let other = |n: u8| {
        format!(
            "{}.{}.{}.{}",
            octets[0],
            octets[1],
            octets[2],
            octets[3].parse::<u8>().unwrap_or(0) + n
        )
    };
    mesh.config
        .service(&ServiceDef::new(root, ip, 80, 8080, &[&v1]))?;
    mesh.config.service(&ServiceDef::new(
        &format!("{root}-v1"),
        &other(1),
        80,
        8080,
        &[&v1],
    ))?;
    mesh.config.service(&ServiceDef::new(
        &format!("{root}-v2"),
        &other(2),
        80,
        8080,
        &[&v2],
    ))?;
    let client = mesh.meshed_pod("client")?;
    Ok((mesh, client))
}

fn traffic_split(root: &str, w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: {root}-split, namespace: default}}\n\
         spec:\n  service: {root}.default.svc.cluster.local\n  backends:\n  - {{service: {root}-v1, weight: {w1}}}\n  - {{service: {root}-v2, weight: {w2}}}\n"
    )
}

fn http_route(root: &str, w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {root}-route, namespace: default}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {root}, port: 80}}]\n  rules:\n\
         \x20 - backendRefs: [{{name: {root}-v1, port: 80, weight: {w1}}}, {{name: {root}-v2, port: 80, weight: {w2}}}]\n"
    )
}

fn assert_split(counts: &HashMap<String, usize>, total: usize, v1_share: f64) {
    let v1 = counts.get("v1").copied().unwrap_or(0) as f64 / total as f64;
    assert_eq!(counts.values().sum::<usize>(), total, "{counts:?}");
    assert!(
        (v1 - v1_share).abs() <= 0.03,
        "v1 got {:.3}, expected {v1_share} within 3 points: {counts:?}",
        v1
    );
}

fn split_and_shift(tag: &str, doc: fn(&str, u32, u32) -> String) -> anyhow::Result<()> {
    let (mesh, client) = canary_mesh(tag, "web", "10.96.0.10")?;
    mesh.config.write("split.yaml", &doc("web", 80, 20))?;
    std::thread::sleep(Duration::from_millis(500));
    assert_split(
        &requests(&mesh, &client, "10.96.0.10", 2000, &[])?,
        2000,
        0.8,
    );
    // Shift the weights: traffic follows within 2 s.
    mesh.config.write("split.yaml", &doc("web", 20, 80))?;
    let took = mesh.eventually(Duration::from_secs(2), || {
        let c = requests(&mesh, &client, "10.96.0.10", 50, &[])?;
        Ok(c.get("v2").copied().unwrap_or(0) > 30)
    })?;
    eprintln!("{tag}: weights moved traffic {took:?} after the change");
    assert_split(
        &requests(&mesh, &client, "10.96.0.10", 2000, &[])?,
        2000,
        0.2,
    );
    Ok(())
}

#[test]
fn a_trafficsplit_80_20_holds_within_3_points_and_follows_weight_changes() -> anyhow::Result<()> {
    split_and_shift("smisplit", traffic_split)
}

#[test]
fn an_httproute_80_20_holds_within_3_points_and_follows_weight_changes() -> anyhow::Result<()> {
    split_and_shift("gwsplit", http_route)
}

#[test]
fn a_header_match_routes_to_the_canary_only_and_a_missing_backend_gets_500() -> anyhow::Result<()> {
    let (mesh, client) = canary_mesh("hdrmatch", "web", "10.96.0.10")?;
    mesh.config.write(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: canary, namespace: default}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n\
         \x20 - matches: [{headers: [{name: x-canary, value: \"1\"}]}]\n    backendRefs: [{name: web-v2, port: 80}]\n\
         \x20   filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed-by, value: canary}]}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /ghost}}]\n    backendRefs: [{name: does-not-exist, port: 80}]\n\
         \x20 - backendRefs: [{name: web-v1, port: 80}]\n",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let canary = requests(&mesh, &client, "10.96.0.10", 100, &["-H", "x-canary: 1"])?;
    assert_eq!(canary.get("v2"), Some(&100), "{canary:?}");
    let stable = requests(&mesh, &client, "10.96.0.10", 100, &["-H", "x-canary: 0"])?;
    assert_eq!(stable.get("v1"), Some(&100), "{stable:?}");
    let headers = mesh.curl(&client, &["-H", "x-canary: 1", "http://10.96.0.10/headers"])?;
    assert!(
        headers.contains("x-routed-by: canary"),
        "RequestHeaderModifier: {headers}"
    );
    let out = mesh.curl(&client, &["-i", "http://10.96.0.10/ghost"])?;
    assert!(out.starts_with("HTTP/1.1 500"), "{out}");
    assert!(
        out.contains("Strait-Proxy-Error: no backend:") && out.contains("does not exist"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_200ms_route_timeout_answers_504_against_a_2s_backend() -> anyhow::Result<()> {
    let (mesh, client) = canary_mesh("timeout", "web", "10.96.0.10")?;
    mesh.config.write(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: slow, namespace: default}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n\
         \x20 - backendRefs: [{name: web-v1, port: 80}]\n    timeouts: {request: 200ms}\n",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        mesh.curl(&client, &["http://10.96.0.10/"])?.trim(),
        "hello from v1"
    );
    let start = Instant::now();
    let out = mesh.curl(&client, &["-i", "http://10.96.0.10/delay/2000"])?;
    let took = start.elapsed();
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(
        out.contains("Strait-Proxy-Error: no response within the timeout of 200ms"),
        "{out}"
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
        "504 after {took:?}"
    );
    Ok(())
}

#[test]
fn an_endpoint_50ms_slower_receives_clearly_less_traffic() -> anyhow::Result<()> {
    let mesh = Mesh::new("slowep")?;
    let mut pods = Vec::new();
    for (name, delay) in [("fast1", "0"), ("fast2", "0"), ("slow", "50")] {
        let pod = mesh.meshed_pod(name)?;
        mesh.net.start_app(
            &pod,
            "app",
            &[
                "http",
                "--listen",
                "0.0.0.0:8080",
                "--name",
                name,
                "--delay-ms",
                delay,
            ],
        )?;
        pods.push(pod);
    }
    let all: Vec<_> = pods.iter().collect();
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all))?;
    let client = mesh.meshed_pod("client")?;
    let counts = requests(&mesh, &client, "10.96.0.10", 300, &[])?;
    let slow = counts.get("slow").copied().unwrap_or(0);
    // The two fast endpoints are equal, so how they split their share is noise (on a loaded
    // machine one can get 170 and the other 100): the slow one is compared with their mean.
    let fast =
        (counts.get("fast1").copied().unwrap_or(0) + counts.get("fast2").copied().unwrap_or(0)) / 2;
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    assert!(
        slow * 5 < fast,
        "the slow endpoint must get clearly less than a fast one: {counts:?}"
    );
    Ok(())
}

/// The takeover seen against a real API server, in local mode: an HTTPRoute in namespace
/// `plain` naming `default/web` as its parent changes what `plain`'s clients reach, and nobody
/// else's; its status (a consumer route) is in the control plane's log.
#[test]
fn a_route_in_another_namespace_cannot_take_over_a_service_for_other_clients() -> anyhow::Result<()>
{
    let mesh = Mesh::with_identity("gamma", "24h")?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;
    let evil = mesh.pod_in("evil", "plain", "evil", &SidecarOpts::default())?;
    mesh.net.start_app(
        &evil,
        "http",
        &["http", "--listen", "0.0.0.0:8080", "--name", "evil"],
    )?;
    let mut evil_svc = ServiceDef::new("evil", "10.96.0.40", 80, 8080, &[&evil]);
    evil_svc.namespace = "plain".into();
    evil_svc.service_account = "evil".into();
    mesh.config.service(&evil_svc)?;
    mesh.config.write(
        "takeover.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: takeover, namespace: plain}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, namespace: default, port: 80}]\n\
         \x20 rules: [{backendRefs: [{name: evil, port: 80}]}]\n",
    )?;
    let client = mesh.pod_in("client", "default", "frontend", &SidecarOpts::default())?;
    let insider = mesh.pod_in("insider", "plain", "frontend", &SidecarOpts::default())?;
    // The route's own namespace follows it ...
    mesh.eventually(Duration::from_secs(10), || {
        Ok(mesh
            .curl(&insider, &["http://10.96.0.10/"])
            .is_ok_and(|o| o.contains("hello from evil")))
    })?;
    // ... every other client still reaches the service.
    for _ in 0..10 {
        let out = mesh.curl(&client, &["http://10.96.0.10/"])?;
        assert!(out.contains("hello from server"), "{out}");
    }
    let logs = mesh.net.output(&mesh.control_plane);
    assert!(
        logs.contains("plain/takeover") && logs.contains("clients in namespace plain only"),
        "route status in the log:\n{logs}"
    );
    Ok(())
}
