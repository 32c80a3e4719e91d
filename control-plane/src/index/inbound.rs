//! Workloads' inbound authorization: AuthorizationPolicies and rate limits grouped by
//! workload, and the policies whose port no endpoint of their workload serves.

use std::collections::HashMap;
use std::sync::Arc;

use strait_api::discovery::{
    allowed_client, AllowedClient, InboundPolicy, PortAuthorization, RateLimit, RateLimitOverride,
};

use super::cache::PortMap;
use super::Naming;
use crate::resources::{AuthorizationPolicy, ObjectMeta};

/// Groups policies by workload. Rules that cannot be used (a bad SPIFFE ID) are skipped with a
/// warning: a policy is never widened by an error.
pub(super) fn inbound_policies(
    policies: &[&AuthorizationPolicy],
    limits: &[&crate::resources::RateLimitPolicy],
    naming: &Naming,
) -> HashMap<(String, String), Arc<InboundPolicy>> {
    let mut out: HashMap<(String, String), InboundPolicy> = HashMap::new();
    for p in by_name(policies, |p| &p.metadata) {
        let name = format!("{}/{}", p.metadata.namespace, p.metadata.name);
        if p.spec.target_ref.kind != "ServiceAccount" {
            tracing::warn!(policy = %name, kind = %p.spec.target_ref.kind, "targetRef.kind must be ServiceAccount; policy ignored");
            continue;
        }
        let mut allow = Vec::new();
        for rule in &p.spec.allow {
            for id in &rule.identities {
                match id.parse::<strait_identity::SpiffeId>() {
                    Ok(id) => allow.push(AllowedClient {
                        client: Some(allowed_client::Client::Identity(id.to_string())),
                    }),
                    Err(e) => tracing::warn!(policy = %name, error = %e, "identity skipped"),
                }
            }
            for ns in &rule.namespaces {
                allow.push(AllowedClient {
                    client: Some(allowed_client::Client::Namespace(ns.clone())),
                });
            }
            if rule.authenticated {
                allow.push(AllowedClient {
                    client: Some(allowed_client::Client::Authenticated(true)),
                });
            }
        }
        out.entry((p.metadata.namespace.clone(), p.spec.target_ref.name.clone()))
            .or_default()
            .ports
            .push(PortAuthorization {
                port: u32::from(p.spec.port.unwrap_or(0)),
                policy: name,
                allow,
                routes: p
                    .spec
                    .routes
                    .iter()
                    .map(crate::routes::route_match)
                    .collect(),
            });
    }
    for l in by_name(limits, |l| &l.metadata) {
        let name = format!("{}/{}", l.metadata.namespace, l.metadata.name);
        if l.spec.target_ref.kind != "ServiceAccount" {
            tracing::warn!(policy = %name, kind = %l.spec.target_ref.kind, "targetRef.kind must be ServiceAccount; rate limit ignored");
            continue;
        }
        let overrides = l
            .spec
            .overrides
            .iter()
            .map(|o| RateLimitOverride {
                rps: o.requests_per_second,
                identities: o
                    .client_refs
                    .iter()
                    .filter(|c| {
                        let ok = c.kind == "ServiceAccount";
                        if !ok {
                            tracing::warn!(policy = %name, kind = %c.kind, "clientRefs name ServiceAccounts; entry skipped");
                        }
                        ok
                    })
                    .map(|c| {
                        let ns = c.namespace.as_deref().unwrap_or(&l.metadata.namespace);
                        format!("spiffe://{}/ns/{ns}/sa/{}", naming.trust_domain, c.name)
                    })
                    .collect(),
            })
            .collect();
        out.entry((l.metadata.namespace.clone(), l.spec.target_ref.name.clone()))
            .or_default()
            .rate_limits
            .push(RateLimit {
                port: u32::from(l.spec.port.unwrap_or(0)),
                policy: name,
                routes: l
                    .spec
                    .routes
                    .iter()
                    .map(crate::routes::route_match)
                    .collect(),
                total_rps: l.spec.total.as_ref().map_or(0, |r| r.requests_per_second),
                identity_rps: l
                    .spec
                    .identity
                    .as_ref()
                    .map_or(0, |r| r.requests_per_second),
                overrides,
            });
    }
    out.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

/// Policies whose `port` (the container port the proxy sees) no meshed endpoint of their
/// workload serves, while the workload does serve others: almost always a Service port written
/// where the container port was meant. Logged, and counted for the admin metrics.
/// `items` in namespace/name order: answers do not depend on the order files are read in.
fn by_name<'a, T>(items: &[&'a T], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<&'a T> {
    let mut sorted = items.to_vec();
    sorted.sort_by(|a, b| {
        let (a, b) = (meta(a), meta(b));
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    sorted
}

pub(super) fn unmatched_policy_ports(
    policies: &[&AuthorizationPolicy],
    port_endpoints: &PortMap,
    naming: &Naming,
) -> usize {
    let mut unmatched = 0;
    for p in policies {
        let Some(port) = p.spec.port else { continue };
        let ns = &p.metadata.namespace;
        let identity = format!(
            "spiffe://{}/ns/{ns}/sa/{}",
            naming.trust_domain, p.spec.target_ref.name
        );
        let mut served: Vec<u32> = port_endpoints
            .values()
            .flat_map(|(_, eps)| eps.iter())
            .filter(|e| e.identity == identity)
            .map(|e| e.port)
            .collect();
        served.sort_unstable();
        served.dedup();
        if !served.is_empty() && !served.contains(&u32::from(port)) {
            unmatched += 1;
            let service_ports: Vec<u16> = port_endpoints
                .iter()
                .filter(|(_, (_, eps))| eps.iter().any(|e| e.identity == identity))
                .map(|((_, _, service_port), _)| *service_port)
                .collect();
            tracing::warn!(
                policy = %format!("{ns}/{}", p.metadata.name),
                port,
                workload_ports = ?served,
                service_ports = ?service_ports,
                "the policy's port is served by no endpoint of its workload: it selects nothing, so those ports follow the default policy (`port` is the container port the pod listens on, not the Service port)"
            );
        }
    }
    unmatched
}
