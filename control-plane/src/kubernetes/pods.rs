//! Pods as the control plane reads them from the API server.
//!
//! Pods are the largest and busiest kind a cluster-wide watch sees (containers, status,
//! managed fields; a status update on every probe or restart), and discovery needs three things
//! of them: name and namespace, annotations/labels (sidecar evidence) and the service account
//! (with `hostNetwork`). [`WatchedPod`] is deserialized straight from the API server's JSON into
//! those fields: the parser skips everything else without building it, and there is no
//! JSON -> YAML -> typed conversion as for the other kinds.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use serde::Deserialize;

use crate::resources::{ObjectMeta, Pod, PodSpec};

/// A Pod, reduced to what discovery uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "PodFields")]
pub struct WatchedPod {
    /// What the watcher itself needs (name, namespace, resourceVersion, uid).
    meta: KubeMeta,
    pub pod: Pod,
}

#[derive(Deserialize)]
struct PodFields {
    metadata: MetaFields,
    #[serde(default)]
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    generation: Option<i64>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

impl From<PodFields> for WatchedPod {
    fn from(p: PodFields) -> Self {
        let m = p.metadata;
        let namespace = m.namespace.unwrap_or_else(|| "default".to_string());
        Self {
            meta: KubeMeta {
                name: Some(m.name.clone()),
                namespace: Some(namespace.clone()),
                resource_version: m.resource_version,
                uid: m.uid,
                ..KubeMeta::default()
            },
            pod: Pod {
                metadata: ObjectMeta {
                    name: m.name,
                    namespace,
                    labels: m.labels,
                    annotations: m.annotations,
                    generation: m.generation,
                },
                spec: p.spec,
            },
        }
    }
}

impl WatchedPod {
    /// (namespace, name): the store's key.
    pub fn key(&self) -> (String, String) {
        (
            self.pod.metadata.namespace.clone(),
            self.pod.metadata.name.clone(),
        )
    }
}

impl kube::Resource for WatchedPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &KubeMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut KubeMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod as the API server lists it, with what discovery does not use.
    const POD: &str = r#"{
      "metadata": {
        "name": "web-6d4cf56db6-abcde", "namespace": "shop", "uid": "8f0c", "resourceVersion": "4711",
        "labels": {"app": "web", "strait.io/injected": "true"},
        "annotations": {"strait.io/inject": "enabled"},
        "managedFields": [{"manager": "kubelet", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}}}}],
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d4cf56db6", "uid": "1", "controller": true}]
      },
      "spec": {"serviceAccountName": "web", "hostNetwork": false, "containers": [{"name": "app", "image": "web:1", "env": [{"name": "A", "value": "b"}]}]},
      "status": {"phase": "Running", "podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}
    }"#;

    #[test]
    fn a_pod_keeps_what_discovery_uses_and_what_the_watcher_needs() {
        let p: WatchedPod = serde_json::from_str(POD).expect("a pod");
        assert_eq!(
            p.key(),
            ("shop".to_string(), "web-6d4cf56db6-abcde".to_string())
        );
        assert_eq!(p.pod.spec.service_account_name.as_deref(), Some("web"));
        assert!(!p.pod.spec.host_network);
        assert_eq!(
            p.pod
                .metadata
                .labels
                .get("strait.io/injected")
                .map(String::as_str),
            Some("true")
        );
        use kube::Resource as _;
        assert_eq!(p.meta().resource_version.as_deref(), Some("4711"));
        assert_eq!(p.meta().uid.as_deref(), Some("8f0c"));
    }

    #[test]
    fn it_is_the_pod_local_mode_parses_from_the_same_object() {
        let p: WatchedPod = serde_json::from_str(POD).expect("a pod");
        let mut value: serde_json::Value = serde_json::from_str(POD).expect("json");
        value["kind"] = "Pod".into();
        value["apiVersion"] = "v1".into();
        let yaml = serde_yaml_ng::to_value(&value).expect("yaml");
        match crate::local::parse::parse_object(yaml)
            .expect("parses")
            .as_slice()
        {
            [crate::resources::Resource::Pod(local)] => assert_eq!(*local, p.pod),
            other => panic!("a pod, got {other:?}"),
        }
    }

    #[test]
    fn every_pod_of_a_real_cluster_list_reads() {
        // Captured from a real API server (testdata/k8s/README.md).
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/k8s/cluster/pods-list-all-namespaces.json"
        ))
        .expect("fixture");
        let list: serde_json::Value = serde_json::from_str(&text).expect("json");
        let items = list["items"].as_array().expect("items");
        assert!(!items.is_empty());
        for item in items {
            let p: WatchedPod = serde_json::from_value(item.clone()).expect("a pod");
            assert_eq!(
                Some(p.pod.metadata.name.as_str()),
                item["metadata"]["name"].as_str()
            );
        }
    }
}
