//! The control-plane <-> proxy protocol, generated from `proto/` at build time.
//!
//! Discovery (`strait.discovery.v1`): one stream per destination, snapshot first and whole
//! replacements after, with an explicit "not in the mesh" answer.
//! Identity (`strait.identity.v1`): a CSR and a token in, a certificate out.

#![allow(missing_docs, clippy::all)] // generated code

pub mod discovery {
    tonic::include_proto!("strait.discovery.v1");
}

pub mod encoded;
pub mod shared;

pub mod identity {
    tonic::include_proto!("strait.identity.v1");
}

/// The settings' spelling of a default inbound policy (flags, annotations), shared by the
/// control plane, the proxy and the injector.
pub mod default_policy {
    use super::discovery::DefaultPolicy;

    pub const NAMES: [(&str, DefaultPolicy); 4] = [
        ("all-unauthenticated", DefaultPolicy::AllUnauthenticated),
        ("all-authenticated", DefaultPolicy::AllAuthenticated),
        ("cluster-authenticated", DefaultPolicy::ClusterAuthenticated),
        ("deny", DefaultPolicy::Deny),
    ];

    /// Parses a setting; the error lists the values.
    pub fn parse(s: &str) -> Result<DefaultPolicy, String> {
        NAMES
            .iter()
            .find(|(n, _)| *n == s.trim())
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                format!("{s:?} is not a default inbound policy: all-unauthenticated, all-authenticated, cluster-authenticated or deny")
            })
    }

    /// The setting that names `p`.
    pub fn name(p: DefaultPolicy) -> &'static str {
        NAMES
            .iter()
            .find(|(_, q)| *q == p)
            .map_or("all-unauthenticated", |(n, _)| n)
    }
}
