//! `strait install`: every manifest a cluster needs, so `strait install | kubectl apply -f -`
//! installs the mesh.
//!
//! The control plane reads the API (least-privilege ClusterRole: read the mesh's kinds, create
//! TokenReviews) and gets the issuer as a mounted Secret (no right to read Secrets). The
//! injector needs no API access at all: two webhook entries tell it whether a pod's namespace
//! is labelled.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{json, Value};
use strait_identity::ca;

/// Who owns a CRD: Strait's own are always installed; the SMI and Gateway API ones may already
/// be there (another mesh, Flagger, the Gateway API bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrdOwner {
    Strait,
    Smi,
    GatewayApi,
}

const CRDS: [(CrdOwner, &str); 6] = [
    (
        CrdOwner::Strait,
        include_str!("../../install/crds/authorizationpolicies.yaml"),
    ),
    (
        CrdOwner::Strait,
        include_str!("../../install/crds/httplocalratelimitpolicies.yaml"),
    ),
    (
        CrdOwner::Strait,
        include_str!("../../install/crds/httpfaults.yaml"),
    ),
    (
        CrdOwner::Smi,
        include_str!("../../install/crds/trafficsplits.yaml"),
    ),
    (
        CrdOwner::Smi,
        include_str!("../../install/crds/httproutegroups.yaml"),
    ),
    (
        CrdOwner::GatewayApi,
        include_str!("../../install/crds/grpcroutes.yaml"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Image with every Strait binary.
    #[arg(long, default_value = strait_injector::config::DEFAULT_IMAGE)]
    pub image: String,
    /// Namespace of the control plane and the injector.
    #[arg(long, default_value = "strait-system")]
    pub namespace: String,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Trust anchors (PEM bundle). Without it, a new anchor and issuer are generated (fine
    /// for trying Strait; production installs bring their own, see docs/identity.md).
    #[arg(long, requires_all = ["issuer_cert", "issuer_key"])]
    pub anchors: Option<PathBuf>,
    /// Issuer certificate (PEM), signed by one of the anchors.
    #[arg(long, requires = "anchors")]
    pub issuer_cert: Option<PathBuf>,
    /// Issuer key (PEM).
    #[arg(long, requires = "anchors")]
    pub issuer_key: Option<PathBuf>,
    /// Replicas of the control plane and the injector.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
    /// Sidecar mode: native (Kubernetes 1.29+) or classic (older clusters).
    #[arg(long, default_value = "native", value_parser = ["native", "classic"])]
    pub sidecar_mode: String,
    /// Lifetime of workload certificates.
    #[arg(long, default_value = "24h")]
    pub leaf_lifetime: String,
    /// What a port no AuthorizationPolicy selects allows, cluster-wide (namespaces override it
    /// with the annotation `strait.io/default-inbound-policy`, pods with the same annotation).
    #[arg(long, default_value = "all-unauthenticated", value_parser = ["all-unauthenticated", "all-authenticated", "cluster-authenticated", "deny"])]
    pub default_inbound_policy: String,
    /// `Fail` blocks pod creation while the injector is down; the default admits pods without
    /// the sidecar.
    #[arg(long, default_value = "Ignore", value_parser = ["Ignore", "Fail"])]
    pub failure_policy: String,
    /// Leave out the SMI CRDs (TrafficSplit, HTTPRouteGroup), e.g. when Flagger or another mesh
    /// already installed them.
    #[arg(long)]
    pub skip_smi_crds: bool,
    /// Leave out the GRPCRoute CRD, e.g. when the Gateway API's own CRDs (standard channel
    /// v1.1 or later) are installed.
    #[arg(long)]
    pub skip_gateway_api_crds: bool,
    /// OpenTelemetry collector the proxies send spans to, OTLP/gRPC (`http://host:4317`).
    #[arg(long)]
    pub trace_collector: Option<String>,
    /// Share of requests without a parent's decision that the proxies trace.
    #[arg(long, default_value = "0.01")]
    pub trace_sample_ratio: String,
    /// Access log of every proxy: `off` or `json` (pods can override with
    /// `strait.io/access-log`).
    #[arg(long, default_value = "off", value_parser = ["off", "json"])]
    pub access_log: String,
    /// CNI mode: a DaemonSet chains the `strait-cni` plugin into each node's CNI
    /// configuration, and injected pods get no `strait-init` container (no NET_ADMIN/NET_RAW:
    /// they pass PodSecurity `restricted`).
    #[arg(long)]
    pub cni: bool,
    /// CNI mode: the node's CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: String,
    /// CNI mode: the node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: String,
    /// Generate a new trust anchor, issuer and webhook certificate even when the cluster
    /// (`KUBECONFIG`) already runs Strait: a root rotation by replacement, which breaks mTLS
    /// between pods started before and after it (docs/identity.md has the rotation without
    /// downtime). Without it, an existing install's PKI is kept.
    #[arg(long, conflicts_with = "anchors")]
    pub fresh_pki: bool,
    /// Where the existing install is looked up: never (`offline`: always new PKI unless
    /// --anchors is given) or the current `KUBECONFIG` context (`cluster`, the default).
    #[arg(long, default_value = "cluster", value_parser = ["cluster", "offline"])]
    pub existing: String,
}

struct Pki {
    anchors: String,
    issuer_cert: String,
    issuer_key: String,
    webhook: ca::ServingPki,
}

fn pki(args: &InstallArgs) -> anyhow::Result<Pki> {
    let (anchors, issuer_cert, issuer_key) = match (
        &args.anchors,
        &args.issuer_cert,
        &args.issuer_key,
    ) {
        (Some(a), Some(c), Some(k)) => {
            let read = |p: &PathBuf, flag: &str| {
                std::fs::read_to_string(p).with_context(|| format!("{flag} {}", p.display()))
            };
            let (a, c, k) = (
                read(a, "--anchors")?,
                read(c, "--issuer-cert")?,
                read(k, "--issuer-key")?,
            );
            ca::CertificateAuthority::from_pem(&c, &k)
                .context("--issuer-cert/--issuer-key are not a usable issuer")?;
            (a, c, k)
        }
        _ if !args.fresh_pki && args.existing == "cluster" => match existing_pki(args) {
            Ok(Some(existing)) => {
                eprintln!(
                        "strait install: keeping the cluster's trust anchors, issuer and webhook certificate (namespace {}); --fresh-pki replaces them",
                        args.namespace
                    );
                return Ok(existing);
            }
            Ok(None) => generate(args)?,
            Err(e) => {
                eprintln!(
                        "strait install: could not look for an existing install ({e:#}); generated a NEW trust anchor. Applying this to a cluster that runs Strait would replace its root: fix KUBECONFIG, or say --existing offline / --fresh-pki to mean it"
                    );
                generate(args)?
            }
        },
        _ => generate(args)?,
    };
    let service = format!("strait-injector.{}.svc", args.namespace);
    let webhook = ca::generate_serving(
        "strait-injector-ca",
        &[
            service.clone(),
            format!("{service}.{}", args.cluster_domain),
        ],
        Duration::from_secs(10 * 365 * 86_400),
    )?;
    Ok(Pki {
        anchors,
        issuer_cert,
        issuer_key,
        webhook,
    })
}

/// A new anchor and issuer.
fn generate(args: &InstallArgs) -> anyhow::Result<(String, String, String)> {
    let generated = ca::generate(
        &args.trust_domain,
        Duration::from_secs(10 * 365 * 86_400),
        Duration::from_secs(365 * 86_400),
    )?;
    Ok((
        generated.anchor_cert_pem,
        generated.issuer_cert_pem,
        generated.issuer_key_pem,
    ))
}

/// The PKI of the install already in the cluster (`KUBECONFIG`), if there is one: the anchors
/// ConfigMap, the issuer Secret, the injector's serving Secret and the webhook's caBundle.
/// `None` when the cluster has no Strait yet; an error when it cannot be asked (or the install
/// there is incomplete, which needs an operator's eye).
fn existing_pki(args: &InstallArgs) -> anyhow::Result<Option<Pki>> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let ns = args.namespace.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let lookup = async {
            let client = kube::Client::try_default().await?;
            let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), &ns);
            let Some(anchors) = configmaps.get_opt("strait-trust-anchors").await? else {
                return Ok(None);
            };
            let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), &ns);
            let field = |s: &Secret, key: &str| -> anyhow::Result<String> {
                s.data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| String::from_utf8_lossy(&b.0).to_string())
                    .with_context(|| {
                        format!("Secret {} has no {key}", s.metadata.name.as_deref().unwrap_or("?"))
                    })
            };
            let issuer = secrets
                .get_opt("strait-issuer")
                .await?
                .context("the cluster has the anchors but no Secret strait-issuer")?;
            let serving = secrets
                .get_opt("strait-injector-tls")
                .await?
                .context("the cluster has the anchors but no Secret strait-injector-tls")?;
            let webhooks: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client);
            let ca_bundle = webhooks
                .get_opt("strait-injector")
                .await?
                .and_then(|w| w.webhooks?.into_iter().next()?.client_config.ca_bundle)
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
                .context("the cluster has the anchors but no caBundle in MutatingWebhookConfiguration strait-injector")?;
            let pki = Pki {
                anchors: anchors
                    .data
                    .as_ref()
                    .and_then(|d| d.get("ca-bundle.crt"))
                    .cloned()
                    .context("ConfigMap strait-trust-anchors has no ca-bundle.crt")?,
                issuer_cert: field(&issuer, "tls.crt")?,
                issuer_key: field(&issuer, "tls.key")?,
                webhook: ca::ServingPki {
                    ca_cert_pem: ca_bundle,
                    cert_pem: field(&serving, "tls.crt")?,
                    key_pem: field(&serving, "tls.key")?,
                },
            };
            ca::CertificateAuthority::from_pem(&pki.issuer_cert, &pki.issuer_key)
                .context("the cluster's issuer is not usable")?;
            Ok::<_, anyhow::Error>(Some(pki))
        };
        tokio::time::timeout(Duration::from_secs(10), lookup)
            .await
            .map_err(|_| anyhow::anyhow!("the Kubernetes API did not answer within 10 s"))?
    })
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": "strait",
           "app.kubernetes.io/version": env!("CARGO_PKG_VERSION")})
}

