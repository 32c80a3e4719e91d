//! The injection itself: decide whether a pod gets the mesh, and build the RFC 6902 JSON Patch
//! that adds it.
//!
//! The pod is handled as raw JSON, not round-tripped through typed structs: the user's
//! containers and volumes are never rewritten, so fields newer than our Kubernetes types survive.
//! Only what Strait adds is built from typed `k8s-openapi` objects.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::config::{InjectConfig, SidecarMode};
use crate::probes;

/// Annotations (and the namespace label) the injector reads and writes.
pub mod annotations {
    /// Namespace label `enabled`: inject every pod. Pod annotation `enabled` / `disabled`:
    /// opt one pod in (in a namespace without the label) or out.
    pub const INJECT: &str = "strait.io/inject";
    /// Written on injected pods.
    pub const INJECTED: &str = "strait.io/injected";
    /// The proxy image injected (for `strait check` and upgrades).
    pub const PROXY_IMAGE: &str = "strait.io/proxy-image";
    pub const SKIP_INBOUND_PORTS: &str = "strait.io/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "strait.io/skip-outbound-ports";
    pub const SKIP_OUTBOUND_CIDRS: &str = "strait.io/skip-outbound-cidrs";
    pub const OPAQUE_PORTS: &str = "strait.io/opaque-ports";
    pub const INBOUND_MODE: &str = "strait.io/inbound-mode";
    /// This pod's default inbound policy (wins over its namespace's and the cluster's).
    pub const DEFAULT_INBOUND_POLICY: &str = "strait.io/default-inbound-policy";
    pub const SIDECAR_MODE: &str = "strait.io/sidecar-mode";
    pub const CPU_REQUEST: &str = "strait.io/proxy-cpu-request";
    pub const CPU_LIMIT: &str = "strait.io/proxy-cpu-limit";
    pub const MEMORY_REQUEST: &str = "strait.io/proxy-memory-request";
    pub const MEMORY_LIMIT: &str = "strait.io/proxy-memory-limit";
    /// `off` or `json`: one JSON line per request on the proxy's stdout.
    pub const ACCESS_LOG: &str = "strait.io/access-log";
    /// Share (0 to 1) of this workload's requests without a parent's decision that are traced.
    pub const TRACE_SAMPLE_RATIO: &str = "strait.io/trace-sample-ratio";
    /// `true` (default) / `false`: the application's HTTP and TCP probes go through the proxy's
    /// admin port, so that they pass on strict ports.
    pub const REWRITE_PROBES: &str = "strait.io/rewrite-probes";
}

pub const PROXY_CONTAINER: &str = "strait-proxy";
pub const INIT_CONTAINER: &str = "strait-init";
pub const TOKEN_VOLUME: &str = "strait-identity-token";
pub const XTABLES_VOLUME: &str = "strait-xtables-lock";
pub const TOKEN_DIR: &str = "/var/run/strait/identity";
pub const INBOUND_PORT: i32 = 4143;
pub const OUTBOUND_PORT: i32 = 4140;
pub const ADMIN_PORT: i32 = 4191;
/// Ports whose inbound traffic never goes through the proxy: its admin port and 4190.
const ALWAYS_SKIPPED_INBOUND: &str = "4190,4191";
/// Lifetime of the projected identity token (the API server refuses under 10 minutes).
const TOKEN_SECONDS: i64 = 86_400;

/// Why a pod was left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    HostNetwork,
    AlreadyInjected,
    OptedOut,
    NotEnabled,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::HostNetwork => "hostNetwork pod",
            Skip::AlreadyInjected => "already injected",
            Skip::OptedOut => "opted out (strait.io/inject: disabled, label or annotation)",
            Skip::NotEnabled => "injection not enabled for this pod or its namespace",
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The JSON Patch operations, paths relative to the pod object.
    Inject(Vec<Value>),
    Skip(Skip),
}

/// Why a pod could not be injected. The webhook still admits the pod, with this as a warning.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}: {message} (got {value:?})")]
    Annotation {
        annotation: &'static str,
        value: String,
        message: &'static str,
    },
    #[error(transparent)]
    RequestAboveLimit(Box<RequestAboveLimit>),
    #[error("the pod has no {0}")]
    Shape(&'static str),
    #[error(
        "cannot read the trust anchors {path}: {message} (--trust-anchors / STRAIT_TRUST_ANCHORS)"
    )]
    Anchors { path: PathBuf, message: String },
}

