//! AdmissionReview v1 in and out. Whatever goes wrong, the answer admits the pod (with a
//! warning): the mesh never blocks a deployment unless the operator sets `failurePolicy: Fail`,
//! which applies to the webhook being unreachable, not to this code.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::InjectConfig;
use crate::inject::{plan, Decision, Skip};

/// What happened to one review, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Injected,
    Skipped(Skip),
    /// Not a pod CREATE (e.g. an UPDATE): nothing to do.
    Ignored,
    /// Admitted unchanged because of an error (the warning says which).
    Failed(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped(_) => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Failed(_) => "error",
        }
    }
}

/// Answers one AdmissionReview body.
pub fn review(
    body: &[u8],
    namespace_enabled: bool,
    cfg: &InjectConfig,
) -> Result<(Value, Outcome), String> {
    review_in(body, namespace_enabled, false, cfg)
}

/// What a pod gets instead of a sidecar in a namespace whose PodSecurity admission enforces
/// `baseline` or `restricted`: the iptables init container needs NET_ADMIN and NET_RAW, which
/// both levels forbid, so injecting it would make the API server reject the pod.
pub const POD_SECURITY_WARNING: &str = "the namespace enforces PodSecurity baseline or restricted, which forbids the NET_ADMIN and NET_RAW capabilities of the strait-init container: the pod was admitted without the sidecar (install Strait in CNI mode, `strait install --cni`, whose pods need no such container and pass restricted; or label the namespace pod-security.kubernetes.io/enforce=privileged)";

/// [`review`] for a namespace whose PodSecurity level is known to forbid the init container
/// (`pod_security`): such a pod is admitted unchanged, with [`POD_SECURITY_WARNING`].
pub fn review_in(
    body: &[u8],
    namespace_enabled: bool,
    pod_security: bool,
    cfg: &InjectConfig,
) -> Result<(Value, Outcome), String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request = review
        .get("request")
        .ok_or("not an AdmissionReview: no `request`")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("not an AdmissionReview: no `request.uid`")?;
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({"uid": uid, "allowed": true});

    let is_pod = request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    let is_create = request.get("operation").and_then(Value::as_str) == Some("CREATE");
    let outcome = if !(is_pod && is_create) {
        Outcome::Ignored
    } else if let Some(pod) = request.get("object") {
        match decide(pod, namespace_enabled, cfg, &mut response) {
            // In CNI mode the pod has no such container: it passes restricted as injected.
            Outcome::Injected if pod_security && !cfg.cni => {
                // Undo: the patch would make the API server reject the pod.
                if let Some(r) = response.as_object_mut() {
                    r.remove("patch");
                    r.remove("patchType");
                }
                Outcome::Failed(POD_SECURITY_WARNING.into())
            }
            other => other,
        }
    } else {
        Outcome::Failed("the request has no `object`".into())
    };
    if let Outcome::Failed(message) = &outcome {
        response["warnings"] = json!([format!("strait: the sidecar was not injected: {message}")]);
    }
    let answer = json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    });
    Ok((answer, outcome))
}

fn decide(
    pod: &Value,
    namespace_enabled: bool,
    cfg: &InjectConfig,
    response: &mut Value,
) -> Outcome {
    let anchors = match cfg.read_anchors() {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match plan(pod, namespace_enabled, cfg, anchors.as_deref()) {
        Ok(Decision::Inject(ops)) => match serde_json::to_vec(&ops) {
            Ok(bytes) => {
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                Outcome::Injected
            }
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Ok(Decision::Skip(why)) => Outcome::Skipped(why),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// A pod's name for logs: its name, or its `generateName` prefix with `*`.
pub fn pod_name(body: &[u8]) -> String {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let ns = review
        .pointer("/request/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let meta = review.pointer("/request/object/metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| {
            meta.and_then(|m| m.get("generateName"))
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    format!("{ns}/{name}")
}
