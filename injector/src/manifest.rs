//! Offline injection (`strait inject`): the same patch as the webhook, applied to the pods and
//! pod templates of YAML manifests (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob, and Lists of them). Other documents pass through unchanged.

use serde::Deserialize;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{plan, Decision, InjectError, Skip};

/// What happened to one pod or template.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `Kind/name`.
    pub object: String,
    pub injected: bool,
    pub skipped: Option<Skip>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {doc}: invalid YAML: {message}")]
    Yaml { doc: usize, message: String },
    #[error("document {doc} ({object}): {source}")]
    Inject {
        doc: usize,
        object: String,
        #[source]
        source: InjectError,
    },
    #[error("document {doc} ({object}): the patch does not apply: {message}")]
    Patch {
        doc: usize,
        object: String,
        message: String,
    },
}

/// Injects every pod (template) of a multi-document YAML text. Returns the new text and a
/// report per pod found.
pub fn inject_yaml(
    text: &str,
    cfg: &InjectConfig,
    anchors: Option<&str>,
) -> Result<(String, Vec<Report>), ManifestError> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let mut value = Value::deserialize(de).map_err(|e| ManifestError::Yaml {
            doc,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, doc, cfg, anchors, &mut reports)?;
        let yaml = serde_yaml_ng::to_string(&value).map_err(|e| ManifestError::Yaml {
            doc,
            message: e.to_string(),
        })?;
        out.push(yaml);
    }
    Ok((out.join("---\n"), reports))
}

fn inject_object(
    value: &mut Value,
    doc: usize,
    cfg: &InjectConfig,
    anchors: Option<&str>,
    reports: &mut Vec<Report>,
) -> Result<(), ManifestError> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let object = format!("{kind}/{name}");
    let pointer = match kind.as_str() {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        k if k.ends_with("List") => {
            if let Some(Value::Array(items)) = value.get_mut("items") {
                for item in items {
                    inject_object(item, doc, cfg, anchors, reports)?;
                }
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let Some(pod) = value.pointer_mut(pointer) else {
        return Ok(());
    };
    if !pod.get("metadata").is_some_and(Value::is_object) {
        pod["metadata"] = Value::Object(Default::default());
    }
    match plan(pod, true, cfg, anchors) {
        Ok(Decision::Inject(ops)) => {
            let patch: json_patch::Patch =
                serde_json::from_value(Value::Array(ops)).map_err(|e| ManifestError::Patch {
                    doc,
                    object: object.clone(),
                    message: e.to_string(),
                })?;
            json_patch::patch(pod, &patch).map_err(|e| ManifestError::Patch {
                doc,
                object: object.clone(),
                message: e.to_string(),
            })?;
            reports.push(Report {
                object,
                injected: true,
                skipped: None,
            });
        }
        Ok(Decision::Skip(why)) => reports.push(Report {
            object,
            injected: false,
            skipped: Some(why),
        }),
        Err(source) => {
            return Err(ManifestError::Inject {
                doc,
                object,
                source,
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: nginx}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {strait.io/inject: disabled}
        spec:
          restartPolicy: OnFailure
          containers: [{name: job, image: busybox}]
"#;

    #[test]
    fn templates_are_injected_like_the_webhook_does_and_opt_outs_are_kept() {
        let (out, reports) = inject_yaml(
            MANIFESTS,
            &InjectConfig::defaults(),
            Some("-----BEGIN CERTIFICATE-----"),
        )
        .expect("inject");
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].object, "Deployment/web");
        assert!(reports[0].injected);
        assert_eq!(reports[1].skipped, Some(Skip::OptedOut));
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&out)
            .map(|d| Value::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["kind"], "Service");
        let template = &docs[1]["spec"]["template"];
        assert_eq!(
            template["metadata"]["annotations"]["strait.io/injected"],
            "true"
        );
        let init = template["spec"]["initContainers"].as_array().expect("init");
        assert_eq!(init[0]["name"], "strait-init");
        assert_eq!(init[1]["name"], "strait-proxy");
        assert_eq!(init[1]["restartPolicy"], "Always");
        assert!(docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none());

        // Injecting the output again changes nothing.
        let (again, reports) = inject_yaml(
            &out,
            &InjectConfig::defaults(),
            Some("-----BEGIN CERTIFICATE-----"),
        )
        .expect("inject");
        assert_eq!(again, out);
        assert_eq!(reports[0].skipped, Some(Skip::AlreadyInjected));
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let err = inject_yaml(
            "kind: ConfigMap\n---\nkind: [oops\n",
            &InjectConfig::defaults(),
            None,
        )
        .expect_err("bad yaml");
        assert!(err.to_string().starts_with("document 2"), "{err}");
    }
}
