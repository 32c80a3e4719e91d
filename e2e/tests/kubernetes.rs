//! The Kubernetes pieces that run without a cluster: the injector binary serving real
//! AdmissionReviews over HTTPS, and a proxy started with exactly the environment the injector
//! gives a pod (with the kubelet's part, field references and `$(VAR)` expansion, done here).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use strait_e2e::{metric, Mesh, IDENTITY_ADDR};
use strait_injector::config::InjectConfig;
use strait_injector::inject::{plan, Decision};
use strait_testbed::SidecarOpts;

fn fixture(name: &str) -> String {
    format!(
        "{}/../testdata/k8s/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn the_injector_answers_admission_reviews_over_https_and_counts_them() -> anyhow::Result<()> {
    let mesh = Mesh::new("inject")?;
    let pod = mesh.net.pod("webhook")?;
    let dir = mesh.net.dir.join("webhook");
    std::fs::create_dir_all(&dir)?;
    let pki = strait_identity::ca::generate_serving(
        "test-webhook-ca",
        &["strait-injector.strait-system.svc".to_string()],
        Duration::from_secs(3600),
    )?;
    let ca = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )?;
    for (file, text) in [
        ("ca.crt", &pki.ca_cert_pem),
        ("tls.crt", &pki.cert_pem),
        ("tls.key", &pki.key_pem),
        ("anchors.pem", &ca.anchor_cert_pem),
    ] {
        std::fs::write(dir.join(file), text)?;
    }
    let path = |f: &str| dir.join(f).to_string_lossy().to_string();
    // The mesh's trace collector, which the injector also sends its own spans to.
    let testapp = strait_testbed::bin("strait-testapp")?;
    let collector = mesh.net.spawn_in(
        &pod.ns,
        "collector",
        None,
        &[
            &testapp.to_string_lossy(),
            "otlp-collector",
            "--listen",
            "127.0.0.1:4320",
        ],
        &[],
    )?;
    mesh.net
        .wait_log(&collector, "listening on", Duration::from_secs(10))?;
    let bin = strait_testbed::bin("strait-injector")?;
    let injector = mesh.net.spawn_in(
        &pod.ns,
        "injector",
        None,
        &[
            &bin.to_string_lossy(),
            "--tls-cert",
            &path("tls.crt"),
            "--tls-key",
            &path("tls.key"),
            "--trust-anchors",
            &path("anchors.pem"),
        ],
        &[
            ("STRAIT_LOG", "debug"),
            ("STRAIT_PROXY_TRACE_COLLECTOR", "http://127.0.0.1:4320"),
        ],
    )?;
    mesh.net
        .wait_log(&injector, "serving", Duration::from_secs(10))?;

    let post = |url_path: &str, file: &str| -> anyhow::Result<Value> {
        let out = mesh.net.exec(
            &pod,
            &[
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                &path("ca.crt"),
                "--resolve",
                "strait-injector.strait-system.svc:8443:127.0.0.1",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &format!("@{file}"),
                &format!("https://strait-injector.strait-system.svc:8443{url_path}?timeout=10s"),
            ],
        )?;
        Ok(serde_json::from_str(&out)?)
    };
    let review: Value = serde_json::from_str(&std::fs::read_to_string(fixture(
        "pod-create-apply-serviceaccount.json",
    ))?)?;
    let answer = post("/inject", &fixture("pod-create-apply-serviceaccount.json"))?;
    let response = &answer["response"];
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap_or_default())?;
    let ops: Vec<Value> = serde_json::from_slice(&patch)?;
    let init = ops
        .iter()
        .find(|op| op["path"] == "/spec/initContainers")
        .ok_or_else(|| anyhow::anyhow!("no initContainers in {ops:?}"))?;
    assert_eq!(init["value"][1]["name"], "strait-proxy");
    // The admission is a span of the injector's, with its outcome.
    let mut spans: Vec<Value> = Vec::new();
    mesh.eventually(Duration::from_secs(10), || {
        spans = mesh
            .net
            .output(&collector)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok(spans.iter().any(|s| s["name"] == "admission review"))
    })
    .map_err(|e| anyhow::anyhow!("{e}: {spans:?}"))?;
    let admission = spans
        .iter()
        .find(|s| s["name"] == "admission review")
        .ok_or_else(|| anyhow::anyhow!("{spans:?}"))?;
    assert_eq!(admission["resource"]["service.name"], "strait-injector");
    assert_eq!(admission["attributes"]["result"], "injected", "{admission}");
    assert_eq!(admission["attributes"]["path"], "/inject", "{admission}");

    // The opt-in path leaves an unannotated pod alone; hostNetwork pods are never injected.
    let answer = post(
        "/inject-opt-in",
        &fixture("pod-create-apply-serviceaccount.json"),
    )?;
    assert!(answer["response"].get("patch").is_none());
    let answer = post("/inject", &fixture("pod-create-hostnetwork.json"))?;
    assert!(answer["response"].get("patch").is_none());
    assert_eq!(answer["response"]["allowed"], true);

    // Garbage gets a 400, and the server keeps serving.
    let (ok, _, _) = mesh.net.try_exec(
        &pod,
        &[
            "curl",
            "-sS",
            "--fail",
            "--cacert",
            &path("ca.crt"),
            "--resolve",
            "strait-injector.strait-system.svc:8443:127.0.0.1",
            "--data-binary",
            "{not json",
            "https://strait-injector.strait-system.svc:8443/inject",
        ],
    )?;
    assert!(!ok, "garbage is refused");
    let metrics = mesh
        .net
        .exec(&pod, &["curl", "-sS", "http://127.0.0.1:9995/metrics"])?;
    let count = |result: &str| {
        metric(
            &metrics,
            "strait_injector_admission_requests_total",
            &[&format!("result=\"{result}\"")],
        )
    };
    assert_eq!(count("injected"), Some(1.0), "{metrics}");
    assert_eq!(count("skipped"), Some(2.0), "{metrics}");
    assert_eq!(count("error"), Some(1.0), "{metrics}");
    assert!(
        metrics.contains("strait_injector_admission_duration_seconds_count 4"),
        "{metrics}"
    );
    let ready = mesh
        .net
        .exec(&pod, &["curl", "-sS", "http://127.0.0.1:9995/ready"])?;
    assert_eq!(ready.trim(), "ready");
    Ok(())
}