/// A proxy resource request above its limit, which the API server would reject.
#[derive(Debug, thiserror::Error)]
#[error(
    "annotation {annotation}: the proxy's {resource} request {request} exceeds its limit {limit}{hint}: the API server would reject the pod"
)]
pub struct RequestAboveLimit {
    annotation: &'static str,
    resource: &'static str,
    request: String,
    limit: String,
    /// Says where a limit that was not annotated came from.
    hint: &'static str,
}

/// The pod's own opt-in/out, then the namespace's. `namespace_enabled`: the namespace carries
/// `strait.io/inject=enabled` (the webhook learns it from which of its two paths was called).
pub fn plan(
    pod: &Value,
    namespace_enabled: bool,
    cfg: &InjectConfig,
    anchors_pem: Option<&str>,
) -> Result<Decision, InjectError> {
    let meta = pod.get("metadata").unwrap_or(&Value::Null);
    let spec = pod.get("spec").ok_or(InjectError::Shape("spec"))?;
    let annotations: BTreeMap<String, String> = meta
        .get("annotations")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    // The pod's label (what the webhook's selectors see) or its annotation; the label wins.
    let label = meta
        .get("labels")
        .and_then(|l| l.get(annotations::INJECT))
        .and_then(Value::as_str);
    match label.or(annotations.get(annotations::INJECT).map(String::as_str)) {
        Some("disabled") => return Ok(Decision::Skip(Skip::OptedOut)),
        Some("enabled") => {}
        _ if namespace_enabled => {}
        _ => return Ok(Decision::Skip(Skip::NotEnabled)),
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Decision::Skip(Skip::HostNetwork));
    }
    if annotations.contains_key(annotations::INJECTED) || has_proxy(spec) {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(InjectError::Shape("spec.containers"));
    }
    let options = Options::read(&annotations, cfg)?;
    Ok(Decision::Inject(patch(
        meta,
        spec,
        cfg,
        &options,
        anchors_pem,
    )))
}

fn has_proxy(spec: &Value) -> bool {
    ["initContainers", "containers"].iter().any(|list| {
        spec.get(list)
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == PROXY_CONTAINER))
    })
}

/// Per-pod settings from annotations, validated.
#[derive(Debug)]
struct Options {
    mode: SidecarMode,
    skip_inbound: String,
    skip_outbound: Option<String>,
    skip_cidrs: Option<String>,
    opaque: Option<String>,
    inbound_mode: Option<String>,
    default_inbound_policy: Option<String>,
    cpu_request: String,
    cpu_limit: String,
    memory_request: String,
    memory_limit: String,
    access_log: String,
    trace_sample_ratio: String,
    rewrite_probes: bool,
}

