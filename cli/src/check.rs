//! `strait check`: is the mesh installed and healthy in the cluster `kubectl` points at?
//!
//! Each check prints one line; any failure makes the command exit 1, with a hint.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Namespace of the control plane.
    #[arg(long, default_value = "strait-system")]
    pub namespace: String,
    /// Certificates expiring sooner than this fail the check.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub min_validity: Duration,
}

/// One result line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub ok: bool,
    pub what: String,
    pub detail: String,
}

fn line(ok: bool, what: impl Into<String>, detail: impl Into<String>) -> Line {
    Line {
        ok,
        what: what.into(),
        detail: detail.into(),
    }
}

fn expiry(what: &str, pem: &str, min: Duration) -> Line {
    match strait_identity::ca::pem_not_after(pem) {
        Ok(not_after) => {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let days = left.as_secs() / 86_400;
            if left >= min {
                line(true, what, format!("valid for {days} more days"))
            } else {
                line(
                    false,
                    what,
                    format!("expires in {days} days: rotate it (docs/identity.md)"),
                )
            }
        }
        Err(e) => line(false, what, format!("unreadable: {e}")),
    }
}

/// Runs every check against the cluster of `client`.
pub async fn checks(client: kube::Client, args: &CheckArgs) -> Vec<Line> {
    let ns = args.namespace.as_str();
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => out.push(line(
            true,
            "Kubernetes API",
            format!("reachable, version {}.{}", v.major, v.minor),
        )),
        Err(e) => {
            out.push(line(
                false,
                "Kubernetes API",
                format!("unreachable: {e} (check KUBECONFIG / kubectl config current-context)"),
            ));
            return out;
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "authorizationpolicies.policy.strait.io",
        "httpfaults.policy.strait.io",
        "httplocalratelimitpolicies.policy.strait.io",
        "trafficsplits.split.smi-spec.io",
        "httproutegroups.specs.smi-spec.io",
    ] {
        out.push(match crds.get_opt(name).await {
            Ok(Some(_)) => line(true, format!("CRD {name}"), "installed"),
            Ok(None) => line(
                false,
                format!("CRD {name}"),
                "missing: run `strait install | kubectl apply -f -`",
            ),
            Err(e) => line(false, format!("CRD {name}"), format!("cannot read: {e}")),
        });
    }
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut ca_bundle: Option<String> = None;
    out.push(match webhooks.get_opt("strait-injector").await {
        Ok(Some(w)) => {
            let entries = w.webhooks.unwrap_or_default();
            ca_bundle = entries
                .first()
                .and_then(|e| e.client_config.ca_bundle.as_ref())
                .map(|b| String::from_utf8_lossy(&b.0).to_string());
            let with_ca = entries
                .iter()
                .filter(|e| {
                    e.client_config
                        .ca_bundle
                        .as_ref()
                        .is_some_and(|b| !b.0.is_empty())
                })
                .count();
            // The four entries `strait install` writes (opted-in or not, PodSecurity or not).
            if entries.len() == 4 && with_ca == 4 {
                line(true, "injection webhook", "configured with its caBundle")
            } else {
                line(
                    false,
                    "injection webhook",
                    format!(
                        "{} entries, {with_ca} with a caBundle: reinstall it",
                        entries.len()
                    ),
                )
            }
        }
        Ok(None) => line(
            false,
            "injection webhook",
            "missing: run `strait install | kubectl apply -f -`",
        ),
        Err(e) => line(false, "injection webhook", format!("cannot read: {e}")),
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut injector_cni = false;
    for name in ["strait-control-plane", "strait-injector"] {
        out.push(match deployments.get_opt(name).await {
            Ok(Some(d)) => {
                if name == "strait-injector" {
                    injector_cni = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|p| p.containers.first())
                        .and_then(|c| c.args.as_ref())
                        .is_some_and(|args| args.iter().any(|a| a == "--cni"));
                }
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                if ready > 0 {
                    line(true, name, format!("{ready}/{want} replicas ready"))
                } else {
                    line(
                        false,
                        name,
                        format!(
                            "0/{want} replicas ready: kubectl -n {ns} describe deployment {name}"
                        ),
                    )
                }
            }
            Ok(None) => line(false, name, format!("no Deployment in namespace {ns}")),
            Err(e) => line(false, name, format!("cannot read: {e}")),
        });
    }
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    out.push(match configmaps.get_opt("strait-trust-anchors").await {
        Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get("ca-bundle.crt")) {
            Some(pem) => expiry("trust anchors", pem, args.min_validity),
            None => line(false, "trust anchors", "the ConfigMap has no ca-bundle.crt"),
        },
        Ok(None) => line(
            false,
            "trust anchors",
            "ConfigMap strait-trust-anchors missing",
        ),
        Err(e) => line(false, "trust anchors", format!("cannot read: {e}")),
    });
    out.push(pod_security(&client, injector_cni).await);
    // Secrets hold the issuer's key: strait check works without reading them, and checks
    // their certificates only when the caller may.
    let secrets: Api<Secret> = Api::namespaced(client, ns);
    for (name, what) in [
        ("strait-issuer", "issuer certificate"),
        ("strait-injector-tls", "webhook certificate"),
    ] {
        let mut extra = None;
        out.push(match secrets.get_opt(name).await {
            Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get("tls.crt")) {
                Some(bytes) => {
                    let pem = String::from_utf8_lossy(&bytes.0).to_string();
                    if name == "strait-injector-tls" {
                        extra = Some(ca_bundle_verifies(ca_bundle.as_deref(), &pem, ns));
                    }
                    expiry(what, &pem, args.min_validity)
                }
                None => line(false, what, format!("Secret {name} has no tls.crt")),
            },
            Ok(None) => line(false, what, format!("Secret {name} missing")),
            Err(kube::Error::Api(e)) if e.code == 403 => line(
                true,
                what,
                "not checked: no permission to read Secrets (strait check needs none; grant get on this Secret to check its expiry and the webhook's caBundle)",
            ),
            Err(e) => line(false, what, format!("cannot read: {e}")),
        });
        out.extend(extra);
    }
    out
}

