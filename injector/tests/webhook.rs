//! The webhook against AdmissionReview JSON captured from a real API server (testdata/k8s):
//! the returned JSON Patch is applied and the result read back as a typed `k8s-openapi` Pod.

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use strait_injector::config::{InjectConfig, SidecarMode};
use strait_injector::review::{review, Outcome};

const ANCHORS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../testdata/k8s/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn config(mode: SidecarMode) -> InjectConfig {
    let dir = std::env::temp_dir().join(format!("strait-injector-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let anchors = dir.join("anchors.pem");
    std::fs::write(&anchors, ANCHORS).expect("write anchors");
    InjectConfig {
        trust_anchors: Some(anchors),
        sidecar_mode: mode,
        ..InjectConfig::defaults()
    }
}

/// Runs a review; returns the response, the outcome and the pod after the patch.
fn run(review_json: &Value, namespace_enabled: bool, cfg: &InjectConfig) -> (Value, Outcome, Pod) {
    let body = serde_json::to_vec(review_json).expect("encode");
    let (answer, outcome) = review(&body, namespace_enabled, cfg).expect("a review");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], review_json["request"]["uid"]);
    assert_eq!(response["allowed"], true, "the mesh never blocks a pod");
    let mut object = review_json["request"]["object"].clone();
    if let Some(patch) = response.get("patch") {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch.as_str().expect("patch is a string"))
            .expect("patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("RFC 6902 patch");
        json_patch::patch(&mut object, &patch).expect("the patch applies");
    }
    let pod: Pod = serde_json::from_value(object).expect("a valid Pod");
    (answer, outcome, pod)
}

fn init_names(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

fn container<'a>(list: &'a Option<Vec<Container>>, name: &str) -> &'a Container {
    list.iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// What the API server validates (testdata/k8s/admission/injected-pod-validation-cases.json):
/// unique container and volume names, port names of at most 15 characters, mounts of defined
/// volumes, probes only on restartable init containers, token lifetimes of 10 minutes or more.
fn assert_valid(pod: &Pod) {
    let spec = pod.spec.as_ref().expect("spec");
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate container names");
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mut unique = volumes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), volumes.len(), "duplicate volume names");
    for c in &all {
        for port in c.ports.iter().flatten() {
            assert!(port.name.as_deref().unwrap_or("").len() <= 15);
        }
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(&m.name.as_str()),
                "mount of undefined {}",
                m.name
            );
        }
    }
    for c in spec.init_containers.iter().flatten() {
        let restartable = c.restart_policy.as_deref() == Some("Always");
        if !restartable {
            assert!(
                c.startup_probe.is_none()
                    && c.readiness_probe.is_none()
                    && c.liveness_probe.is_none()
            );
        }
    }
    for c in &spec.containers {
        assert!(
            c.restart_policy.is_none(),
            "restartPolicy on a regular container"
        );
    }
    for v in spec.volumes.iter().flatten() {
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(t) = &source.service_account_token {
                assert!(t.expiration_seconds.unwrap_or(3600) >= 600);
            }
        }
    }
}

fn assert_injected_native(pod: &Pod) {
    let meta = &pod.metadata;
    let annotations = meta.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["strait.io/injected"], "true");
    let spec = pod.spec.as_ref().expect("spec");
    let init = container(&spec.init_containers, "strait-init");
    assert_eq!(
        init.command.as_deref(),
        Some(&["strait-proxy".to_string()][..])
    );
    let args = init.args.as_ref().expect("args");
    assert_eq!(args[0], "init");
    let sc = init
        .security_context
        .as_ref()
        .expect("init securityContext");
    let caps = sc.capabilities.as_ref().expect("caps");
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(sc.read_only_root_filesystem, Some(true));

    let proxy = container(&spec.init_containers, "strait-proxy");
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    let startup = proxy.startup_probe.as_ref().expect("startup probe");
    assert_eq!(
        startup.http_get.as_ref().and_then(|g| g.path.as_deref()),
        Some("/ready")
    );
    assert!(proxy.readiness_probe.is_some() && proxy.liveness_probe.is_some());
    let sc = proxy
        .security_context
        .as_ref()
        .expect("proxy securityContext");
    assert_eq!(sc.run_as_user, Some(2102));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let env: Vec<(&str, Option<&str>, Option<&str>)> = proxy
        .env
        .iter()
        .flatten()
        .map(|e| {
            (
                e.name.as_str(),
                e.value.as_deref(),
                e.value_from
                    .as_ref()
                    .and_then(|f| f.field_ref.as_ref())
                    .map(|f| f.field_path.as_str()),
            )
        })
        .collect();
    for (name, field) in [
        ("STRAIT_POD_NAME", "metadata.name"),
        ("STRAIT_POD_NAMESPACE", "metadata.namespace"),
        ("STRAIT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        assert!(
            env.contains(&(name, None, Some(field))),
            "{name} from {field}: {env:?}"
        );
    }
    assert!(env.contains(&("STRAIT_TRUST_ANCHORS_PEM", Some(ANCHORS), None)));
    assert!(env.contains(&(
        "STRAIT_IDENTITY",
        Some("spiffe://cluster.local/ns/$(STRAIT_POD_NAMESPACE)/sa/$(STRAIT_SERVICE_ACCOUNT)"),
        None
    )));
    let resources = proxy.resources.as_ref().expect("resources");
    assert_eq!(
        resources.limits.as_ref().expect("limits")["memory"].0,
        "128Mi"
    );

    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "strait-identity-token")
        .expect("token volume");
    let projection = token
        .projected
        .as_ref()
        .expect("projected")
        .sources
        .as_ref()
        .expect("sources")[0]
        .service_account_token
        .as_ref()
        .expect("a service account token");
    assert_eq!(projection.audience.as_deref(), Some("identity.strait.io"));
    let mount = proxy
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "strait-identity-token");
    assert_eq!(
        mount.map(|m| m.mount_path.as_str()),
        Some("/var/run/strait/identity")
    );
    assert_valid(pod);
}

