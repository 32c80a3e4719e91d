//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsed strictly: the scheme, a valid trust domain, and exactly the path `ns/<ns>/sa/<sa>`
//! with Kubernetes-valid names. Anything else is refused, so a certificate can never claim an
//! identity the CA did not mean.

use std::fmt;
use std::str::FromStr;

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{id:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}")]
pub struct SpiffeIdError {
    id: String,
    reason: &'static str,
}

/// RFC 1123 label, as Kubernetes requires of namespaces and service-account names (segments).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_str(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            id: id.to_string(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("the scheme must be spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("no path"))?;
        if !is_dns_label(td) {
            return Err(err(
                "the trust domain must be lower-case letters, digits, '-' and '.'",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => {
                if !is_dns_label(ns) || ns.contains('.') {
                    return Err(err("the namespace is not a valid Kubernetes name"));
                }
                if !is_dns_label(sa) {
                    return Err(err("the service account is not a valid Kubernetes name"));
                }
                Ok(SpiffeId {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(err(
                "the path must be exactly ns/<namespace>/sa/<service-account>",
            )),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "web").expect("valid"),
            id
        );
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/sa/web/ns/shop",
            "spiffe://Cluster.local/ns/shop/sa/web",
            "spiffe:///ns/shop/sa/web",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe://cluster.local/ns/sh.op/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns/-shop/sa/web",
            "",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} must be refused");
        }
    }
}