/// The kubelet's part: field references from the pod, then `$(VAR)` from earlier variables.
fn resolve_env(container: &Value, pod: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("").to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some(path) => pod
                .pointer(&format!("/{}", path.replace('.', "/")))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            None => {
                let mut v = e["value"].as_str().unwrap_or("").to_string();
                for (k, val) in &out {
                    v = v.replace(&format!("$({k})"), val);
                }
                v
            }
        };
        out.push((name, value));
    }
    out
}

#[test]
fn a_proxy_with_the_injected_environment_gets_its_identity_and_speaks_mtls() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("injenv", "1h")?;
    let ca = mesh
        .ca
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a mesh with identity"))?;
    // Only namespace `shop` may call the server: a 200 proves the client's mTLS identity.
    mesh.config.write(
        "policy.yaml",
        "apiVersion: policy.strait.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: shop-only, namespace: default}\n\
         spec:\n  targetRef: {kind: ServiceAccount, name: web}\n  allow:\n  - namespaces: [shop]\n",
    )?;
    let server = mesh.pod_as("server", "web", &SidecarOpts::default())?;
    mesh.serve_web(&server)?;

    // The client pod as the API server would hand it to the kubelet after injection.
    let pod_json: Value = serde_json::json!({
        "metadata": {"name": "client", "namespace": "shop"},
        "spec": {"serviceAccountName": "shop-client", "containers": [{"name": "app", "image": "curl"}]}
    });
    let cfg = InjectConfig {
        trust_anchors: Some(ca.anchors.clone()),
        control_plane_addr: "10.88.0.1:8086".into(),
        identity_addr: IDENTITY_ADDR.into(),
        ..InjectConfig::defaults()
    };
    let Decision::Inject(ops) = plan(&pod_json, true, &cfg, cfg.read_anchors()?.as_deref())? else {
        anyhow::bail!("the pod must be injected");
    };
    let proxy = ops
        .iter()
        .flat_map(|op| match &op["value"] {
            Value::Array(items) => items.clone(),
            v => vec![v.clone()],
        })
        .find(|c| c["name"] == "strait-proxy")
        .ok_or_else(|| anyhow::anyhow!("no proxy container in {ops:?}"))?;
    let mut env: HashMap<String, String> = resolve_env(&proxy, &pod_json).into_iter().collect();
    assert_eq!(
        env["STRAIT_IDENTITY"],
        "spiffe://cluster.local/ns/shop/sa/shop-client"
    );
    assert_eq!(env["STRAIT_WORKLOAD"], "shop/client");
    assert!(env["STRAIT_TRUST_ANCHORS_PEM"].contains("BEGIN CERTIFICATE"));
    // The kubelet mounts the projected token at STRAIT_IDENTITY_TOKEN_FILE; here the test does.
    let token = format!("token-shop-client-{}", std::process::id());
    let token_file = mesh.net.dir.join("shop-client.token");
    std::fs::write(&token_file, &token)?;
    mesh.config.write(
        "pod-client.yaml",
        &format!(
            "kind: Pod\nmetadata: {{name: client, namespace: shop}}\nspec: {{serviceAccountName: shop-client}}\n---\n\
             kind: Secret\nmetadata: {{name: client-token, namespace: shop, annotations: {{kubernetes.io/service-account.name: shop-client}}}}\n\
             type: kubernetes.io/service-account-token\nstringData: {{token: {token}}}\n"
        ),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    env.insert(
        "STRAIT_IDENTITY_TOKEN_FILE".into(),
        token_file.to_string_lossy().into(),
    );
    let client = mesh.net.pod("client")?;
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    mesh.net.start_sidecar(
        &client,
        &SidecarOpts {
            env: env_refs,
            ..SidecarOpts::default()
        },
    )?;

    assert_eq!(
        mesh.curl(&client, &["http://10.96.0.10/"])?.trim(),
        "hello from server"
    );
    let m = mesh.metrics(&client)?;
    let expiry = metric(&m, "strait_identity_cert_expiry_timestamp_seconds", &[]).unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        expiry > now,
        "the injected proxy holds a valid certificate: {m}"
    );
    Ok(())
}