#[test]
fn the_captured_pod_is_injected_as_a_native_sidecar() {
    let cfg = config(SidecarMode::Native);
    let (_, outcome, pod) = run(&fixture("pod-create-k8s-1.32.json"), true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_eq!(init_names(&pod), ["strait-init", "strait-proxy"]);
    assert_injected_native(&pod);
    assert_eq!(
        pod.spec.as_ref().expect("spec").containers[0].name,
        "cap",
        "app untouched"
    );
}

#[test]
fn a_pod_with_a_token_volume_keeps_it_and_its_containers() {
    let cfg = config(SidecarMode::Native);
    let review = fixture("pod-create-apply-serviceaccount.json");
    let before: Pod = serde_json::from_value(review["request"]["object"].clone()).expect("pod");
    let (_, outcome, pod) = run(&review, true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_injected_native(&pod);
    let spec = pod.spec.as_ref().expect("spec");
    // Only the application's probe moved to the proxy (see the probes test).
    let mut expected = before.spec.as_ref().expect("spec").containers.clone();
    expected[0].readiness_probe = spec.containers[0].readiness_probe.clone();
    assert_eq!(spec.containers, expected);
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(
        volumes.iter().any(|v| v.starts_with("kube-api-access-")),
        "{volumes:?}"
    );
    assert!(volumes.contains(&"strait-identity-token"));
    // The user's annotations stay; ours are added.
    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    assert!(annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
}

#[test]
fn existing_init_containers_run_after_the_meshs_own_in_their_order() {
    let cfg = config(SidecarMode::Native);
    let (_, outcome, pod) = run(&fixture("pod-create-with-initcontainers.json"), true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_eq!(
        init_names(&pod),
        ["strait-init", "strait-proxy", "wait-for-db", "migrate"]
    );
    assert_injected_native(&pod);
}

#[test]
fn a_generate_name_pod_is_injected() {
    let cfg = config(SidecarMode::Native);
    let review = fixture("pod-create-replicaset-generatename.json");
    assert!(review["request"].get("name").is_none());
    let (_, outcome, pod) = run(&review, true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_eq!(pod.metadata.generate_name.as_deref(), Some("web-7d9c-"));
    assert_injected_native(&pod);
}

#[test]
fn host_network_already_injected_and_opted_out_pods_are_left_alone() {
    let cfg = config(SidecarMode::Native);
    for (name, expected) in [
        (
            "pod-create-hostnetwork.json",
            strait_injector::inject::Skip::HostNetwork,
        ),
        (
            "pod-create-already-injected.json",
            strait_injector::inject::Skip::AlreadyInjected,
        ),
        (
            "pod-create-native-sidecar-injected.json",
            strait_injector::inject::Skip::AlreadyInjected,
        ),
    ] {
        let (answer, outcome, _) = run(&fixture(name), true, &cfg);
        assert_eq!(outcome, Outcome::Skipped(expected), "{name}");
        assert!(answer["response"].get("patch").is_none(), "{name}");
    }
    let mut review = fixture("pod-create-k8s-1.32.json");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/inject": "disabled"});
    let (answer, outcome, _) = run(&review, true, &cfg);
    assert_eq!(
        outcome,
        Outcome::Skipped(strait_injector::inject::Skip::OptedOut)
    );
    assert!(answer["response"].get("patch").is_none());
}

#[test]
fn outside_labelled_namespaces_only_annotated_pods_are_injected() {
    let cfg = config(SidecarMode::Native);
    let mut review = fixture("pod-create-k8s-1.32.json");
    let (_, outcome, _) = run(&review, false, &cfg);
    assert_eq!(
        outcome,
        Outcome::Skipped(strait_injector::inject::Skip::NotEnabled)
    );
    review["request"]["object"]["metadata"]["annotations"] = json!({"strait.io/inject": "enabled"});
    let (_, outcome, pod) = run(&review, false, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_injected_native(&pod);
}

#[test]
fn updates_are_ignored_and_dry_runs_injected() {
    let cfg = config(SidecarMode::Native);
    let (answer, outcome, _) = run(&fixture("pod-update-label.json"), true, &cfg);
    assert_eq!(outcome, Outcome::Ignored);
    assert!(answer["response"].get("patch").is_none());
    let (_, outcome, pod) = run(&fixture("pod-create-dryrun.json"), true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    assert_injected_native(&pod);
}

#[test]
fn classic_mode_puts_the_proxy_first_and_holds_the_app_until_it_is_ready() {
    let cfg = config(SidecarMode::Classic);
    let (_, outcome, pod) = run(&fixture("pod-create-apply-serviceaccount.json"), true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(init_names(&pod), ["strait-init"]);
    assert_eq!(spec.containers[0].name, "strait-proxy");
    let hook = spec.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("postStart exec");
    assert_eq!(
        hook[..2],
        ["strait-proxy".to_string(), "await-ready".to_string()]
    );
    assert_valid(&pod);
    // The annotation overrides the injector's default.
    let mut review = fixture("pod-create-k8s-1.32.json");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/sidecar-mode": "native"});
    let (_, _, pod) = run(&review, true, &cfg);
    assert_injected_native(&pod);
}

#[test]
fn annotations_set_ports_and_resources_and_bad_ones_admit_with_a_warning() {
    let cfg = config(SidecarMode::Native);
    let mut review = fixture("pod-create-k8s-1.32.json");
    review["request"]["object"]["metadata"]["annotations"] = json!({
        "strait.io/skip-inbound-ports": "9090",
        "strait.io/skip-outbound-ports": "5432,6000-6010",
        "strait.io/opaque-ports": "3306",
        "strait.io/proxy-memory-limit": "256Mi",
    });
    let (_, outcome, pod) = run(&review, true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    let spec = pod.spec.as_ref().expect("spec");
    let args = container(&spec.init_containers, "strait-init")
        .args
        .clone()
        .expect("args");
    let pos = |flag: &str| args.iter().position(|a| a == flag).expect(flag);
    assert_eq!(args[pos("--skip-inbound-ports") + 1], "4190,4191,9090");
    assert_eq!(args[pos("--skip-outbound-ports") + 1], "5432,6000-6010");
    let proxy = container(&spec.init_containers, "strait-proxy");
    assert!(proxy
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "STRAIT_OPAQUE_PORTS" && e.value.as_deref() == Some("3306")));
    let limits = proxy
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .expect("limits");
    assert_eq!(limits["memory"].0, "256Mi");

    review["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/skip-inbound-ports": "http"});
    let (answer, outcome, pod) = run(&review, true, &cfg);
    assert!(matches!(outcome, Outcome::Failed(_)));
    let warning = answer["response"]["warnings"][0]
        .as_str()
        .expect("a warning");
    assert!(
        warning.contains("strait.io/skip-inbound-ports"),
        "{warning}"
    );
    assert!(
        pod.spec.as_ref().expect("spec").init_containers.is_none(),
        "unchanged"
    );
}

#[test]
fn the_mesh_wide_collector_and_per_pod_access_log_and_sampling_reach_the_proxy() {
    let env_of = |pod: &Pod| -> Vec<(String, String)> {
        let spec = pod.spec.as_ref().expect("spec");
        container(&spec.init_containers, "strait-proxy")
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    };
    let has =
        |env: &[(String, String)], k: &str, v: &str| env.iter().any(|(n, x)| n == k && x == v);
    let plain = config(SidecarMode::Native);
    let (_, _, pod) = run(&fixture("pod-create-k8s-1.32.json"), true, &plain);
    let env = env_of(&pod);
    assert!(
        !env.iter()
            .any(|(n, _)| n.starts_with("STRAIT_TRACE") || n == "STRAIT_ACCESS_LOG"),
        "off unless configured: {env:?}"
    );

    let cfg = InjectConfig {
        trace_collector: Some("http://otel-collector.observability:4317".into()),
        ..config(SidecarMode::Native)
    };
    let mut review = fixture("pod-create-k8s-1.32.json");
    review["request"]["object"]["metadata"]["annotations"] = json!({
        "strait.io/access-log": "json",
        "strait.io/trace-sample-ratio": "0.25",
    });
    let (_, outcome, pod) = run(&review, true, &cfg);
    assert_eq!(outcome, Outcome::Injected);
    let env = env_of(&pod);
    assert!(
        has(
            &env,
            "STRAIT_TRACE_COLLECTOR",
            "http://otel-collector.observability:4317"
        ),
        "{env:?}"
    );
    assert!(has(&env, "STRAIT_TRACE_SAMPLE_RATIO", "0.25"), "{env:?}");
    assert!(has(&env, "STRAIT_ACCESS_LOG", "json"), "{env:?}");
    // A bare pod is its own workload in traces: `<name>.<namespace>`.
    assert!(
        has(
            &env,
            "STRAIT_TRACE_SERVICE_NAME",
            "cap.$(STRAIT_POD_NAMESPACE)"
        ),
        "{env:?}"
    );

    for (annotation, bad) in [
        ("strait.io/access-log", "xml"),
        ("strait.io/trace-sample-ratio", "2"),
    ] {
        review["request"]["object"]["metadata"]["annotations"] = json!({annotation: bad});
        let (answer, outcome, _) = run(&review, true, &cfg);
        assert!(matches!(outcome, Outcome::Failed(_)), "{annotation}");
        let warning = answer["response"]["warnings"][0]
            .as_str()
            .unwrap_or_default();
        assert!(warning.contains(annotation), "{warning}");
    }
}

#[test]
fn unreadable_anchors_admit_with_a_warning_and_garbage_is_an_error() {
    let cfg = InjectConfig {
        trust_anchors: Some("/nonexistent/anchors.pem".into()),
        ..InjectConfig::defaults()
    };
    let (answer, outcome, _) = run(&fixture("pod-create-k8s-1.32.json"), true, &cfg);
    assert!(matches!(outcome, Outcome::Failed(_)));
    assert!(answer["response"]["warnings"][0]
        .as_str()
        .is_some_and(|w| w.contains("/nonexistent/anchors.pem")));
    assert!(review(b"{not json", true, &cfg).is_err());
    assert!(review(b"{\"request\": {}}", true, &cfg).is_err());
}

/// The proxy, a native sidecar or (classic mode) the first container.
fn proxy_of(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == "strait-proxy")
        .expect("the proxy")
}

fn proxy_env(pod: &Pod) -> Vec<(String, String)> {
    proxy_of(pod)
        .env
        .iter()
        .flatten()
        .map(|e| {
            let v = e.value.clone().or_else(|| {
                Some(
                    e.value_from
                        .as_ref()?
                        .field_ref
                        .as_ref()?
                        .field_path
                        .clone(),
                )
            });
            (e.name.clone(), v.unwrap_or_default())
        })
        .collect()
}

#[test]
fn application_probes_go_through_the_proxy_in_both_modes_unless_opted_out() {
    let mut review = fixture("pod-create-apply-serviceaccount.json");
    // The captured pod probes /healthz on the named port `http`; give the cache a TCP probe.
    review["request"]["object"]["spec"]["containers"][1]["livenessProbe"] =
        json!({"tcpSocket": {"port": 6379}, "timeoutSeconds": 3, "periodSeconds": 7});
    for mode in [SidecarMode::Native, SidecarMode::Classic] {
        let (_, outcome, pod) = run(&review, true, &config(mode));
        assert_eq!(outcome, Outcome::Injected);
        assert_valid(&pod);
        let spec = pod.spec.as_ref().expect("spec");
        let app = container(&Some(spec.containers.clone()), "app").clone();
        let get = app
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("httpGet");
        assert_eq!(get.path.as_deref(), Some("/app-health/app/readiness"));
        assert_eq!(get.port, IntOrString::Int(4191));
        let probe = app.readiness_probe.as_ref().expect("probe");
        assert_eq!(probe.period_seconds, Some(5), "timing is kept");
        let cache = container(&Some(spec.containers.clone()), "cache").clone();
        let live = cache.liveness_probe.as_ref().expect("liveness");
        assert!(live.tcp_socket.is_none(), "one handler only");
        assert_eq!(
            live.http_get.as_ref().and_then(|g| g.path.as_deref()),
            Some("/app-health/cache/liveness")
        );
        assert_eq!(live.period_seconds, Some(7));
        let env = proxy_env(&pod);
        let probes = env
            .iter()
            .find(|(n, _)| n == "STRAIT_APP_PROBES")
            .map(|(_, v)| serde_json::from_str::<Value>(v).expect("JSON"))
            .expect("STRAIT_APP_PROBES");
        assert_eq!(
            probes,
            json!({
                "app/readiness": {"kind": "http", "port": 8080, "path": "/healthz", "timeoutSeconds": 1},
                "cache/liveness": {"kind": "tcp", "port": 6379, "timeoutSeconds": 3},
            })
        );
        assert!(env.contains(&("STRAIT_POD_IP".into(), "status.podIP".into())));
        // The proxy's own probes are untouched.
        let ready = proxy_of(&pod)
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(ready.and_then(|g| g.path.as_deref()), Some("/ready"));
    }

    review["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/rewrite-probes": "false"});
    let before: Pod = serde_json::from_value(review["request"]["object"].clone()).expect("pod");
    let (_, _, pod) = run(&review, true, &config(SidecarMode::Native));
    assert_eq!(
        pod.spec.as_ref().expect("spec").containers,
        before.spec.as_ref().expect("spec").containers
    );
    assert!(!proxy_env(&pod)
        .iter()
        .any(|(n, _)| n == "STRAIT_APP_PROBES"));
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/rewrite-probes": "maybe"});
    let (answer, outcome, _) = run(&review, true, &config(SidecarMode::Native));
    assert!(matches!(outcome, Outcome::Failed(_)));
    assert!(answer["response"]["warnings"][0]
        .as_str()
        .is_some_and(|w| w.contains("strait.io/rewrite-probes")));
}

#[test]
fn in_a_pod_security_namespace_the_pod_is_admitted_unchanged_with_a_warning() {
    let cfg = config(SidecarMode::Native);
    let body = serde_json::to_vec(&fixture("pod-create-k8s-1.32.json")).expect("json");
    let (answer, outcome) =
        strait_injector::review::review_in(&body, true, true, &cfg).expect("a review");
    let response = &answer["response"];
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "no patch: {response}");
    let warning = response["warnings"][0].as_str().unwrap_or("");
    assert!(
        warning.contains("PodSecurity") && warning.contains("NET_ADMIN"),
        "{warning}"
    );
    assert!(matches!(outcome, Outcome::Failed(_)));
    // A pod that would not be injected anyway is simply skipped there too.
    let mut opted_out = fixture("pod-create-k8s-1.32.json");
    opted_out["request"]["object"]["metadata"]["annotations"] =
        json!({"strait.io/inject": "disabled"});
    let body = serde_json::to_vec(&opted_out).expect("json");
    let (answer, outcome) =
        strait_injector::review::review_in(&body, true, true, &cfg).expect("a review");
    assert!(matches!(outcome, Outcome::Skipped(_)), "{outcome:?}");
    assert!(answer["response"].get("warnings").is_none());
}

#[test]
fn in_cni_mode_the_injected_pod_has_no_init_container_and_its_proxy_passes_restricted() {
    for mode in [SidecarMode::Native, SidecarMode::Classic] {
        let cfg = InjectConfig {
            cni: true,
            ..config(mode)
        };
        // Even on the PodSecurity path: nothing the restricted level forbids is added.
        let body = serde_json::to_vec(&fixture("pod-create-k8s-1.32.json")).expect("json");
        let (answer, outcome) =
            strait_injector::review::review_in(&body, true, true, &cfg).expect("a review");
        assert_eq!(outcome, Outcome::Injected, "{mode:?}");
        assert!(answer["response"].get("warnings").is_none());
        let (_, _, pod) = run(&fixture("pod-create-k8s-1.32.json"), true, &cfg);
        assert!(
            !init_names(&pod).iter().any(|n| n == "strait-init"),
            "{mode:?}: {:?}",
            init_names(&pod)
        );
        let spec = pod.spec.as_ref().expect("spec");
        assert!(
            !spec
                .volumes
                .iter()
                .flatten()
                .any(|v| v.name.contains("xtables")),
            "no iptables lock volume"
        );
        let proxy = proxy_of(&pod);
        let sc = proxy.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert!(caps.add.as_ref().is_none_or(Vec::is_empty));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let text = serde_json::to_string(&pod).expect("json");
        assert!(!text.contains("NET_ADMIN") && !text.contains("NET_RAW"));
    }
}