impl Options {
    fn read(a: &BTreeMap<String, String>, cfg: &InjectConfig) -> Result<Self, InjectError> {
        let bad = |annotation: &'static str, value: &str, message: &'static str| {
            InjectError::Annotation {
                annotation,
                value: value.to_string(),
                message,
            }
        };
        let ports = |name: &'static str| -> Result<Option<String>, InjectError> {
            match a.get(name) {
                None => Ok(None),
                Some(v) if valid_port_list(v) => Ok(Some(v.replace(' ', ""))),
                Some(v) => Err(bad(
                    name,
                    v,
                    "expected comma-separated ports or ranges like 25,8000-8100",
                )),
            }
        };
        let quantity = |name: &'static str, default: &str| -> Result<String, InjectError> {
            match a.get(name) {
                None => Ok(default.to_string()),
                Some(v) if valid_quantity(v) => Ok(v.clone()),
                Some(v) => Err(bad(name, v, "expected a quantity like 100m, 1, 64Mi")),
            }
        };
        let mode = match a.get(annotations::SIDECAR_MODE) {
            None => cfg.sidecar_mode,
            Some(v) => SidecarMode::parse(v).ok_or_else(|| {
                bad(
                    annotations::SIDECAR_MODE,
                    v,
                    "expected `native` or `classic`",
                )
            })?,
        };
        let skip_cidrs = match a.get(annotations::SKIP_OUTBOUND_CIDRS) {
            None => None,
            Some(v) if valid_cidr_list(v) => Some(v.replace(' ', "")),
            Some(v) => {
                return Err(bad(
                    annotations::SKIP_OUTBOUND_CIDRS,
                    v,
                    "expected comma-separated CIDRs like 10.0.0.0/8",
                ))
            }
        };
        let default_inbound_policy = match a
            .get(annotations::DEFAULT_INBOUND_POLICY)
            .map(String::as_str)
        {
            None => None,
            Some(
                v
                @ ("all-unauthenticated" | "all-authenticated" | "cluster-authenticated" | "deny"),
            ) => Some(v.to_string()),
            Some(v) => return Err(bad(
                annotations::DEFAULT_INBOUND_POLICY,
                v,
                "expected all-unauthenticated, all-authenticated, cluster-authenticated or deny",
            )),
        };
        let inbound_mode = match a.get(annotations::INBOUND_MODE).map(String::as_str) {
            None => None,
            Some(v @ ("strict" | "permissive")) => Some(v.to_string()),
            Some(v) => {
                return Err(bad(
                    annotations::INBOUND_MODE,
                    v,
                    "expected `strict` or `permissive`",
                ))
            }
        };
        let access_log = match a.get(annotations::ACCESS_LOG).map(String::as_str) {
            None => cfg.access_log.clone(),
            Some(v @ ("off" | "json")) => v.to_string(),
            Some(v) => return Err(bad(annotations::ACCESS_LOG, v, "expected `off` or `json`")),
        };
        let trace_sample_ratio = match a.get(annotations::TRACE_SAMPLE_RATIO) {
            None => cfg.trace_sample_ratio.clone(),
            Some(v) if v.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) => v.clone(),
            Some(v) => {
                return Err(bad(
                    annotations::TRACE_SAMPLE_RATIO,
                    v,
                    "expected a number between 0 and 1, like 0.05",
                ))
            }
        };
        let rewrite_probes = match a.get(annotations::REWRITE_PROBES).map(String::as_str) {
            None | Some("true") => true,
            Some("false") => false,
            Some(v) => {
                return Err(bad(
                    annotations::REWRITE_PROBES,
                    v,
                    "expected `true` or `false`",
                ))
            }
        };
        let mut skip_inbound = ALWAYS_SKIPPED_INBOUND.to_string();
        if let Some(extra) = ports(annotations::SKIP_INBOUND_PORTS)? {
            skip_inbound = format!("{skip_inbound},{extra}");
        }
        let cpu_request = quantity(annotations::CPU_REQUEST, &cfg.proxy_cpu_request)?;
        let cpu_limit = quantity(annotations::CPU_LIMIT, &cfg.proxy_cpu_limit)?;
        let memory_request = quantity(annotations::MEMORY_REQUEST, &cfg.proxy_memory_request)?;
        let memory_limit = quantity(annotations::MEMORY_LIMIT, &cfg.proxy_memory_limit)?;
        // Checked together, as the API server does: a request above its limit rejects the pod.
        for (resource, request, limit, req_name, limit_name) in [
            (
                "cpu",
                &cpu_request,
                &cpu_limit,
                annotations::CPU_REQUEST,
                annotations::CPU_LIMIT,
            ),
            (
                "memory",
                &memory_request,
                &memory_limit,
                annotations::MEMORY_REQUEST,
                annotations::MEMORY_LIMIT,
            ),
        ] {
            if quantity_value(request) > quantity_value(limit) {
                let limit_set = a.contains_key(limit_name);
                return Err(InjectError::RequestAboveLimit(Box::new(
                    RequestAboveLimit {
                        annotation: if a.contains_key(req_name) {
                            req_name
                        } else {
                            limit_name
                        },
                        resource,
                        request: request.clone(),
                        limit: limit.clone(),
                        hint: if limit_set {
                            ""
                        } else {
                            " (the injector's default; annotate the limit too)"
                        },
                    },
                )));
            }
        }
        Ok(Self {
            mode,
            skip_inbound,
            skip_outbound: ports(annotations::SKIP_OUTBOUND_PORTS)?,
            skip_cidrs,
            opaque: ports(annotations::OPAQUE_PORTS)?,
            inbound_mode,
            default_inbound_policy,
            cpu_request,
            cpu_limit,
            memory_request,
            memory_limit,
            access_log,
            trace_sample_ratio,
            rewrite_probes,
        })
    }
}