fn meta(name: &str, namespace: &str, component: &str) -> Value {
    json!({"name": name, "namespace": namespace, "labels": labels(component)})
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The restrictive container settings every Strait container runs with.
fn container_security() -> Value {
    json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
           "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}})
}

fn deployment(
    args: &InstallArgs,
    name: &str,
    uid: i64,
    container: Value,
    volumes: Value,
    sa_token: bool,
) -> Value {
    let ns = &args.namespace;
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(name, ns, name),
        "spec": {
            "replicas": args.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {"strait.io/inject": "disabled",
                                    "prometheus.io/scrape": "true",
                                    "prometheus.io/port": admin_port(&container)},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": sa_token,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": uid, "runAsGroup": uid,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}}]}},
                    "containers": [container],
                    "volumes": volumes,
                }
            }
        }
    })
}

/// The container's `admin` port, as the `prometheus.io/port` annotation wants it.
fn admin_port(container: &Value) -> String {
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "admin"))
        .map(|p| p["containerPort"].to_string())
        .unwrap_or_default()
}

fn probes(port: &str) -> (Value, Value) {
    (
        json!({"httpGet": {"path": "/ready", "port": port}, "periodSeconds": 5}),
        json!({"httpGet": {"path": "/live", "port": port}, "periodSeconds": 10, "failureThreshold": 3}),
    )
}

