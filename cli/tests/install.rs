//! `strait install`, `strait inject` and `strait check`, run as the user runs them.
//!
//! Manifests are validated with `kubernetes-validate --strict` (PyPI; installed by
//! scripts/setup.sh) against the schemas of Kubernetes 1.29 to 1.33.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use common::{fake_api, write_kubeconfig};
use serde::Deserialize;
use serde_json::{json, Value};

const VERSIONS: [&str; 5] = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"];

fn strait(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strait");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("strait output")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strait-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn validate(file: &Path) {
    for version in VERSIONS {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(file)
            .output()
            .expect("kubernetes-validate (pip install kubernetes-validate; scripts/setup.sh does)");
        assert!(
            out.status.success(),
            "{} is not valid for Kubernetes {version}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn b64_decode(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64");
    String::from_utf8(bytes).expect("PEM")
}

fn openssl_verify(dir: &Path, ca: &str, cert: &str) -> bool {
    std::fs::write(dir.join("ca.pem"), ca).expect("write");
    std::fs::write(dir.join("cert.pem"), cert).expect("write");
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl")
        .status
        .success()
}

#[test]
fn every_installed_manifest_is_valid_for_kubernetes_1_29_to_1_33_and_least_privileged() {
    let dir = tempdir("install");
    let out = strait(&["install"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("UTF-8");
    std::fs::write(dir.join("install.yaml"), &yaml).expect("write");
    validate(&dir.join("install.yaml"));

    let docs = docs(&yaml);
    for (kind, name) in [
        ("Namespace", "strait-system"),
        (
            "CustomResourceDefinition",
            "authorizationpolicies.policy.strait.io",
        ),
        ("CustomResourceDefinition", "httpfaults.policy.strait.io"),
        (
            "CustomResourceDefinition",
            "httplocalratelimitpolicies.policy.strait.io",
        ),
        (
            "CustomResourceDefinition",
            "grpcroutes.gateway.networking.k8s.io",
        ),
        (
            "CustomResourceDefinition",
            "trafficsplits.split.smi-spec.io",
        ),
        (
            "CustomResourceDefinition",
            "httproutegroups.specs.smi-spec.io",
        ),
        ("Deployment", "strait-control-plane"),
        ("Deployment", "strait-injector"),
        ("Service", "strait-identity"),
        ("PodDisruptionBudget", "strait-control-plane"),
        ("ConfigMap", "strait-trust-anchors"),
    ] {
        find(&docs, kind, name);
    }
    // Dashboards for Grafana's dashboard sidecar, and the scrape configuration.
    let dashboards = find(&docs, "ConfigMap", "strait-grafana-dashboards");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    let data = dashboards["data"].as_object().expect("data");
    assert_eq!(data.len(), 4, "{data:?}");
    for (name, text) in data {
        let d: Value = serde_json::from_str(text.as_str().expect("text")).expect(name);
        assert!(
            d["uid"].as_str().is_some_and(|u| u.starts_with("strait-")),
            "{name}"
        );
        assert!(
            !d["panels"].as_array().expect("panels").is_empty(),
            "{name}"
        );
    }
    let scrape = find(&docs, "ConfigMap", "strait-prometheus")["data"]["prometheus.yml"]
        .as_str()
        .expect("prometheus.yml")
        .to_string();
    assert!(
        scrape.contains("regex: strait-proxy;strait-admin"),
        "{scrape}"
    );
    // The webhook's caBundle is the CA of the injector's serving certificate, for its DNS name.
    let webhook = find(&docs, "MutatingWebhookConfiguration", "strait-injector");
    let entries = webhook["webhooks"].as_array().expect("webhooks");
    let paths: Vec<&str> = entries
        .iter()
        .map(|e| e["clientConfig"]["service"]["path"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        [
            "/inject",
            "/inject-pod-security",
            "/inject-opt-in",
            "/inject-opt-in-pod-security"
        ]
    );
    assert!(entries
        .iter()
        .all(|e| e["failurePolicy"] == "Ignore" && e["sideEffects"] == "None"));
    let tls = find(&docs, "Secret", "strait-injector-tls");
    let ca = b64_decode(&entries[0]["clientConfig"]["caBundle"]);
    let cert = b64_decode(&tls["data"]["tls.crt"]);
    assert!(
        openssl_verify(&dir, &ca, &cert),
        "the caBundle verifies the serving certificate"
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl");
    assert!(String::from_utf8_lossy(&text.stdout).contains("DNS:strait-injector.strait-system.svc"));
    // The issuer chains to the anchors every proxy gets.
    let anchors = find(&docs, "ConfigMap", "strait-trust-anchors")["data"]["ca-bundle.crt"]
        .as_str()
        .expect("anchors")
        .to_string();
    let issuer = b64_decode(&find(&docs, "Secret", "strait-issuer")["data"]["tls.crt"]);
    assert!(openssl_verify(&dir, &anchors, &issuer));
    // Least privilege: the control plane reads the mesh's kinds and creates TokenReviews;
    // nothing reads Secrets; the injector has no API token at all.
    let rules = find(&docs, "ClusterRole", "strait-control-plane")["rules"]
        .as_array()
        .expect("rules")
        .clone();
    for rule in &rules {
        let resources = rule["resources"].as_array().expect("resources");
        assert!(
            !resources.iter().any(|r| r == "secrets" || r == "*"),
            "{rule}"
        );
        let verbs = rule["verbs"].as_array().expect("verbs");
        assert!(verbs.iter().all(
            |v| ["get", "list", "watch", "create", "patch"].contains(&v.as_str().unwrap_or(""))
        ));
        if verbs.iter().any(|v| v == "create") {
            assert_eq!(rule["resources"], json!(["tokenreviews"]));
        }
        // The one write besides TokenReviews: the conditions of HTTPRoutes and GRPCRoutes.
        if verbs.iter().any(|v| v == "patch") {
            assert_eq!(
                rule["resources"],
                json!(["httproutes/status", "grpcroutes/status"])
            );
            assert_eq!(rule["verbs"], json!(["patch"]));
        }
    }
    let injector = find(&docs, "Deployment", "strait-injector");
    assert_eq!(
        injector["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    for name in ["strait-control-plane", "strait-injector"] {
        let pod = &find(&docs, "Deployment", name)["spec"]["template"]["spec"];
        let sc = &pod["containers"][0]["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn install_uses_the_operators_anchors_and_issuer() {
    let dir = tempdir("own-ca");
    let out = strait(
        &["identity", "init", "--dir", dir.to_str().expect("utf-8")],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = |f: &str| dir.join(f).display().to_string();
    let out = strait(
        &[
            "install",
            "--anchors",
            &path("ca.crt"),
            "--issuer-cert",
            &path("issuer.crt"),
            "--issuer-key",
            &path("issuer.key"),
            "--skip-smi-crds",
            "--replicas",
            "3",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = docs(&String::from_utf8(out.stdout).expect("UTF-8"));
    let anchors = find(&docs, "ConfigMap", "strait-trust-anchors")["data"]["ca-bundle.crt"].clone();
    assert_eq!(
        anchors,
        json!(std::fs::read_to_string(dir.join("ca.crt")).expect("read"))
    );
    let issuer = b64_decode(&find(&docs, "Secret", "strait-issuer")["data"]["tls.key"]);
    assert_eq!(
        issuer,
        std::fs::read_to_string(dir.join("issuer.key")).expect("read")
    );
    assert!(!docs
        .iter()
        .any(|d| d["metadata"]["name"] == "trafficsplits.split.smi-spec.io"));
    assert!(
        docs.iter()
            .any(|d| d["metadata"]["name"] == "httpfaults.policy.strait.io"),
        "Strait's own CRDs stay"
    );
    assert_eq!(
        find(&docs, "Deployment", "strait-control-plane")["spec"]["replicas"],
        3
    );

    // A key that is not the issuer's is refused with the flag named.
    let out = strait(
        &[
            "install",
            "--anchors",
            &path("ca.crt"),
            "--issuer-cert",
            &path("issuer.crt"),
            "--issuer-key",
            &path("ca.key"),
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--issuer-cert/--issuer-key"));
    std::fs::remove_dir_all(&dir).ok();
}

const APP: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers:
      - name: app
        image: nginx:1.27
        ports: [{name: http, containerPort: 80}]
"#;

#[test]
fn inject_adds_a_valid_sidecar_offline_and_is_idempotent() {
    let dir = tempdir("inject");
    std::fs::write(
        dir.join("anchors.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let anchors = dir.join("anchors.pem").display().to_string();
    let out = strait(&["inject", "--trust-anchors", &anchors, "-"], Some(APP));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Deployment/web: injected"));
    let injected = String::from_utf8(out.stdout).expect("UTF-8");
    std::fs::write(dir.join("injected.yaml"), &injected).expect("write");
    validate(&dir.join("injected.yaml"));
    let doc = &docs(&injected)[0];
    let init = &doc["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(init[0]["name"], "strait-init");
    assert_eq!(init[1]["name"], "strait-proxy");

    let again = strait(&["inject", "--trust-anchors", &anchors], Some(&injected));
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).expect("UTF-8"), injected);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already injected"));

    // Classic mode is valid too.
    let out = strait(
        &[
            "inject",
            "--trust-anchors",
            &anchors,
            "--sidecar-mode",
            "classic",
        ],
        Some(APP),
    );
    std::fs::write(dir.join("classic.yaml"), &out.stdout).expect("write");
    validate(&dir.join("classic.yaml"));
    std::fs::remove_dir_all(&dir).ok();
}

fn path_of(doc: &Value) -> String {
    let name = doc["metadata"]["name"].as_str().unwrap_or("");
    let ns = doc["metadata"]["namespace"].as_str().unwrap_or("");
    match doc["kind"].as_str().unwrap_or("") {
        "CustomResourceDefinition" => {
            format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        }
        "MutatingWebhookConfiguration" => {
            format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}")
        }
        "Deployment" => format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        "ConfigMap" => format!("/api/v1/namespaces/{ns}/configmaps/{name}"),
        "Secret" => format!("/api/v1/namespaces/{ns}/secrets/{name}"),
        _ => String::new(),
    }
}

#[test]
fn check_passes_on_an_installed_mesh_and_names_what_is_missing() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let out = strait(&["install"], None);
    let docs = docs(&String::from_utf8(out.stdout).expect("UTF-8"));
    let mut objects: HashMap<String, Value> = HashMap::new();
    objects.insert(
        "/version".into(),
        json!({"major": "1", "minor": "32", "gitVersion": "v1.32.13",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}),
    );
    for doc in &docs {
        let mut doc = doc.clone();
        if doc["kind"] == "Deployment" {
            doc["status"] = json!({"replicas": 2, "readyReplicas": 2});
        }
        objects.insert(path_of(&doc), doc);
    }
    let namespaces = |extra: Vec<Value>| {
        let mut items = vec![
            json!({"metadata": {"name": "default"}}),
            json!({"metadata": {"name": "shop", "labels": {"strait.io/inject": "enabled"}}}),
        ];
        items.extend(extra);
        json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": items})
    };
    objects.insert("/api/v1/namespaces".into(), namespaces(Vec::new()));
    let dir = tempdir("check");
    let run_check = |objects: HashMap<String, Value>| {
        let bodies = objects
            .into_iter()
            .map(|(path, v)| (path, vec![v.to_string()]))
            .collect();
        let (addr, _) = runtime.block_on(fake_api(bodies));
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, addr);
        Command::new(env!("CARGO_BIN_EXE_strait"))
            .arg("check")
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("strait check")
    };
    let out = run_check(objects.clone());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 14 checks passed"), "{stdout}");
    assert!(stdout.contains("2/2 replicas ready"), "{stdout}");
    assert!(
        stdout
            .contains("verifies the injector's certificate for strait-injector.strait-system.svc"),
        "{stdout}"
    );

    // Read-only, no Secrets: still passes, saying what it could not check.
    let mut no_secrets = objects.clone();
    for name in ["strait-issuer", "strait-injector-tls"] {
        no_secrets.insert(
            format!("/api/v1/namespaces/strait-system/secrets/{name}"),
            Value::String("403".into()),
        );
    }
    let out = run_check(no_secrets);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("no permission to read Secrets"), "{stdout}");

    // A caBundle that is not the injector's CA, and a meshed namespace enforcing restricted.
    let mut broken = objects.clone();
    let webhook_path =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/strait-injector";
    let other_ca = strait(&["install"], None);
    let other_docs = self::docs(&String::from_utf8(other_ca.stdout).expect("UTF-8"));
    let other_bundle = find(
        &other_docs,
        "MutatingWebhookConfiguration",
        "strait-injector",
    )["webhooks"][0]["clientConfig"]["caBundle"]
        .clone();
    if let Some(w) = broken.get_mut(webhook_path) {
        for entry in w["webhooks"].as_array_mut().expect("entries") {
            entry["clientConfig"]["caBundle"] = other_bundle.clone();
        }
    }
    broken.insert(
        "/api/v1/namespaces".into(),
        namespaces(vec![json!({"metadata": {"name": "payments", "labels": {
            "strait.io/inject": "enabled", "pod-security.kubernetes.io/enforce": "restricted"}}})]),
    );
    let out = run_check(broken);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL webhook caBundle"), "{stdout}");
    assert!(
        stdout.contains("FAIL PodSecurity") && stdout.contains("payments (restricted)"),
        "{stdout}"
    );

    objects.remove(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/strait-injector",
    );
    let deployment = "/apis/apps/v1/namespaces/strait-system/deployments/strait-control-plane";
    if let Some(d) = objects.get_mut(deployment) {
        d["status"] = json!({"replicas": 2});
    }
    let out = run_check(objects);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL injection webhook"), "{stdout}");
    assert!(stdout.contains("0/2 replicas ready"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn install_hands_tracing_and_access_logs_to_the_injector() {
    let out = strait(
        &[
            "install",
            "--trace-collector",
            "http://otel-collector.observability:4317",
            "--trace-sample-ratio",
            "0.1",
            "--access-log",
            "json",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = docs(&String::from_utf8(out.stdout).expect("UTF-8"));
    let args = find(&docs, "Deployment", "strait-injector")["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .as_array()
        .expect("args")
        .clone();
    for flag in [
        "--trace-collector=http://otel-collector.observability:4317",
        "--trace-sample-ratio=0.1",
        "--access-log=json",
    ] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }
    // The injector accepts them (and refuses a collector it could not use).
    let injector =
        std::path::Path::new(env!("CARGO_BIN_EXE_strait")).with_file_name("strait-injector");
    if injector.exists() {
        let bad = Command::new(&injector)
            .args(["--trace-collector", "otel:4317"])
            .output()
            .expect("strait-injector");
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("--trace-collector"));
    }
}

/// Whether a Kubernetes label selector (matchLabels, matchExpressions with In, NotIn, Exists,
/// DoesNotExist) selects an object with `labels`, as the API server evaluates it.
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let by_expressions = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|v| values.contains(&v)),
                Some("NotIn") => label(key).is_none_or(|v| !values.contains(&v)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                other => panic!("unknown operator {other:?}"),
            }
        })
    });
    by_labels && by_expressions
}

#[test]
fn with_failure_policy_fail_only_pods_that_asked_for_the_mesh_reach_the_webhook() {
    let out = strait(&["install", "--failure-policy", "Fail"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = docs(&String::from_utf8_lossy(&out.stdout));
    let webhook = find(&docs, "MutatingWebhookConfiguration", "strait-injector");
    let entries = webhook["webhooks"].as_array().expect("webhooks");
    assert!(entries.iter().all(|e| e["failurePolicy"] == "Fail"));
    let calls = |ns_labels: &Value, pod_labels: &Value| {
        entries
            .iter()
            .filter(|e| {
                selects(&e["namespaceSelector"], ns_labels)
                    && selects(&e["objectSelector"], pod_labels)
            })
            .count()
    };
    // The captured cluster: every pod, with its namespace's labels.
    let read = |f: &str| -> Value {
        let path = format!("{}/../testdata/k8s/cluster/{f}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
    };
    let namespaces: HashMap<String, Value> = read("namespaces-list.json")["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap_or("").to_string(),
                n["metadata"]["labels"].clone(),
            )
        })
        .collect();
    let mut seen = 0;
    for pod in read("pods-list-all-namespaces.json")["items"]
        .as_array()
        .expect("items")
    {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
        let ns_labels = &namespaces[ns];
        let labels = &pod["metadata"]["labels"];
        let n = calls(ns_labels, labels);
        let ns_on = ns_labels["strait.io/inject"] == "enabled";
        let pod_label = labels["strait.io/inject"].as_str();
        let expected = match (ns_on, pod_label) {
            (_, Some("disabled")) => 0,
            (true, _) => 1,
            (false, Some("enabled")) if !["kube-system", "strait-system"].contains(&ns) => 1,
            (false, _) => 0,
        };
        assert_eq!(n, expected, "{ns}/{}: {labels}", pod["metadata"]["name"]);
        // Namespaces that enforce baseline or restricted reach the PodSecurity paths.
        if n == 1 {
            let path = entries
                .iter()
                .find(|e| {
                    selects(&e["namespaceSelector"], ns_labels)
                        && selects(&e["objectSelector"], labels)
                })
                .map(|e| e["clientConfig"]["service"]["path"].as_str().unwrap_or(""))
                .unwrap_or("");
            let psa = ["baseline", "restricted"].contains(
                &ns_labels["pod-security.kubernetes.io/enforce"]
                    .as_str()
                    .unwrap_or(""),
            );
            assert_eq!(path.ends_with("-pod-security"), psa, "{ns}: {path}");
        }
        seen += 1;
    }
    assert!(seen > 10);
    // Pods that never opted in, in namespaces that never did: the webhook is never called,
    // so an injector outage cannot block them.
    let none = json!({});
    for ns in ["default", "plain", "kube-system", "other"] {
        assert_eq!(calls(&namespaces[ns], &none), 0, "{ns}");
    }
    assert_eq!(calls(&namespaces["demo"], &none), 1, "a labelled namespace");
    let opted_out = json!({"strait.io/inject": "disabled"});
    assert_eq!(calls(&namespaces["demo"], &opted_out), 0);
    let opted_in = json!({"strait.io/inject": "enabled"});
    assert_eq!(calls(&namespaces["plain"], &opted_in), 1);
    assert_eq!(calls(&namespaces["kube-system"], &opted_in), 0);
}

#[test]
fn cni_mode_installs_the_plugin_daemonset_and_injects_without_an_init_container() {
    let dir = tempdir("install-cni");
    let out = strait(&["install", "--cni"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("UTF-8");
    std::fs::write(dir.join("install.yaml"), &yaml).expect("write");
    validate(&dir.join("install.yaml"));
    let docs = docs(&yaml);
    // Only the CNI installer's own namespace is privileged; the control plane's stays as is.
    let cni_ns = find(&docs, "Namespace", "strait-cni");
    assert_eq!(
        cni_ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    assert!(
        find(&docs, "Namespace", "strait-system")["metadata"]["labels"]
            .get("pod-security.kubernetes.io/enforce")
            .is_none()
    );
    let ds = find(&docs, "DaemonSet", "strait-cni");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false, "no API access");
    let container = &pod["containers"][0];
    assert_eq!(container["command"][0], "strait-cni");
    assert_eq!(container["command"][1], "install");
    let paths: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(paths, ["/opt/cni/bin", "/etc/cni/net.d"]);
    let injector = find(&docs, "Deployment", "strait-injector");
    let args = injector["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args");
    assert!(args.iter().any(|a| a == "--cni"), "{args:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reinstalling_against_a_cluster_keeps_its_trust_root_unless_asked_to_replace_it() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let first = strait(&["install", "--existing", "offline"], None);
    assert!(first.status.success());
    let first = docs(&String::from_utf8(first.stdout).expect("UTF-8"));
    let bodies: HashMap<String, Vec<String>> = first
        .iter()
        .map(|d| (path_of(d), vec![d.to_string()]))
        .filter(|(p, _)| !p.is_empty())
        .collect();
    let (addr, _) = runtime.block_on(fake_api(bodies));
    let dir = tempdir("reinstall");
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, addr);
    let install = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_strait"))
            .arg("install")
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("strait install");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            docs(&String::from_utf8(out.stdout).expect("UTF-8")),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let pki = |docs: &[Value]| {
        (
            find(docs, "ConfigMap", "strait-trust-anchors")["data"]["ca-bundle.crt"].clone(),
            find(docs, "Secret", "strait-issuer")["data"].clone(),
            find(docs, "Secret", "strait-injector-tls")["data"].clone(),
            find(docs, "MutatingWebhookConfiguration", "strait-injector")["webhooks"][0]
                ["clientConfig"]["caBundle"]
                .clone(),
        )
    };
    let (again, stderr) = install(&[]);
    assert!(
        stderr.contains("keeping the cluster's trust anchors"),
        "{stderr}"
    );
    assert_eq!(
        pki(&again),
        pki(&first),
        "an upgrade keeps the root, issuer and webhook PKI"
    );
    let (fresh, _) = install(&["--fresh-pki"]);
    let (a, b) = (pki(&fresh), pki(&first));
    assert_ne!(a.0, b.0, "--fresh-pki replaces the anchors");
    assert_ne!(a.3, b.3);
    std::fs::remove_dir_all(&dir).ok();
}

/// Prometheus' name for a Kubernetes label in `__meta_kubernetes_pod_label_<name>`.
fn sanitized(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[test]
fn dashboards_filter_every_panel_and_the_scrape_config_matches_the_manifests() {
    // Every panel of a dashboard with variables uses one of them.
    let grafana = Path::new(env!("CARGO_MANIFEST_DIR")).join("../install/grafana");
    for entry in std::fs::read_dir(&grafana).expect("install/grafana") {
        let path = entry.expect("entry").path();
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        let vars: Vec<String> = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .filter(|n| *n != "datasource")
            .map(|n| format!("${n}"))
            .collect();
        for panel in d["panels"].as_array().expect("panels") {
            let exprs: Vec<&str> = panel["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .filter_map(|t| t["expr"].as_str())
                .collect();
            assert!(
                vars.is_empty()
                    || exprs
                        .iter()
                        .all(|e| vars.iter().any(|v| e.contains(v.as_str()))),
                "{}: panel {:?} ignores the dashboard's variables {vars:?}: {exprs:?}",
                path.display(),
                panel["title"]
            );
        }
    }

    // The control plane's scrape job keeps, and labels by, what the installed pods carry.
    let config: Value =
        serde_yaml_ng::from_str(include_str!("../../install/prometheus/prometheus.yml"))
            .expect("YAML");
    let job = config["scrape_configs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["job_name"] == "strait-control-plane")
        .expect("the control plane's job");
    let out = strait(&["install"], None);
    assert!(out.status.success());
    let docs = docs(&String::from_utf8(out.stdout).expect("UTF-8"));
    for name in ["strait-control-plane", "strait-injector"] {
        let template = &find(&docs, "Deployment", name)["spec"]["template"];
        let labels: Vec<(String, String)> = template["metadata"]["labels"]
            .as_object()
            .expect("labels")
            .iter()
            .map(|(k, v)| (sanitized(k), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let ports: Vec<&str> = template["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .filter_map(|p| p["name"].as_str())
            .collect();
        for rule in job["relabel_configs"].as_array().expect("relabel_configs") {
            let sources: Vec<&str> = rule["source_labels"]
                .as_array()
                .expect("source_labels")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let values: Vec<String> = sources
                .iter()
                .map(|s| {
                    if let Some(label) = s.strip_prefix("__meta_kubernetes_pod_label_") {
                        labels
                            .iter()
                            .find(|(k, _)| k == label)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_else(|| panic!("{name}: no pod label {label} for {s}"))
                    } else if *s == "__meta_kubernetes_pod_container_port_name" {
                        if ports.contains(&"admin") {
                            "admin"
                        } else {
                            ""
                        }
                        .to_string()
                    } else {
                        "-".to_string()
                    }
                })
                .collect();
            if rule["action"] == "keep" {
                let regex = rule["regex"].as_str().expect("regex");
                assert_eq!(values.join(";"), regex, "{name} is not kept by {rule}");
            }
        }
    }
}
