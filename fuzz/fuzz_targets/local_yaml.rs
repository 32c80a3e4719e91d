//! Local-mode YAML on arbitrary text: parsed or refused with an error, never a panic, and
//! whatever parses builds a mesh index and answers lookups.
#![no_main]
use libfuzzer_sys::fuzz_target;
use strait_control_plane::index::{MeshIndex, Naming};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(resources) = strait_control_plane::local::parse::parse_documents(text) {
        let index = MeshIndex::build(&resources, &Naming::default());
        let _ = index.lookup("10.96.0.10:80", None);
        let _ = index.lookup("web.default.svc.cluster.local:80", Some("other"));
        let _ = index.inbound("default", "default");
    }
});