fn control_plane(args: &InstallArgs) -> Value {
    let (ready, live) = probes("admin");
    let container = json!({
        "name": "control-plane",
        "image": args.image,
        "command": ["strait-control-plane"],
        "args": ["--kubernetes",
                 format!("--trust-domain={}", args.trust_domain),
                 format!("--cluster-domain={}", args.cluster_domain),
                 "--issuer-cert=/var/run/strait/issuer/tls.crt",
                 "--issuer-key=/var/run/strait/issuer/tls.key",
                 "--trust-anchors=/var/run/strait/anchors/ca-bundle.crt",
                 format!("--identity-server-name=identity.{}.svc.{}", args.namespace, args.cluster_domain),
                 format!("--leaf-lifetime={}", args.leaf_lifetime),
                 format!("--default-inbound-policy={}", args.default_inbound_policy)],
        "ports": [{"name": "discovery", "containerPort": 8086, "protocol": "TCP"},
                  {"name": "identity", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "admin", "containerPort": 9990, "protocol": "TCP"}],
        "readinessProbe": ready, "livenessProbe": live,
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "issuer", "mountPath": "/var/run/strait/issuer", "readOnly": true},
                         {"name": "anchors", "mountPath": "/var/run/strait/anchors", "readOnly": true}],
    });
    deployment(
        args,
        "strait-control-plane",
        2103,
        container,
        json!([{"name": "issuer", "secret": {"secretName": "strait-issuer"}},
               {"name": "anchors", "configMap": {"name": "strait-trust-anchors"}}]),
        true,
    )
}