/// Whether the webhook's caBundle verifies the injector's serving certificate for the name the
/// API server calls (`strait-injector.<ns>.svc`): a mismatch makes every injection fail.
fn ca_bundle_verifies(ca_bundle: Option<&str>, cert_pem: &str, ns: &str) -> Line {
    const WHAT: &str = "webhook caBundle";
    let Some(ca) = ca_bundle else {
        return line(false, WHAT, "the webhook has no caBundle");
    };
    let name = format!("strait-injector.{ns}.svc");
    match verify_server_cert(ca, cert_pem, &name) {
        Ok(()) => line(true, WHAT, format!("verifies the injector's certificate for {name}")),
        Err(e) => line(
            false,
            WHAT,
            format!("does not verify the injector's certificate for {name}: {e} (the API server will refuse the webhook: reinstall with `strait install`)"),
        ),
    }
}

fn verify_server_cert(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), String> {
    let anchors =
        strait_identity::tls::TrustAnchors::from_pem(ca_pem).map_err(|e| e.to_string())?;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        strait_identity::ca::pem_blocks(cert_pem, "CERTIFICATE")
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate in tls.crt")?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        anchors.roots(),
        strait_identity::tls::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        leaf,
        intermediates,
        &server_name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Namespaces where injection is on but PodSecurity forbids the `strait-init` container: their
/// pods are admitted without the sidecar (unless the injector runs in CNI mode).
async fn pod_security(client: &kube::Client, injector_cni: bool) -> Line {
    const WHAT: &str = "PodSecurity";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = match namespaces.list(&Default::default()).await {
        Ok(l) => l,
        Err(e) => return line(false, WHAT, format!("cannot list namespaces: {e}")),
    };
    let conflicts: Vec<String> = list
        .items
        .iter()
        .filter_map(|n| {
            let labels = n.metadata.labels.as_ref()?;
            let enforce = labels.get("pod-security.kubernetes.io/enforce")?;
            let meshed = labels.get("strait.io/inject").map(String::as_str) == Some("enabled");
            (meshed && (enforce == "baseline" || enforce == "restricted"))
                .then(|| format!("{} ({enforce})", n.metadata.name.as_deref().unwrap_or("?")))
        })
        .collect();
    match (conflicts.is_empty(), injector_cni) {
        (true, _) => line(true, WHAT, "no meshed namespace forbids the sidecar's set-up"),
        (false, true) => line(
            true,
            WHAT,
            format!(
                "CNI mode: injected pods pass PodSecurity in {}",
                conflicts.join(", ")
            ),
        ),
        (false, false) => line(
            false,
            WHAT,
            format!(
                "{} enforce a level that forbids the strait-init container (NET_ADMIN, NET_RAW): their pods are admitted without the sidecar; install in CNI mode (`strait install --cni`) or label them pod-security.kubernetes.io/enforce=privileged",
                conflicts.join(", ")
            ),
        ),
    }
}

pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot configure a Kubernetes client: {e} (set KUBECONFIG)")
    })?;
    let lines = checks(client, &args).await;
    let mut failed = 0;
    for l in &lines {
        println!(
            "{} {:<28} {}",
            if l.ok { "ok  " } else { "FAIL" },
            l.what,
            l.detail
        );
        failed += usize::from(!l.ok);
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", lines.len());
    }
    println!("all {} checks passed", lines.len());
    Ok(())
}
