//! `strait check`: is the mesh installed and healthy in the cluster `kubectl` points at?
//!
//! Each check prints one line; any failure makes the command exit 1, with a hint.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
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
    out.push(match webhooks.get_opt("strait-injector").await {
        Ok(Some(w)) => {
            let entries = w.webhooks.unwrap_or_default();
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
    for name in ["strait-control-plane", "strait-injector"] {
        out.push(match deployments.get_opt(name).await {
            Ok(Some(d)) => {
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
    let secrets: Api<Secret> = Api::namespaced(client, ns);
    for (name, what) in [
        ("strait-issuer", "issuer certificate"),
        ("strait-injector-tls", "webhook certificate"),
    ] {
        out.push(match secrets.get_opt(name).await {
            Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get("tls.crt")) {
                Some(bytes) => expiry(what, &String::from_utf8_lossy(&bytes.0), args.min_validity),
                None => line(false, what, format!("Secret {name} has no tls.crt")),
            },
            Ok(None) => line(false, what, format!("Secret {name} missing")),
            Err(e) => line(false, what, format!("cannot read: {e}")),
        });
    }
    out
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