fn injector(args: &InstallArgs) -> Value {
    let (ready, live) = probes("admin");
    let ns = &args.namespace;
    let domain = &args.cluster_domain;
    let mut injector_args = vec![
        "--tls-cert=/var/run/strait/tls/tls.crt".to_string(),
        "--tls-key=/var/run/strait/tls/tls.key".into(),
        "--trust-anchors=/var/run/strait/anchors/ca-bundle.crt".into(),
        format!("--proxy-image={}", args.image),
        format!("--trust-domain={}", args.trust_domain),
        format!("--sidecar-mode={}", args.sidecar_mode),
        format!("--control-plane-addr=strait-control-plane.{ns}.svc.{domain}:8086"),
        format!("--identity-addr=strait-identity.{ns}.svc.{domain}:8080"),
        format!("--identity-server-name=identity.{ns}.svc.{domain}"),
        format!("--trace-sample-ratio={}", args.trace_sample_ratio),
        format!("--access-log={}", args.access_log),
    ];
    if let Some(collector) = &args.trace_collector {
        injector_args.push(format!("--trace-collector={collector}"));
    }
    if args.cni {
        injector_args.push("--cni".into());
    }
    let container = json!({
        "name": "injector",
        "image": args.image,
        "command": ["strait-injector"],
        "args": injector_args,
        "ports": [{"name": "webhook", "containerPort": 8443, "protocol": "TCP"},
                  {"name": "admin", "containerPort": 9995, "protocol": "TCP"}],
        "readinessProbe": ready, "livenessProbe": live,
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tls", "mountPath": "/var/run/strait/tls", "readOnly": true},
                         {"name": "anchors", "mountPath": "/var/run/strait/anchors", "readOnly": true}],
    });
    deployment(
        args,
        "strait-injector",
        2104,
        container,
        json!([{"name": "tls", "secret": {"secretName": "strait-injector-tls"}},
               {"name": "anchors", "configMap": {"name": "strait-trust-anchors"}}]),
        false,
    )
}

/// The namespace of the CNI DaemonSet (PodSecurity `privileged`: it writes host paths).
const CNI_NAMESPACE: &str = "strait-cni";

/// CNI mode: on every node, a pod that copies `strait-cni` into the CNI binary directory and
/// chains it into the node's configuration list (and takes it out when it stops). It needs
/// no API access: pod annotations reach the plugin from the runtime.
fn cni_daemonset(args: &InstallArgs) -> Value {
    let ns = CNI_NAMESPACE;
    let name = "strait-cni";
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta(name, ns, name),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(name), "annotations": {"strait.io/inject": "disabled"}},
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "install-cni",
                        "image": args.image,
                        "command": ["strait-cni", "install", "--bin-dir", "/host/opt/cni/bin", "--conf-dir", "/host/etc/cni/net.d"],
                        "lifecycle": {"preStop": {"exec": {"command": ["strait-cni", "install", "--uninstall", "--conf-dir", "/host/etc/cni/net.d"]}}},
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                        // Writes root-owned host directories: root, but no capabilities beyond
                        // the defaults and a read-only root filesystem.
                        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "volumeMounts": [{"name": "cni-bin", "mountPath": "/host/opt/cni/bin"},
                                         {"name": "cni-conf", "mountPath": "/host/etc/cni/net.d"}],
                    }],
                    "volumes": [{"name": "cni-bin", "hostPath": {"path": args.cni_bin_dir, "type": "DirectoryOrCreate"}},
                                {"name": "cni-conf", "hostPath": {"path": args.cni_conf_dir, "type": "DirectoryOrCreate"}}],
                }
            }
        }
    })
}

