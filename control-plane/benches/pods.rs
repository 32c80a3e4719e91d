//! What a Pod event costs the control plane: `cargo bench -p strait-control-plane --bench pods`.
//!
//! Reads the Pods of a real cluster's list (testdata/k8s/cluster) the way the watcher does,
//! as [`WatchedPod`] straight from JSON, and the way every other kind is read (JSON ->
//! `DynamicObject` -> YAML value -> typed), and prints the time per Pod of each. Nothing
//! asserts: the figures go to docs/performance.md.

use std::time::Instant;

use kube::api::DynamicObject;
use strait_control_plane::kubernetes::{to_resources, WatchedPod, KINDS};

fn main() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/k8s/cluster/pods-list-all-namespaces.json"
    ))
    .expect("fixture");
    let list: serde_json::Value = serde_json::from_str(&text).expect("json");
    let items: Vec<String> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i.to_string())
        .collect();
    let bytes: usize = items.iter().map(String::len).sum();
    let pod_kind = KINDS.iter().find(|k| k.kind == "Pod").expect("Pod");
    let rounds = 2000;
    let per_pod = |f: &dyn Fn(&str)| {
        let start = Instant::now();
        for _ in 0..rounds {
            for item in &items {
                f(item);
            }
        }
        start.elapsed().as_secs_f64() * 1e6 / (rounds * items.len()) as f64
    };
    let typed = per_pod(&|item| {
        let p: WatchedPod = serde_json::from_str(item).expect("pod");
        std::hint::black_box(p);
    });
    let generic = per_pod(&|item| {
        let o: DynamicObject = serde_json::from_str(item).expect("object");
        let v = serde_json::to_value(o).expect("value");
        std::hint::black_box(to_resources(pod_kind, v).expect("pod"));
    });
    println!(
        "{} pods, {} bytes of JSON each on average",
        items.len(),
        bytes / items.len()
    );
    println!("pod_read_typed_us {typed:.1}");
    println!("pod_read_generic_us {generic:.1}");
    println!("pod_read_speedup {:.1}", generic / typed);
}
