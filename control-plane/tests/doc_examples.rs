//! The YAML examples of docs/routing.md and docs/identity.md are documents the control plane
//! accepts as written: each parses, and the index built from them reports no problem with
//! their filters (an unsupported or invalid filter would show in a route's status).

use strait_control_plane::index::{MeshIndex, Naming};
use strait_control_plane::local::parse::parse_documents;
use strait_control_plane::resources::Resource;

/// The ```yaml blocks of a doc.
fn yaml_blocks(doc: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_yaml_example_in_the_routing_and_policy_docs_is_accepted() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut checked = 0;
    for doc in ["routing.md", "identity.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("doc");
        for block in yaml_blocks(&text) {
            let resources = parse_documents(&block)
                .unwrap_or_else(|e| panic!("{doc}: an example does not parse: {e}\n{block}"));
            // The Services the routes are bound to, so that their status is about the routes.
            let mut parents = String::new();
            for r in &resources {
                let (ns, refs) = match r {
                    Resource::HttpRoute(h) => (&h.metadata.namespace, &h.spec.parent_refs),
                    Resource::GrpcRoute(g) => (&g.metadata.namespace, &g.spec.parent_refs),
                    _ => continue,
                };
                for p in refs {
                    let ns = p.namespace.as_deref().unwrap_or(ns);
                    let port = p.port.unwrap_or(80);
                    parents.push_str(&format!(
                        "---\nkind: Service\nmetadata: {{name: {}, namespace: {ns}}}\nspec: {{ports: [{{port: {port}}}]}}\n",
                        p.name
                    ));
                }
            }
            let mut all = resources.clone();
            all.extend(parse_documents(&parents).expect("services"));
            let index = MeshIndex::build(&all, &Naming::default());
            for status in index.route_statuses() {
                assert!(
                    status.accepted.ok,
                    "{doc}: {}/{} not accepted: {}\n{block}",
                    status.namespace, status.name, status.accepted.message
                );
            }
            checked += resources.len();
        }
    }
    assert!(
        checked >= 10,
        "only {checked} documents found in the examples"
    );
}