fn service(ns: &str, name: &str, component: &str, ports: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(name, ns, component),
           "spec": {"type": "ClusterIP", "selector": {"app.kubernetes.io/name": component}, "ports": ports}})
}

fn webhook_entry(
    args: &InstallArgs,
    name: &str,
    path: &str,
    (namespaces, pods): (Value, Value),
    ca_bundle: &str,
) -> Value {
    json!({
        "name": name,
        "clientConfig": {"service": {"name": "strait-injector", "namespace": args.namespace,
                                     "path": path, "port": 443},
                         "caBundle": ca_bundle},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "namespaceSelector": namespaces,
        "objectSelector": pods,
        "failurePolicy": args.failure_policy,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 10,
        "reinvocationPolicy": "Never",
    })
}

/// Every document, in apply order.
/// Grafana dashboards, by file name.
pub const DASHBOARDS: [(&str, &str); 4] = [
    (
        "strait-mesh.json",
        include_str!("../../install/grafana/strait-mesh.json"),
    ),
    (
        "strait-service.json",
        include_str!("../../install/grafana/strait-service.json"),
    ),
    (
        "strait-route.json",
        include_str!("../../install/grafana/strait-route.json"),
    ),
    (
        "strait-proxy.json",
        include_str!("../../install/grafana/strait-proxy.json"),
    ),
];

/// The Prometheus scrape configuration for the proxies and the control plane.
pub const PROMETHEUS_CONFIG: &str = include_str!("../../install/prometheus/prometheus.yml");

/// The dashboards (a ConfigMap Grafana's dashboard sidecar picks up by its label) and the
/// scrape configuration.
fn observability(ns: &str) -> [Value; 2] {
    let dashboards: serde_json::Map<String, Value> = DASHBOARDS
        .iter()
        .map(|(name, json)| (name.to_string(), Value::String(json.to_string())))
        .collect();
    let mut dashboards_meta = meta("strait-grafana-dashboards", ns, "strait-control-plane");
    dashboards_meta["labels"]["grafana_dashboard"] = json!("1");
    [
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": dashboards_meta,
               "data": dashboards}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": meta("strait-prometheus", ns, "strait-control-plane"),
               "data": {"prometheus.yml": PROMETHEUS_CONFIG}}),
    ]
}