fn valid_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p > 0)
}

pub fn valid_port_list(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && s.split(',').all(|item| {
            let item = item.trim();
            match item.split_once('-') {
                Some((a, b)) => {
                    valid_port(a) && valid_port(b) && a.parse::<u16>().ok() <= b.parse::<u16>().ok()
                }
                None => valid_port(item),
            }
        })
}

fn valid_cidr_list(s: &str) -> bool {
    !s.trim().is_empty()
        && s.split(',').all(|item| match item.trim().split_once('/') {
            Some((ip, len)) => match (ip.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
                (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
                (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
                _ => false,
            },
            None => false,
        })
}

/// The value of a valid quantity in base units (cores, bytes), for comparisons.
pub fn quantity_value(s: &str) -> f64 {
    const SCALES: [(&str, f64); 14] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let (number, scale) = SCALES
        .iter()
        .find_map(|(suffix, scale)| s.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((s, 1.0));
    number.parse::<f64>().unwrap_or(0.0) * scale
}

/// A Kubernetes quantity: a decimal number with an optional SI or binary suffix.
pub fn valid_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .unwrap_or(s);
    let mut parts = number.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match frac {
        None => digits(int),
        Some(f) => (int.is_empty() || digits(int)) && digits(f),
    }
}

/// JSON Pointer escaping of one path element (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn patch(
    meta: &Value,
    spec: &Value,
    cfg: &InjectConfig,
    o: &Options,
    anchors: Option<&str>,
) -> Vec<Value> {
    // First: these operations use the containers' indices before the proxy is added.
    let probes = if o.rewrite_probes {
        probes::rewrite(spec)
    } else {
        probes::Rewrite::default()
    };
    let mut ops = probes.ops;
    let added = [
        (annotations::INJECTED, "true".to_string()),
        (annotations::PROXY_IMAGE, cfg.proxy_image.clone()),
    ];
    if meta.get("annotations").is_some_and(Value::is_object) {
        for (k, v) in added {
            ops.push(
                json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(k)), "value": v}),
            );
        }
    } else {
        let map: serde_json::Map<String, Value> = added
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": map}));
    }

    // In CNI mode the node's plugin writes the rules: no init container, no xtables lock.
    let mut volumes = Vec::new();
    if !cfg.cni {
        volumes.push(xtables_volume());
    }
    if anchors.is_some() {
        volumes.push(token_volume(&cfg.token_audience));
    }
    if !volumes.is_empty() {
        add_all(&mut ops, spec, "volumes", 0, volumes, true);
    }

    let init = (!cfg.cni).then(|| to_value(init_container(cfg, o)));
    let mut container = proxy_container(cfg, o, anchors, &probes.probes);
    let owner = Owner::of(meta);
    if let Some(envs) = container
        .env
        .as_mut()
        .filter(|_| cfg.trace_collector.is_some())
    {
        envs.push(env(
            "STRAIT_TRACE_SERVICE_NAME",
            format!("{}.$(STRAIT_POD_NAMESPACE)", owner.workload),
        ));
        if !owner.attributes.is_empty() {
            envs.push(env("OTEL_RESOURCE_ATTRIBUTES", owner.attributes.join(",")));
        }
    }
    let proxy = to_value(container);
    match o.mode {
        SidecarMode::Native => {
            let mut first: Vec<Value> = init.into_iter().collect();
            first.push(proxy);
            add_all(&mut ops, spec, "initContainers", 0, first, false);
        }
        SidecarMode::Classic => {
            if let Some(init) = init {
                add_all(&mut ops, spec, "initContainers", 0, vec![init], false);
            }
            add_all(&mut ops, spec, "containers", 0, vec![proxy], false);
        }
    }
    ops
}

/// Adds `items` to the array `spec.<field>`: the whole array when absent (`/-` on a missing
/// array fails), else one by one at `at` (before the user's) or at the end.
fn add_all(
    ops: &mut Vec<Value>,
    spec: &Value,
    field: &str,
    at: usize,
    items: Vec<Value>,
    append: bool,
) {
    if !spec.get(field).is_some_and(Value::is_array) {
        ops.push(json!({"op": "add", "path": format!("/spec/{field}"), "value": items}));
        return;
    }
    for (i, item) in items.into_iter().enumerate() {
        let path = if append {
            format!("/spec/{field}/-")
        } else {
            format!("/spec/{field}/{}", at + i)
        };
        ops.push(json!({"op": "add", "path": path, "value": item}));
    }
}

