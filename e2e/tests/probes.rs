//! Kubelet probes of a strict pod. Kubelet speaks plaintext from outside the mesh, which a
//! strict pod refuses; `strait inject` moves the application's probes to the proxy's admin
//! port, and the proxy probes the application from inside the pod.

use std::process::{Command, Stdio};

use serde_json::Value;
use strait_e2e::Mesh;
use strait_testbed::{Pod, SidecarOpts};

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  serviceAccountName: web
  containers:
  - name: app
    image: example/web:1
    ports: [{name: http, containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /headers, port: http, httpHeaders: [{name: X-Probe, value: kubelet}]}
      periodSeconds: 2
    livenessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {httpGet: {path: /status/503, port: 8080}}
  - name: db
    image: example/db:1
    readinessProbe: {tcpSocket: {port: 5432}, timeoutSeconds: 2}
"#;

/// Runs `strait inject` on `POD`: the application's probe paths, and the proxy's environment.
fn inject(mesh: &Mesh) -> anyhow::Result<(Vec<(String, String)>, Value)> {
    let file = mesh.net.dir.join("pod.yaml");
    std::fs::write(&file, POD)?;
    let out = Command::new(strait_testbed::bin("strait")?)
        .arg("inject")
        .arg(&file)
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: Value = serde_yaml_ng::from_slice(&out.stdout)?;
    let spec = &pod["spec"];
    let mut paths = Vec::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        for (field, probe) in c.as_object().into_iter().flatten() {
            if field.ends_with("Probe") {
                assert_eq!(probe["httpGet"]["port"], 4191, "{c}");
                assert!(probe.get("tcpSocket").is_none(), "{c}");
                let path = probe["httpGet"]["path"].as_str().unwrap_or_default();
                paths.push((
                    format!("{}/{field}", c["name"].as_str().unwrap_or_default()),
                    path.to_string(),
                ));
            }
        }
    }
    let proxy = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "strait-proxy")
        .expect("an injected proxy");
    Ok((paths, proxy["env"].clone()))
}

/// What kubelet would get: the status code of a GET from outside the pod.
fn probe(mesh: &Mesh, kubelet: &Pod, url: &str) -> anyhow::Result<String> {
    let (_, out, _) = mesh.net.try_exec(
        kubelet,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            url,
        ],
    )?;
    Ok(out)
}

#[test]
fn a_strict_pods_probes_reach_the_app_through_the_proxy_and_report_its_health() -> anyhow::Result<()>
{
    let mesh = Mesh::with_identity("probes", "24h")?;
    let (mut paths, env) = inject(&mesh)?;
    paths.sort();
    let expected: Vec<(String, String)> = [
        ("app/livenessProbe", "/app-health/app/liveness"),
        ("app/readinessProbe", "/app-health/app/readiness"),
        ("app/startupProbe", "/app-health/app/startup"),
        ("db/readinessProbe", "/app-health/db/readiness"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(paths, expected);
    let probes = env
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "STRAIT_APP_PROBES")
        .and_then(|e| e["value"].as_str())
        .expect("STRAIT_APP_PROBES")
        .to_string();

    let web = mesh.pod_as(
        "web",
        "web",
        &SidecarOpts {
            env: vec![
                ("STRAIT_INBOUND_MODE", "strict"),
                ("STRAIT_APP_PROBES", &probes),
            ],
            ..Default::default()
        },
    )?;
    // Bound to the pod's IP only, as many servers are: the proxy must probe that address, and
    // its connection must not be redirected into its own (strict) inbound listener.
    let listen = format!("{}:8080", web.ip);
    let app = mesh
        .net
        .start_app(&web, "app", &["http", "--listen", &listen, "--name", "web"])?;
    let kubelet = mesh.net.pod("kubelet")?;
    let admin = |path: &str| format!("http://{}:4191{path}", web.ip);

    // Without the rewrite kubelet's plaintext would be refused.
    assert_eq!(
        probe(&mesh, &kubelet, &format!("http://{}:8080/", web.ip))?,
        "000"
    );
    for (path, status) in [
        ("/app-health/app/readiness", "200"),
        ("/app-health/app/liveness", "200"),
        // The application's own failure is kubelet's verdict.
        ("/app-health/app/startup", "503"),
        // Nothing listens on the db port.
        ("/app-health/db/readiness", "503"),
        ("/app-health/app/other", "404"),
    ] {
        assert_eq!(probe(&mesh, &kubelet, &admin(path))?, status, "{path}");
    }

    // The application dies: its probes fail, the proxy's own stay healthy.
    mesh.net.kill(&app, nix::sys::signal::Signal::SIGKILL)?;
    for (path, status) in [
        ("/app-health/app/liveness", "503"),
        ("/app-health/app/readiness", "503"),
        ("/ready", "200"),
    ] {
        assert_eq!(probe(&mesh, &kubelet, &admin(path))?, status, "{path}");
    }
    Ok(())
}