pub fn manifests(args: &InstallArgs) -> anyhow::Result<Vec<Value>> {
    let ns = args.namespace.as_str();
    let pki = pki(args)?;
    let mut docs: Vec<Value> = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "strait",
                                            "strait.io/inject": "disabled"}}
    })];
    if args.cni {
        // The CNI installer writes host directories (hostPath): the one privileged part, in a
        // namespace of its own so the control plane's stays restricted.
        docs.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": CNI_NAMESPACE, "labels": {"app.kubernetes.io/part-of": "strait",
                                                     "strait.io/inject": "disabled",
                                                     "pod-security.kubernetes.io/enforce": "privileged"}}
        }));
        docs.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": meta("strait-cni", CNI_NAMESPACE, "strait-cni"),
                         "automountServiceAccountToken": false}));
        docs.push(cni_daemonset(args));
    }
    for (owner, crd) in CRDS {
        let skip = match owner {
            CrdOwner::Strait => false,
            CrdOwner::Smi => args.skip_smi_crds,
            CrdOwner::GatewayApi => args.skip_gateway_api_crds,
        };
        if skip {
            continue;
        }
        docs.push(serde_yaml_ng::from_str(crd).context("an embedded CRD")?);
    }
    let mesh_kinds = json!([
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["split.smi-spec.io"], "resources": ["trafficsplits"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["specs.smi-spec.io"], "resources": ["httproutegroups"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes", "referencegrants"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch"]},
        {"apiGroups": ["policy.strait.io"], "resources": ["authorizationpolicies", "httplocalratelimitpolicies", "httpfaults"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    ]);
    docs.extend([
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": meta("strait-control-plane", ns, "strait-control-plane")}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": meta("strait-injector", ns, "strait-injector"),
               "automountServiceAccountToken": false}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "strait-control-plane", "labels": labels("strait-control-plane")},
               "rules": mesh_kinds}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "strait-control-plane", "labels": labels("strait-control-plane")},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "strait-control-plane"},
               "subjects": [{"kind": "ServiceAccount", "name": "strait-control-plane", "namespace": ns}]}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": meta("strait-trust-anchors", ns, "strait-control-plane"),
               "data": {"ca-bundle.crt": pki.anchors}}),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": meta("strait-issuer", ns, "strait-control-plane"),
               "data": {"tls.crt": b64(&pki.issuer_cert), "tls.key": b64(&pki.issuer_key)}}),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": meta("strait-injector-tls", ns, "strait-injector"),
               "data": {"tls.crt": b64(&pki.webhook.cert_pem), "tls.key": b64(&pki.webhook.key_pem),
                        "ca.crt": b64(&pki.webhook.ca_cert_pem)}}),
        control_plane(args),
        service(ns, "strait-control-plane", "strait-control-plane", json!([
            {"name": "grpc-discovery", "port": 8086, "targetPort": "discovery", "appProtocol": "grpc"}])),
        service(ns, "strait-identity", "strait-control-plane", json!([
            {"name": "grpc-identity", "port": 8080, "targetPort": "identity", "appProtocol": "grpc"}])),
        injector(args),
        service(ns, "strait-injector", "strait-injector", json!([
            {"name": "webhook", "port": 443, "targetPort": "webhook"}])),
    ]);
    for name in ["strait-control-plane", "strait-injector"] {
        docs.push(json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(name, ns, name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}}));
    }
    docs.extend(observability(ns));
    let ca_bundle = b64(&pki.webhook.ca_cert_pem);
    let system = json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                        "values": ["kube-system", "kube-node-lease", "kube-public", ns]});
    // The API server calls the webhook only for pods that asked for the mesh: with
    // `--failure-policy Fail` and the injector down, every other pod is still admitted.
    // In a labelled namespace: every pod but those labelled out. Elsewhere: only pods
    // labelled `strait.io/inject=enabled` (a label, since selectors cannot read
    // annotations). Namespaces whose PodSecurity level forbids the init container's
    // capabilities reach their own paths, where pods are admitted unchanged with a warning
    // instead of being rejected by the API server.
    let webhooks: Vec<Value> = [
        (("inject.strait.io", "/inject"), true, false),
        (("inject-pod-security.inject.strait.io", "/inject-pod-security"), true, true),
        (("opt-in.inject.strait.io", "/inject-opt-in"), false, false),
        (("opt-in-pod-security.inject.strait.io", "/inject-opt-in-pod-security"), false, true),
    ].into_iter().map(|((name, path), enabled, pod_security)| {
        let mut namespaces = vec![
            if enabled {
                json!({"key": "strait.io/inject", "operator": "In", "values": ["enabled"]})
            } else {
                json!({"key": "strait.io/inject", "operator": "NotIn", "values": ["enabled", "disabled"]})
            },
            system.clone(),
        ];
        namespaces.push(json!({"key": "pod-security.kubernetes.io/enforce",
            "operator": if pod_security { "In" } else { "NotIn" },
            "values": ["baseline", "restricted"]}));
        let pods = if enabled {
            json!({"matchExpressions": [{"key": "strait.io/inject", "operator": "NotIn", "values": ["disabled"]}]})
        } else {
            json!({"matchLabels": {"strait.io/inject": "enabled"}})
        };
        webhook_entry(args, name, path, (json!({"matchExpressions": namespaces}), pods), &ca_bundle)
    }).collect::<Vec<_>>();
    docs.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "strait-injector", "labels": labels("strait-injector")},
        "webhooks": webhooks
    }));
    Ok(docs)
}

/// Prints every manifest as one multi-document YAML stream.
pub fn run(args: &InstallArgs) -> anyhow::Result<()> {
    let docs = manifests(args)?;
    let mut out = String::from("# Strait: `strait install | kubectl apply -f -`\n");
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc)?);
    }
    print!("{out}");
    Ok(())
}
