//! A real cluster's objects (testdata/k8s/cluster, captured from a Kubernetes v1.32 API
//! server after a Strait install): in Kubernetes mode only Pods the injector marked are
//! meshed; the API server, external endpoints, hostNetwork Pods, Pods the injector skipped and
//! Pods in unlabelled namespaces are reached in plaintext and get no identity.

use std::collections::BTreeMap;

use serde_json::Value;
use strait_api::discovery::destination_update::Update;
use strait_control_plane::index::{MeshIndex, Naming, SidecarEvidence};
use strait_control_plane::kubernetes::{to_resources, KINDS};
use strait_control_plane::resources::Resource;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../testdata/k8s/cluster/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every object of the captured lists, as the watchers turn them into resources.
fn cluster() -> Vec<Resource> {
    let mut out = Vec::new();
    for (file, kind) in [
        ("services-list-all-namespaces.json", "Service"),
        ("endpointslices-list-all-namespaces.json", "EndpointSlice"),
        ("pods-list-all-namespaces.json", "Pod"),
    ] {
        let kind = KINDS
            .iter()
            .find(|k| k.kind == kind)
            .expect("a watched kind");
        let list = fixture(file);
        for item in list["items"].as_array().expect("a list").iter().cloned() {
            out.extend(to_resources(kind, item).expect("the watchers' parser takes it"));
        }
    }
    out
}

/// `ip -> (meshed, identity)` of the endpoints discovery announces for `target`.
fn endpoints(index: &MeshIndex, target: &str) -> BTreeMap<String, (bool, String)> {
    match &index.lookup(target, None).update {
        Some(Update::Destination(d)) => d
            .endpoints
            .iter()
            .map(|e| (e.ip.clone(), (e.meshed, e.identity.clone())))
            .collect(),
        other => panic!("{target}: expected a destination, got {other:?}"),
    }
}

fn kubernetes_naming() -> Naming {
    Naming {
        sidecars: SidecarEvidence::InjectedPodsOnly,
        ..Naming::default()
    }
}

#[test]
fn only_injected_pods_are_meshed_in_kubernetes_mode() {
    let index = MeshIndex::build(&cluster(), &kubernetes_naming());
    let plain = (false, String::new());
    // The API server's own endpoint has no targetRef.
    assert_eq!(
        endpoints(&index, "10.96.0.1:443"),
        BTreeMap::from([("192.0.2.10".to_string(), plain.clone())])
    );
    let web = endpoints(&index, "10.96.0.50:80");
    assert_eq!(
        web.get("10.244.0.11"),
        Some(&(true, "spiffe://cluster.local/ns/demo/sa/web".to_string())),
        "web-1 was injected: {web:?}"
    );
    assert_eq!(web.get("10.244.0.12"), Some(&plain), "opted out: {web:?}");
    assert_eq!(web.get("10.244.0.13"), Some(&plain), "no such pod: {web:?}");
    let v1 = endpoints(&index, "10.96.0.51:80");
    assert_eq!(
        v1.get("10.244.1.1").map(|e| e.0),
        Some(true),
        "injected: {v1:?}"
    );
    for ip in ["10.244.1.2", "10.244.1.3", "10.244.1.4"] {
        // Created while the injector was down, a bad annotation, hostNetwork.
        assert_eq!(v1.get(ip), Some(&plain), "{ip}: {v1:?}");
    }
    for (target, why) in [
        ("10.96.0.70:5432", "selectorless service, external IP"),
        ("10.96.0.10:53", "CoreDNS in kube-system"),
        ("10.96.0.60:80", "namespace not labelled for injection"),
        ("10.96.0.82:443", "no targetRef"),
    ] {
        let eps = endpoints(&index, target);
        assert!(!eps.is_empty(), "{target}");
        assert!(
            eps.values().all(|e| *e == plain),
            "{target} ({why}): {eps:?}"
        );
    }
}

#[test]
fn local_mode_keeps_its_default_but_never_meshes_a_host_network_pod() {
    let index = MeshIndex::build(&cluster(), &Naming::default());
    let v1 = endpoints(&index, "10.96.0.51:80");
    assert_eq!(
        v1.get("10.244.1.4"),
        Some(&(false, String::new())),
        "{v1:?}"
    );
    assert_eq!(v1.get("10.244.1.2").map(|e| e.0), Some(true), "{v1:?}");
}