fn to_value<T: serde::Serialize>(t: T) -> Value {
    // Serializing k8s-openapi structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The workload a pod belongs to, for traces: `service.name` is `<workload>.<namespace>`, and
/// the owner's kind and name go into `OTEL_RESOURCE_ATTRIBUTES` (`k8s.deployment.name`, ...).
#[derive(Debug, PartialEq)]
struct Owner {
    workload: String,
    attributes: Vec<String>,
}

impl Owner {
    /// From the pod's metadata at admission (the name may not exist yet: `generateName`).
    fn of(meta: &Value) -> Self {
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let label = |k: &str| meta.get("labels").and_then(|l| l.get(k)).and_then(text);
        let owner = meta
            .get("ownerReferences")
            .and_then(Value::as_array)
            .and_then(|o| {
                o.iter()
                    .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
                    .or_else(|| o.first())
            })
            .and_then(|r| Some((text(r.get("kind")?)?, text(r.get("name")?)?)));
        let mut attributes = Vec::new();
        let from_owner = match &owner {
            Some((kind, name)) if kind == "ReplicaSet" => {
                attributes.push(format!("k8s.replicaset.name={name}"));
                // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
                let deployment = match label("pod-template-hash") {
                    Some(hash) => name.strip_suffix(&format!("-{hash}")).map(str::to_owned),
                    None => None,
                };
                match deployment {
                    Some(d) => {
                        attributes.push(format!("k8s.deployment.name={d}"));
                        Some(d)
                    }
                    None => Some(name.clone()),
                }
            }
            Some((kind, name)) => {
                let key = match kind.as_str() {
                    "StatefulSet" => Some("k8s.statefulset.name"),
                    "DaemonSet" => Some("k8s.daemonset.name"),
                    "Job" => Some("k8s.job.name"),
                    _ => None,
                };
                if let Some(key) = key {
                    attributes.push(format!("{key}={name}"));
                }
                Some(name.clone())
            }
            None => None,
        };
        let workload = from_owner
            .or_else(|| label("app.kubernetes.io/name"))
            .or_else(|| label("app"))
            .or_else(|| {
                meta.get("generateName")
                    .and_then(text)
                    .map(|g| g.trim_end_matches('-').to_owned())
            })
            .or_else(|| meta.get("name").and_then(text))
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "$(STRAIT_POD_NAME)".to_string());
        Self {
            workload,
            attributes,
        }
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

fn resources(cpu: (&str, &str), memory: (&str, &str)) -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(
            [("cpu".into(), q(cpu.0)), ("memory".into(), q(memory.0))]
                .into_iter()
                .collect(),
        ),
        limits: Some(
            [("cpu".into(), q(cpu.1)), ("memory".into(), q(memory.1))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    }
}

fn init_container(cfg: &InjectConfig, o: &Options) -> Container {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        cfg.proxy_uid.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--skip-inbound-ports".into(),
        o.skip_inbound.clone(),
    ];
    if let Some(p) = &o.skip_outbound {
        args.extend(["--skip-outbound-ports".into(), p.clone()]);
    }
    if let Some(c) = &o.skip_cidrs {
        args.extend(["--skip-outbound-cidrs".into(), c.clone()]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec!["strait-proxy".into()]),
        args: Some(args),
        // iptables takes its lock under /run, which a read-only root cannot hold.
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(resources(("10m", "100m"), ("10Mi", "50Mi"))),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: failures,
        ..Default::default()
    }
}

fn proxy_container(
    cfg: &InjectConfig,
    o: &Options,
    anchors: Option<&str>,
    app_probes: &BTreeMap<String, Value>,
) -> Container {
    let mut envs = vec![
        env_field("STRAIT_POD_NAME", "metadata.name"),
        env_field("STRAIT_POD_IP", "status.podIP"),
        env_field("STRAIT_POD_NAMESPACE", "metadata.namespace"),
        env_field("STRAIT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env(
            "STRAIT_WORKLOAD",
            "$(STRAIT_POD_NAMESPACE)/$(STRAIT_POD_NAME)",
        ),
        env("STRAIT_CONTROL_PLANE_ADDR", cfg.control_plane_addr.clone()),
    ];
    if let Some(pem) = anchors {
        envs.extend([
            env("STRAIT_IDENTITY_ADDR", cfg.identity_addr.clone()),
            env(
                "STRAIT_IDENTITY_SERVER_NAME",
                cfg.identity_server_name.clone(),
            ),
            env(
                "STRAIT_IDENTITY",
                format!(
                    "spiffe://{}/ns/$(STRAIT_POD_NAMESPACE)/sa/$(STRAIT_SERVICE_ACCOUNT)",
                    cfg.trust_domain
                ),
            ),
            env("STRAIT_IDENTITY_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
            env("STRAIT_TRUST_ANCHORS_PEM", pem),
        ]);
    }
    if let Some(p) = &o.opaque {
        envs.push(env("STRAIT_OPAQUE_PORTS", p.clone()));
    }
    if let Some(p) = &o.default_inbound_policy {
        envs.push(env("STRAIT_DEFAULT_INBOUND_POLICY", p.clone()));
    }
    if let Some(m) = &o.inbound_mode {
        envs.push(env("STRAIT_INBOUND_MODE", m.clone()));
    }
    if let Some(collector) = &cfg.trace_collector {
        envs.push(env("STRAIT_TRACE_COLLECTOR", collector.clone()));
        envs.push(env(
            "STRAIT_TRACE_SAMPLE_RATIO",
            o.trace_sample_ratio.clone(),
        ));
    }
    if !app_probes.is_empty() {
        envs.push(env("STRAIT_APP_PROBES", to_value(app_probes).to_string()));
    }
    if o.access_log != "off" {
        envs.push(env("STRAIT_ACCESS_LOG", o.access_log.clone()));
    }
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let (restart_policy, lifecycle) = match o.mode {
        SidecarMode::Native => (Some("Always".to_string()), None),
        // The kubelet starts containers in order and runs each postStart hook before the next
        // container: the application starts once the proxy is ready.
        SidecarMode::Classic => (
            None,
            Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec![
                            "strait-proxy".into(),
                            "await-ready".into(),
                            "--timeout".into(),
                            "120s".into(),
                        ]),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    };
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        command: Some(vec!["strait-proxy".into(), "run".into()]),
        restart_policy,
        lifecycle,
        ports: Some(vec![
            port("strait-inbound", INBOUND_PORT),
            port("strait-admin", ADMIN_PORT),
        ]),
        env: Some(envs),
        startup_probe: Some(http_probe("/ready", 1, Some(120))),
        readiness_probe: Some(http_probe("/ready", 5, None)),
        liveness_probe: Some(http_probe("/live", 10, None)),
        // PodSecurity `restricted` as it is: non-root, no capabilities, no escalation, the
        // runtime's default seccomp profile.
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        resources: Some(resources(
            (&o.cpu_request, &o.cpu_limit),
            (&o.memory_request, &o.memory_limit),
        )),
        volume_mounts: anchors.map(|_| {
            vec![VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]
        }),
        ..Default::default()
    }
}

fn token_volume(audience: &str) -> Value {
    to_value(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(audience.into()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn xtables_volume() -> Value {
    json!({"name": XTABLES_VOLUME, "emptyDir": {}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_values_are_checked() {
        assert!(valid_port_list("25,8000-8100, 9090"));
        assert!(!valid_port_list("25,,26"));
        assert!(!valid_port_list("9000-80"));
        assert!(!valid_port_list("70000"));
        assert!(valid_quantity("100m") && valid_quantity("1") && valid_quantity("64Mi"));
        assert!(valid_quantity("0.5") && valid_quantity("1.5Gi"));
        assert!(!valid_quantity("lots") && !valid_quantity("") && !valid_quantity("1.2.3"));
        assert!(valid_cidr_list("10.0.0.0/8,fd00::/8"));
        assert!(!valid_cidr_list("10.0.0.0") && !valid_cidr_list("10.0.0.0/33"));
    }

    #[test]
    fn a_bad_annotation_is_an_error_naming_it() {
        let pod = json!({"metadata": {"annotations": {"strait.io/proxy-cpu-limit": "lots"}},
            "spec": {"containers": [{"name": "app"}]}});
        let err = plan(&pod, true, &InjectConfig::defaults(), None).expect_err("bad quantity");
        assert!(
            err.to_string().contains("strait.io/proxy-cpu-limit"),
            "{err}"
        );
    }

    #[test]
    fn a_request_above_its_limit_is_refused_naming_the_annotation() {
        let plan_with = |annotations: Value| {
            let pod = json!({"metadata": {"annotations": annotations},
                "spec": {"containers": [{"name": "app"}]}});
            plan(&pod, true, &InjectConfig::defaults(), None)
        };
        // The issue's case: a request alone, above the default limit of 128Mi.
        let err = plan_with(json!({"strait.io/proxy-memory-request": "256Mi"}))
            .expect_err("256Mi > 128Mi");
        let msg = err.to_string();
        assert!(
            msg.contains("strait.io/proxy-memory-request")
                && msg.contains("256Mi")
                && msg.contains("128Mi")
                && msg.contains("default"),
            "{msg}"
        );
        let err = plan_with(json!({"strait.io/proxy-cpu-limit": "10m"})).expect_err("50m > 10m");
        assert!(
            err.to_string().contains("strait.io/proxy-cpu-limit"),
            "{err}"
        );
        // Consistent pairs, and units that differ, are fine.
        assert!(plan_with(json!({"strait.io/proxy-memory-request": "256Mi",
            "strait.io/proxy-memory-limit": "1Gi"}))
        .is_ok());
        assert!(plan_with(json!({"strait.io/proxy-cpu-request": "1",
            "strait.io/proxy-cpu-limit": "1000m"}))
        .is_ok());
    }

    #[test]
    fn quantities_compare_across_units() {
        assert_eq!(quantity_value("1Gi"), 1024.0 * quantity_value("1Mi"));
        assert!(quantity_value("500m") < quantity_value("1"));
        assert!(quantity_value("0.5") == quantity_value("500m"));
        assert!(quantity_value("129M") < quantity_value("128Mi") * 1.01);
    }

    #[test]
    fn pointer_escaping() {
        assert_eq!(escape("strait.io/injected"), "strait.io~1injected");
        assert_eq!(escape("a~b"), "a~0b");
    }

    #[test]
    fn a_pods_default_inbound_policy_reaches_its_proxy() {
        let pod = json!({"metadata": {"annotations": {"strait.io/default-inbound-policy": "deny"}},
            "spec": {"containers": [{"name": "app"}]}});
        let Decision::Inject(patch) =
            plan(&pod, true, &InjectConfig::defaults(), None).expect("plan")
        else {
            panic!("injected")
        };
        let text = serde_json::to_string(&patch).expect("json");
        assert!(
            text.contains(r#"{"name":"STRAIT_DEFAULT_INBOUND_POLICY","value":"deny"}"#),
            "{text}"
        );
        let bad = json!({"metadata": {"annotations": {"strait.io/default-inbound-policy": "allow"}},
            "spec": {"containers": [{"name": "app"}]}});
        let err = plan_err(&bad);
        assert!(err.contains("strait.io/default-inbound-policy"), "{err}");
    }

    fn plan_err(pod: &Value) -> String {
        plan(pod, true, &InjectConfig::defaults(), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn the_workload_of_a_pod_names_its_traces() {
        let deployment = json!({
            "generateName": "web-5d9f8c7b6-",
            "labels": {"app": "web", "pod-template-hash": "5d9f8c7b6"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d9f8c7b6", "controller": true}]
        });
        assert_eq!(
            Owner::of(&deployment),
            Owner {
                workload: "web".into(),
                attributes: vec![
                    "k8s.replicaset.name=web-5d9f8c7b6".into(),
                    "k8s.deployment.name=web".into()
                ]
            }
        );
        let sts =
            json!({"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db"}]});
        assert_eq!(Owner::of(&sts).workload, "db");
        assert_eq!(Owner::of(&sts).attributes, ["k8s.statefulset.name=db"]);
        assert_eq!(
            Owner::of(&json!({"labels": {"app.kubernetes.io/name": "api"}})).workload,
            "api"
        );
        assert_eq!(Owner::of(&json!({"name": "lonely"})).workload, "lonely");
        assert_eq!(Owner::of(&json!({})).workload, "$(STRAIT_POD_NAME)");
    }
}
