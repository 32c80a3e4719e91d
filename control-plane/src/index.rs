//! The mesh index: resources in, discovery answers out.
//!
//! Every answer is computed once per change of the resources, keyed by every name a proxy may ask
//! for (cluster IP and port, the service's DNS names and port, an endpoint's own address), so a
//! watch stream only does a map lookup when the index changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use strait_api::discovery::{
    destination_update::Update, DefaultPolicy, DestinationUpdate, InboundPolicy, NotInMesh,
};

use crate::resources::{annotations, Resource, Service};
use crate::routes::RouteSources;

mod cache;
mod inbound;
mod service;
use cache::{Cache, PortMap};
use inbound::{inbound_policies, unmatched_policy_ports};
use service::{service_answers, service_endpoints, Reuse};

/// Naming settings of the cluster, and what proves that an endpoint has a sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct Naming {
    /// The SPIFFE trust domain: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub trust_domain: String,
    /// The DNS suffix of services: `<svc>.<ns>.svc.<cluster-domain>`.
    pub cluster_domain: String,
    /// Which endpoints are announced as meshed (mTLS, an identity).
    pub sidecars: SidecarEvidence,
    /// What a port no AuthorizationPolicy selects allows, unless its namespace says otherwise.
    pub default_inbound_policy: DefaultPolicy,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            sidecars: SidecarEvidence::UnlessOptedOut,
            default_inbound_policy: DefaultPolicy::AllUnauthenticated,
        }
    }
}

/// What makes an endpoint meshed. In both modes a `hostNetwork` Pod, a Pod or slice annotated
/// `strait.io/meshed: "false"` and a Pod annotated `strait.io/inject: disabled` are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarEvidence {
    /// Local mode: every endpoint has a sidecar unless its Pod or slice says otherwise (the
    /// config directory describes the mesh's own pods).
    UnlessOptedOut,
    /// Kubernetes mode: only an endpoint whose `targetRef` is a Pod that the injector marked
    /// (`strait.io/injected: "true"`). Endpoints without a Pod (the API server, external IPs of
    /// a selectorless Service) and Pods the injector skipped are reached in plaintext, as they
    /// expect.
    InjectedPodsOnly,
}

/// All answers of one version of the mesh state.
#[derive(Debug, Default)]
pub struct MeshIndex {
    answers: HashMap<Arc<str>, Arc<DestinationUpdate>>,
    /// (client namespace, target) -> the answer for clients of a namespace with consumer
    /// routes for that service (GAMMA); everyone else gets `answers`.
    consumer_answers: HashMap<(String, String), Arc<DestinationUpdate>>,
    services: usize,
    /// ServiceAccount token -> (namespace, service account), from token Secrets.
    tokens: HashMap<String, (String, String)>,
    /// (namespace, service account) -> inbound authorization of that workload.
    inbound: HashMap<(String, String), Arc<InboundPolicy>>,
    /// (namespace, service account) -> its ports a Service declares opaque.
    opaque_inbound: HashMap<(String, String), std::collections::BTreeSet<u32>>,
    /// Namespaces whose annotation sets their default inbound policy.
    namespace_defaults: HashMap<String, DefaultPolicy>,
    /// The cluster-wide default inbound policy.
    default_inbound_policy: DefaultPolicy,
    /// AuthorizationPolicies whose `port` no endpoint of their workload serves.
    unmatched_policy_ports: usize,
    /// The conditions of every HTTPRoute bound to Services.
    route_statuses: Vec<crate::routes::RouteStatus>,
    /// What each service's answers were computed from, for the next update.
    cache: Cache,
    /// Services whose endpoints or answers this version computed (the others were reused).
    recomputed: usize,
}

impl MeshIndex {
    /// Builds the index of `resources` from nothing (tests, tools; the sources use
    /// [`MeshIndex::update`]).
    pub fn build(resources: &[Resource], naming: &Naming) -> Self {
        let resources: Vec<Arc<Resource>> = resources.iter().cloned().map(Arc::new).collect();
        Self::update(&resources, naming, None)
    }

    /// The index of `resources`, recomputing only the services whose inputs changed since
    /// `previous` (objects compared by identity: see [`cache`]); an answer recomputed equal to
    /// the previous one is the previous `Arc`, so the fan-out skips it. Never fails: an object
    /// that cannot be used (a bad IP, a slice whose service does not exist) is skipped with a
    /// warning.
    pub fn update(
        resources: &[Arc<Resource>],
        naming: &Naming,
        previous: Option<&MeshIndex>,
    ) -> Self {
        let mut services: Vec<(&Arc<Resource>, &Service)> = Vec::new();
        let mut slices: HashMap<(&str, &str), Vec<&Arc<Resource>>> = HashMap::new();
        let mut pods: HashMap<(&str, &str), &Arc<Resource>> = HashMap::new();
        let mut tokens = HashMap::new();
        let mut namespace_defaults = HashMap::new();
        let mut policies = Vec::new();
        let mut limits = Vec::new();
        let mut route_objects: Vec<Arc<Resource>> = Vec::new();
        // GRPCRoutes, in HTTPRoute terms: owned here, borrowed by the route sources.
        let grpc_routes: Vec<crate::resources::HttpRoute> = resources
            .iter()
            .filter_map(|r| match &**r {
                Resource::GrpcRoute(g) => Some(g.to_http()),
                _ => None,
            })
            .collect();
        let mut route_sources = RouteSources::default();
        route_sources.http_routes.extend(grpc_routes.iter());
        for arc in resources {
            match &**arc {
                Resource::Service(s) => services.push((arc, s)),
                Resource::EndpointSlice(s) => match s.service_name() {
                    Some(svc) => slices
                        .entry((s.metadata.namespace.as_str(), svc))
                        .or_default()
                        .push(arc),
                    None => tracing::warn!(
                        slice = %s.metadata.name,
                        "EndpointSlice has no kubernetes.io/service-name label; ignored"
                    ),
                },
                Resource::Pod(p) => {
                    pods.insert(
                        (p.metadata.namespace.as_str(), p.metadata.name.as_str()),
                        arc,
                    );
                }
                Resource::AuthorizationPolicy(p) => policies.push(p),
                Resource::HttpRoute(r) => {
                    route_sources.http_routes.push(r);
                    route_objects.push(arc.clone());
                }
                Resource::ReferenceGrant(g) => {
                    route_sources.grants.push(g);
                    route_objects.push(arc.clone());
                }
                Resource::GrpcRoute(_) => route_objects.push(arc.clone()),
                Resource::RateLimitPolicy(l) => limits.push(l),
                Resource::HttpFault(f) => {
                    route_sources
                        .faults
                        .insert((f.metadata.namespace.clone(), f.metadata.name.clone()), f);
                    route_objects.push(arc.clone());
                }
                Resource::TrafficSplit(t) => {
                    route_sources.splits.push(t);
                    route_objects.push(arc.clone());
                }
                Resource::HttpRouteGroup(g) => {
                    route_sources
                        .groups
                        .insert((g.metadata.namespace.clone(), g.metadata.name.clone()), g);
                    route_objects.push(arc.clone());
                }
                Resource::Namespace(ns) => {
                    if let Some(v) = ns
                        .metadata
                        .annotations
                        .get(annotations::DEFAULT_INBOUND_POLICY)
                    {
                        let policy = parse_default_policy(v).unwrap_or_else(|e| {
                            // A typo never widens access.
                            tracing::warn!(namespace = %ns.metadata.name, annotation = annotations::DEFAULT_INBOUND_POLICY, error = %e, "using deny for this namespace");
                            DefaultPolicy::Deny
                        });
                        namespace_defaults.insert(ns.metadata.name.clone(), policy);
                    }
                }
                Resource::Secret(secret) => {
                    if let Some((sa, token)) = secret.service_account_token() {
                        tokens.insert(token, (secret.metadata.namespace.clone(), sa));
                    }
                }
            }
        }
        // Deterministic answers whatever the file order.
        services.sort_by(|(_, a), (_, b)| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        // One Service per name: the last one read (in file order) wins.
        services.reverse();
        services.dedup_by(|(_, later), (_, earlier)| {
            let same = later.metadata.namespace == earlier.metadata.namespace
                && later.metadata.name == earlier.metadata.name;
            if same {
                tracing::warn!(service = %format!("{}/{}", later.metadata.namespace, later.metadata.name), "the Service is defined twice; the later definition is used");
            }
            same
        });
        services.reverse();
        let previous_index = previous;
        let previous = previous
            .map(|p| &p.cache)
            .filter(|c| c.naming.as_ref() == Some(naming));
        let routes_same = previous.is_some_and(|c| cache::same_objects(&c.routes, &route_objects));
        let mut cache = Cache {
            naming: Some(naming.clone()),
            routes: route_objects,
            endpoints: HashMap::with_capacity(services.len()),
            answers: HashMap::with_capacity(services.len()),
        };
        let mut recomputed = 0;

        // Every service port's endpoints first: routes point at other services' endpoints.
        let mut port_endpoints: PortMap = HashMap::new();
        for (arc, svc) in &services {
            let ns = svc.metadata.namespace.as_str();
            let name = svc.metadata.name.as_str();
            let svc_slices = slices.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            let key = (ns.to_string(), name.to_string());
            let entry = match previous
                .and_then(|c| c.endpoints.get(&key))
                .filter(|e| e.computed_from(arc, svc_slices, &pods))
            {
                Some(entry) => entry.clone(),
                None => Arc::new(service_endpoints(arc, svc, svc_slices, &pods, naming)),
            };
            for p in &entry.ports {
                port_endpoints.insert(
                    (key.0.clone(), key.1.clone(), p.port),
                    (p.authority.clone(), p.endpoints.clone()),
                );
            }
            cache.endpoints.insert(key, entry);
        }
        let resolve = |ns: &str, name: &str, port: u16| {
            port_endpoints
                .get(&(ns.to_string(), name.to_string(), port))
                .map(|(authority, endpoints)| (authority.clone(), (**endpoints).clone()))
        };

        let unmatched_policy_ports = unmatched_policy_ports(&policies, &port_endpoints, naming);
        let service_names: std::collections::HashSet<(&str, &str)> = services
            .iter()
            .map(|(_, s)| (s.metadata.namespace.as_str(), s.metadata.name.as_str()))
            .collect();
        let route_statuses = crate::routes::route_statuses(
            &route_sources,
            &|ns, name| service_names.contains(&(ns, name)),
            &resolve,
        );
        let mut index = MeshIndex {
            answers: HashMap::new(),
            consumer_answers: HashMap::new(),
            services: services.len(),
            tokens,
            inbound: inbound_policies(&policies, &limits, naming),
            opaque_inbound: HashMap::new(),
            namespace_defaults,
            default_inbound_policy: naming.default_inbound_policy,
            unmatched_policy_ports,
            route_statuses,
            cache: Cache::default(),
            recomputed: 0,
        };
        // A recomputed answer equal to the previous one is the previous `Arc`.
        let reuse = Reuse(previous_index);
        for (_, svc) in &services {
            let key = (svc.metadata.namespace.clone(), svc.metadata.name.clone());
            let endpoints = &cache.endpoints[&key];
            let answers = match previous
                .filter(|_| routes_same)
                .and_then(|c| c.answers.get(&key))
                .filter(|a| a.valid_for(endpoints, &port_endpoints))
            {
                Some(answers) => answers.clone(),
                None => {
                    recomputed += 1;
                    Arc::new(service_answers(
                        svc,
                        endpoints,
                        &route_sources,
                        &port_endpoints,
                        naming,
                        &reuse,
                    ))
                }
            };
            for k in &answers.answers {
                if k.replaces {
                    index.answers.insert(k.key.clone(), k.answer.clone());
                } else {
                    index
                        .answers
                        .entry(k.key.clone())
                        .or_insert_with(|| k.answer.clone());
                }
            }
            for (k, answer) in &answers.consumer {
                index.consumer_answers.insert(k.clone(), answer.clone());
            }
            for (workload, port) in &answers.opaque {
                index
                    .opaque_inbound
                    .entry(workload.clone())
                    .or_default()
                    .insert(*port);
            }
            cache.answers.insert(key, answers);
        }
        index.cache = cache;
        index.recomputed = recomputed;
        index
    }

    /// The answer for `target` (`ip:port` or `host:port`) as a client in namespace
    /// `client_ns` sees it, "not in the mesh" when unknown.
    pub fn lookup(&self, target: &str, client_ns: Option<&str>) -> Arc<DestinationUpdate> {
        match normalize_target(target) {
            Some(key) => match client_ns
                .and_then(|ns| self.consumer_answers.get(&(ns.to_string(), key.clone())))
                .or_else(|| self.answers.get(key.as_str()))
            {
                Some(answer) => answer.clone(),
                None => not_in_mesh(format!("{target} is not a mesh service or endpoint")),
            },
            None => not_in_mesh(format!("{target} is not an ip:port or host:port")),
        }
    }

    /// The inbound authorization of the workload `(namespace, service account)`: its
    /// policies, and the default for ports none selects (the namespace's, else the cluster's).
    pub fn inbound(&self, namespace: &str, service_account: &str) -> Arc<InboundPolicy> {
        let default = self
            .namespace_defaults
            .get(namespace)
            .copied()
            .unwrap_or(self.default_inbound_policy);
        let mut policy = self
            .inbound
            .get(&(namespace.to_string(), service_account.to_string()))
            .map(|p| (**p).clone())
            .unwrap_or_default();
        policy.set_default_policy(default);
        policy.opaque_ports = self
            .opaque_inbound
            .get(&(namespace.to_string(), service_account.to_string()))
            .map(|ports| ports.iter().copied().collect())
            .unwrap_or_default();
        Arc::new(policy)
    }

    /// How many AuthorizationPolicies name a `port` that no endpoint of their workload serves
    /// (each is logged when the index is built).
    pub fn unmatched_policy_ports(&self) -> usize {
        self.unmatched_policy_ports
    }

    /// The `(namespace, service account)` a token proves, if any.
    pub fn token_account(&self, token: &str) -> Option<&(String, String)> {
        self.tokens.get(token)
    }

    /// The conditions of every HTTPRoute bound to Services.
    pub fn route_statuses(&self) -> &[crate::routes::RouteStatus] {
        &self.route_statuses
    }

    /// How many services the index holds.
    pub fn service_count(&self) -> usize {
        self.services
    }

    /// How many services' answers this version computed (the others were reused as they were).
    pub fn recomputed_services(&self) -> usize {
        self.recomputed
    }
}

/// Parses a default inbound policy (the flag, the namespace annotation).
pub use strait_api::default_policy::parse as parse_default_policy;

fn not_in_mesh(reason: String) -> Arc<DestinationUpdate> {
    Arc::new(DestinationUpdate {
        update: Some(Update::NotInMesh(NotInMesh { reason })),
    })
}

/// Canonical form of a target: `SocketAddr` display for addresses, lower-case host without a
/// trailing dot otherwise. `None` when it has no port.
pub fn normalize_target(target: &str) -> Option<String> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return Some(addr.to_string());
    }
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return None;
    }
    Some(format!("{host}:{port}"))
}

/// Parses `"25,587, 4444-4450"`. Bad items are skipped with a warning (an annotation typo must
/// not take a service out of discovery).
pub fn parse_port_list(list: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parsed = match item.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                (Ok(a), Ok(b)) if a <= b => Some((a..=b).collect::<Vec<_>>()),
                _ => None,
            },
            None => item.parse::<u16>().ok().map(|p| vec![p]),
        };
        match parsed {
            Some(ports) => out.extend(ports),
            None => tracing::warn!(item, "not a port or port range; ignored"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use strait_api::discovery::{Destination, ProtocolHint};

    use super::*;
    use crate::local::parse::parse_documents;

    const MESH: &str = r#"
kind: Service
metadata: {name: web, namespace: shop, annotations: {strait.io/opaque-ports: "6379"}}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: redis, port: 6379}
  - {name: grpc, port: 9000, appProtocol: kubernetes.io/h2c}
---
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
  annotations: {strait.io/service-account: web-sa}
endpoints:
- addresses: [10.0.0.3]
  targetRef: {kind: Pod, name: web-b}
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: web-a}
- addresses: [10.0.0.9]
  conditions: {ready: false}
ports: [{name: http, port: 8080}, {name: redis, port: 6379}, {name: grpc, port: 9001}]
---
kind: Pod
metadata: {name: web-b, namespace: shop, annotations: {strait.io/inject: disabled}}
spec: {serviceAccountName: other}
"#;

    fn index() -> MeshIndex {
        MeshIndex::build(&parse_documents(MESH).expect("valid"), &Naming::default())
    }

    fn destination(answer: &DestinationUpdate) -> &Destination {
        match &answer.update {
            Some(Update::Destination(d)) => d,
            other => panic!("expected a destination, got {other:?}"),
        }
    }

    #[test]
    fn an_equal_answer_recomputed_from_scratch_is_the_previous_arc() {
        let previous = index();
        let resources: Vec<Arc<Resource>> = parse_documents(MESH)
            .expect("valid")
            .into_iter()
            .map(Arc::new)
            .collect();
        // New objects (other `Arc`s), equal content: recomputed, and still the same answers.
        let next = MeshIndex::update(&resources, &Naming::default(), Some(&previous));
        assert_eq!(next.recomputed_services(), 1);
        assert!(Arc::ptr_eq(
            &next.lookup("10.96.0.10:80", None),
            &previous.lookup("10.96.0.10:80", None)
        ));
        assert!(Arc::ptr_eq(
            &next.lookup("10.0.0.2:8080", None),
            &previous.lookup("10.0.0.2:8080", None)
        ));
    }

    /// Services a, b (3 endpoints each, pods named), c with a route to b, d with a consumer
    /// route from namespace other, and a policy on b's workload.
    const INCREMENTAL: &str = r#"
kind: Service
metadata: {name: a, namespace: shop}
spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: a-1, namespace: shop, labels: {kubernetes.io/service-name: a}}
endpoints:
- {addresses: [10.1.0.1], targetRef: {kind: Pod, name: a-1}}
- {addresses: [10.1.0.2], targetRef: {kind: Pod, name: a-2}}
- {addresses: [10.1.0.3], targetRef: {kind: Pod, name: a-3}}
ports: [{name: http, port: 8080}]
---
kind: Pod
metadata: {name: a-1, namespace: shop}
spec: {serviceAccountName: a}
---
kind: Service
metadata: {name: b, namespace: shop, annotations: {strait.io/opaque-ports: "6379"}}
spec: {clusterIP: 10.96.1.2, ports: [{name: http, port: 80}, {name: redis, port: 6379}]}
---
kind: EndpointSlice
metadata: {name: b-1, namespace: shop, labels: {kubernetes.io/service-name: b}, annotations: {strait.io/service-account: b}}
endpoints:
- {addresses: [10.2.0.1]}
- {addresses: [10.2.0.2]}
ports: [{name: http, port: 8080}, {name: redis, port: 6379}]
---
kind: Service
metadata: {name: c, namespace: shop}
spec: {clusterIP: 10.96.1.3, ports: [{name: http, port: 80}]}
---
kind: HTTPRoute
metadata: {name: c-to-b, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: c, port: 80}]
  rules: [{backendRefs: [{name: b, port: 80}]}]
---
kind: Service
metadata: {name: d, namespace: shop}
spec: {clusterIP: 10.96.1.4, ports: [{name: http, port: 80}]}
---
kind: HTTPRoute
metadata: {name: d-for-other, namespace: other}
spec:
  parentRefs: [{group: "", kind: Service, name: d, namespace: shop, port: 80}]
  rules: [{backendRefs: [{name: e, port: 80}]}]
---
kind: Service
metadata: {name: e, namespace: other}
spec: {clusterIP: 10.96.1.5, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: e-1, namespace: other, labels: {kubernetes.io/service-name: e}}
endpoints: [{addresses: [10.5.0.1]}]
ports: [{name: http, port: 8080}]
"#;

    fn objects(text: &str) -> Vec<Arc<Resource>> {
        parse_documents(text)
            .expect("valid")
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    /// Replaces the object named `name` (its first document) with `text`'s.
    fn replace(objects: &mut [Arc<Resource>], name: &str, text: &str) {
        let fresh = parse_documents(text).expect("valid").remove(0);
        let at = objects
            .iter()
            .position(|r| format!("{r:?}").contains(&format!("name: \"{name}\"")))
            .unwrap_or_else(|| panic!("no object {name}"));
        objects[at] = Arc::new(fresh);
    }

    /// Everything a proxy can be told, by value, for comparing with a fresh build.
    fn everything(index: &MeshIndex) -> String {
        let answers: BTreeMap<&str, &DestinationUpdate> =
            index.answers.iter().map(|(k, v)| (&**k, &**v)).collect();
        let consumer: BTreeMap<_, _> = index.consumer_answers.iter().collect();
        let opaque: BTreeMap<_, _> = index.opaque_inbound.iter().collect();
        format!(
            "{answers:?}\n{consumer:?}\n{opaque:?}\n{}",
            index.unmatched_policy_ports
        )
    }

    fn endpoints_of(index: &MeshIndex, target: &str) -> Vec<String> {
        destination(&index.lookup(target, None))
            .endpoints
            .iter()
            .map(|e| e.ip.clone())
            .collect()
    }

    #[test]
    fn an_update_recomputes_only_the_changed_service_and_those_whose_routes_read_it() {
        let naming = Naming::default();
        let mut objects = objects(INCREMENTAL);
        let first = MeshIndex::update(&objects, &naming, None);
        assert_eq!(first.recomputed_services(), 5);

        // Nothing changed: nothing recomputed, every answer the same `Arc`.
        let same = MeshIndex::update(&objects, &naming, Some(&first));
        assert_eq!(same.recomputed_services(), 0);
        for target in ["10.96.1.1:80", "a.shop:80", "10.1.0.2:8080", "10.96.1.3:80"] {
            assert!(Arc::ptr_eq(
                &same.lookup(target, None),
                &first.lookup(target, None)
            ));
        }

        // One endpoint of a goes: a alone is recomputed; b, c, d, e are not.
        replace(
            &mut objects,
            "a-1",
            "kind: EndpointSlice\nmetadata: {name: a-1, namespace: shop, labels: {kubernetes.io/service-name: a}}\nendpoints:\n- {addresses: [10.1.0.1], targetRef: {kind: Pod, name: a-1}}\n- {addresses: [10.1.0.2], targetRef: {kind: Pod, name: a-2}}\nports: [{name: http, port: 8080}]",
        );
        let second = MeshIndex::update(&objects, &naming, Some(&same));
        assert_eq!(second.recomputed_services(), 1);
        assert_eq!(endpoints_of(&second, "a.shop:80"), ["10.1.0.1", "10.1.0.2"]);
        assert!(Arc::ptr_eq(
            &second.lookup("10.96.1.2:80", None),
            &same.lookup("10.96.1.2:80", None)
        ));
        // The endpoint that stayed keeps its answer; the one that went is no longer served.
        assert!(Arc::ptr_eq(
            &second.lookup("10.1.0.1:8080", None),
            &same.lookup("10.1.0.1:8080", None)
        ));
        assert!(matches!(
            second.lookup("10.1.0.3:8080", None).update,
            Some(Update::NotInMesh(_))
        ));

        // b's endpoints change: b, and c (its route's backend is b), are recomputed.
        replace(
            &mut objects,
            "b-1",
            "kind: EndpointSlice\nmetadata: {name: b-1, namespace: shop, labels: {kubernetes.io/service-name: b}, annotations: {strait.io/service-account: b}}\nendpoints: [{addresses: [10.2.0.9]}]\nports: [{name: http, port: 8080}, {name: redis, port: 6379}]",
        );
        let third = MeshIndex::update(&objects, &naming, Some(&second));
        assert_eq!(third.recomputed_services(), 2);
        let c = third.lookup("10.96.1.3:80", None);
        let backend = &destination(&c).routes[0].backends[0];
        assert_eq!(backend.endpoints[0].ip, "10.2.0.9");

        // The Pod a-1 opts out of the mesh: a's endpoint 10.1.0.1 is announced without mTLS.
        objects.push(Arc::new(
            parse_documents("kind: Pod\nmetadata: {name: a-2, namespace: shop, annotations: {strait.io/meshed: \"false\"}}\nspec: {}")
                .expect("valid")
                .remove(0),
        ));
        let fourth = MeshIndex::update(&objects, &naming, Some(&third));
        assert_eq!(fourth.recomputed_services(), 1);
        let a = fourth.lookup("a.shop:80", None);
        let meshed: Vec<bool> = destination(&a).endpoints.iter().map(|e| e.meshed).collect();
        assert_eq!(meshed, [true, false]);

        // A route changes: everything is recomputed (routes are few and rarely change).
        replace(
            &mut objects,
            "d-for-other",
            "kind: HTTPRoute\nmetadata: {name: d-for-other, namespace: other}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: d, namespace: shop, port: 80}]\n  rules: [{backendRefs: [{name: e, port: 80, weight: 3}]}]",
        );
        let fifth = MeshIndex::update(&objects, &naming, Some(&fourth));
        assert_eq!(fifth.recomputed_services(), 5);

        // b goes: c's route now sends b's share to a backend that does not exist.
        objects.retain(|r| !matches!(&**r, Resource::Service(s) if s.metadata.name == "b"));
        let sixth = MeshIndex::update(&objects, &naming, Some(&fifth));
        assert_eq!(sixth.recomputed_services(), 1, "c only");
        assert!(!destination(&sixth.lookup("10.96.1.3:80", None)).routes[0].backends[0].exists);
        assert!(matches!(
            sixth.lookup("b.shop:80", None).update,
            Some(Update::NotInMesh(_))
        ));

        // The same as an index built from nothing.
        assert_eq!(
            everything(&sixth),
            everything(&MeshIndex::update(&objects, &naming, None))
        );
    }

    #[test]
    fn a_service_defined_twice_is_served_as_its_last_definition() {
        let twice = format!(
            "{}\n---\n{}",
            "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}",
            "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{name: grpc, port: 9000}]}",
        );
        let index = MeshIndex::build(&parse_documents(&twice).expect("valid"), &Naming::default());
        assert_eq!(index.service_count(), 1);
        assert!(matches!(
            index.lookup("web.shop:9000", None).update,
            Some(Update::Destination(_))
        ));
        assert!(matches!(
            index.lookup("web.shop:80", None).update,
            Some(Update::NotInMesh(_))
        ));
    }

    #[test]
    fn any_sequence_of_edits_ends_where_a_fresh_build_does() {
        // Random edits of INCREMENTAL's objects (endpoints added and dropped, pods opting out,
        // services removed and added back), each compared with a build from nothing.
        let naming = Naming::default();
        let base = objects(INCREMENTAL);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut objects = base.clone();
        let mut index = MeshIndex::update(&objects, &naming, None);
        for step in 0..200 {
            let i = rng.usize(..base.len());
            match rng.u8(..4) {
                // Put an original object back (an `Arc` the cache may have seen).
                0 => {
                    let key =
                        |r: &Resource| format!("{r:?}").split(',').take(2).collect::<String>();
                    match objects.iter().position(|o| key(o) == key(&base[i])) {
                        Some(at) => objects[at] = base[i].clone(),
                        None => objects.push(base[i].clone()),
                    }
                }
                // Drop an object.
                1 if objects.len() > 1 => {
                    let at = rng.usize(..objects.len());
                    objects.remove(at);
                }
                // A slice with other endpoints, or a pod opting out.
                _ => {
                    let n = rng.u8(1..4);
                    let ips: Vec<String> = (0..n).map(|k| format!("10.9.{step}.{k}")).collect();
                    let service = ["a", "b", "e"][rng.usize(..3)];
                    let ns = if service == "e" { "other" } else { "shop" };
                    let text = format!(
                        "kind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\nendpoints: [{}]\nports: [{{name: http, port: 8080}}]\n---\nkind: Pod\nmetadata: {{name: a-1, namespace: shop, annotations: {{strait.io/meshed: \"{}\"}}}}\nspec: {{serviceAccountName: a}}",
                        ips.iter()
                            .map(|ip| format!("{{addresses: [{ip}], targetRef: {{kind: Pod, name: a-1}}}}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        rng.bool()
                    );
                    for fresh in parse_documents(&text).expect("valid") {
                        let name = match &fresh {
                            Resource::EndpointSlice(s) => s.metadata.name.clone(),
                            Resource::Pod(p) => p.metadata.name.clone(),
                            _ => unreachable!(),
                        };
                        let same_kind_and_name = |o: &Arc<Resource>| match (&**o, &fresh) {
                            (Resource::EndpointSlice(a), Resource::EndpointSlice(_)) => {
                                a.metadata.name == name
                            }
                            (Resource::Pod(a), Resource::Pod(_)) => a.metadata.name == name,
                            _ => false,
                        };
                        match objects.iter().position(same_kind_and_name) {
                            Some(at) => objects[at] = Arc::new(fresh),
                            None => objects.push(Arc::new(fresh)),
                        }
                    }
                }
            }
            index = MeshIndex::update(&objects, &naming, Some(&index));
            assert_eq!(
                everything(&index),
                everything(&MeshIndex::update(&objects, &naming, None)),
                "step {step}"
            );
        }
    }

    #[test]
    fn a_port_a_service_declares_opaque_is_opaque_inbound_for_its_workloads() {
        let index = index();
        // web-a runs as web-sa (the slice's account); web-b has no proxy (inject disabled), so
        // no identity and no policy of its own.
        assert_eq!(index.inbound("shop", "web-sa").opaque_ports, vec![6379]);
        assert!(index.inbound("shop", "other").opaque_ports.is_empty());
        assert!(index.inbound("shop", "nobody").opaque_ports.is_empty());
    }

    #[test]
    fn cluster_ip_and_every_dns_form_resolve_to_the_same_answer() {
        let index = index();
        let by_ip = index.lookup("10.96.0.10:80", None);
        for name in [
            "web.shop.svc.cluster.local:80",
            "WEB.shop.svc.cluster.local.:80",
            "web.shop.svc:80",
            "web.shop:80",
        ] {
            assert_eq!(index.lookup(name, None), by_ip, "{name}");
        }
        let d = destination(&by_ip);
        assert_eq!(d.service, "web.shop.svc.cluster.local:80");
        let eps: Vec<_> = d
            .endpoints
            .iter()
            .map(|e| (e.ip.as_str(), e.port))
            .collect();
        assert_eq!(
            eps,
            [("10.0.0.2", 8080), ("10.0.0.3", 8080)],
            "sorted, ready only"
        );
    }

    #[test]
    fn identity_comes_from_the_pod_then_the_slice_and_meshed_from_annotations() {
        let index = index();
        let answer = index.lookup("10.96.0.10:80", None);
        let d = destination(&answer);
        assert_eq!(
            d.endpoints[0].identity,
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        assert!(d.endpoints[0].meshed);
        assert_eq!(d.endpoints[1].identity, "", "no sidecar, no identity");
        assert!(!d.endpoints[1].meshed, "pod opted out");
        assert_eq!(
            d.endpoints[1].labels.get("pod").map(String::as_str),
            Some("web-b")
        );
    }

    #[test]
    fn protocol_hints_follow_annotations_and_app_protocol() {
        let index = index();
        assert_eq!(
            destination(&index.lookup("10.96.0.10:6379", None)).protocol,
            ProtocolHint::Opaque as i32
        );
        let grpc = index.lookup("10.96.0.10:9000", None);
        assert_eq!(destination(&grpc).protocol, ProtocolHint::Http2 as i32);
        assert_eq!(
            destination(&grpc).endpoints[0].port,
            9001,
            "named target port"
        );
    }

    #[test]
    fn endpoint_addresses_resolve_to_themselves() {
        let index = index();
        let d = index.lookup("10.0.0.3:8080", None);
        let eps = &destination(&d).endpoints;
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].ip, "10.0.0.3");
    }

    #[test]
    fn unknown_and_malformed_targets_are_not_in_the_mesh() {
        let index = index();
        for t in ["10.96.0.10:81", "nope.shop:80", "no-port", "[::1:80", ""] {
            assert!(
                matches!(index.lookup(t, None).update, Some(Update::NotInMesh(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn port_lists_accept_ranges_and_skip_garbage() {
        assert_eq!(
            parse_port_list("25, 587,4444-4446,x,9-1"),
            [25, 587, 4444, 4445, 4446]
        );
        assert!(parse_port_list("").is_empty());
    }

    #[test]
    fn token_secrets_map_tokens_to_service_accounts() {
        let text = r#"
kind: Secret
metadata: {name: web-token, namespace: shop, annotations: {kubernetes.io/service-account.name: web}}
type: kubernetes.io/service-account-token
stringData: {token: s3cret}
---
kind: Secret
metadata: {name: b64, namespace: shop, annotations: {kubernetes.io/service-account.name: api}}
type: kubernetes.io/service-account-token
data: {token: "YXBpLXRva2Vu"}
---
kind: Secret
metadata: {name: opaque, namespace: shop}
type: Opaque
stringData: {token: not-a-token}
"#;
        let index = MeshIndex::build(&parse_documents(text).expect("valid"), &Naming::default());
        assert_eq!(
            index.token_account("s3cret"),
            Some(&("shop".to_string(), "web".to_string()))
        );
        assert_eq!(
            index.token_account("api-token"),
            Some(&("shop".to_string(), "api".to_string()))
        );
        assert_eq!(index.token_account("not-a-token"), None);
    }

    #[test]
    fn ipv6_targets_are_canonical() {
        assert_eq!(
            normalize_target("[fd00:0::1]:80").as_deref(),
            Some("[fd00::1]:80")
        );
    }

    #[test]
    fn the_default_inbound_policy_comes_from_the_namespace_else_the_cluster() {
        let docs = format!(
            "{MESH}---\nkind: Namespace\nmetadata: {{name: shop, annotations: {{strait.io/default-inbound-policy: deny}}}}\n\
             ---\nkind: Namespace\nmetadata: {{name: typo, annotations: {{strait.io/default-inbound-policy: allow-all}}}}\n"
        );
        let naming = Naming {
            default_inbound_policy: DefaultPolicy::AllAuthenticated,
            ..Naming::default()
        };
        let index = MeshIndex::build(&parse_documents(&docs).expect("valid"), &naming);
        assert_eq!(
            index.inbound("shop", "web-sa").default_policy(),
            DefaultPolicy::Deny
        );
        assert_eq!(
            index.inbound("elsewhere", "x").default_policy(),
            DefaultPolicy::AllAuthenticated,
            "no annotation: the cluster's"
        );
        assert_eq!(
            index.inbound("typo", "x").default_policy(),
            DefaultPolicy::Deny,
            "a typo never widens access"
        );
    }

    #[test]
    fn a_policy_on_the_service_port_instead_of_the_container_port_is_reported() {
        let policy = |port: u16| {
            format!(
                "{MESH}---\napiVersion: policy.strait.io/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: p, namespace: shop}}\n\
                 spec: {{targetRef: {{kind: ServiceAccount, name: web-sa}}, port: {port}, allow: [{{authenticated: true}}]}}\n"
            )
        };
        let build = |text: &str| {
            MeshIndex::build(&parse_documents(text).expect("valid"), &Naming::default())
        };
        assert_eq!(
            build(&policy(80)).unmatched_policy_ports(),
            1,
            "80 is the Service port"
        );
        assert_eq!(
            build(&policy(8080)).unmatched_policy_ports(),
            0,
            "8080 is served"
        );
    }

    #[test]
    fn filters_that_cannot_be_applied_show_in_the_route_status() {
        let text = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: cors, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{filters: [{type: CORS, cors: {}}], backendRefs: [{name: web, port: 80}]}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: chaos, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - filters: [{type: ExtensionRef, extensionRef: {group: policy.strait.io, kind: HTTPFault, name: flaky}}]
    backendRefs: [{name: web, port: 80}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: fine, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-a, value: b}]}}]
    backendRefs: [{name: web, port: 80}]
"#;
        let index = MeshIndex::build(&parse_documents(text).expect("valid"), &Naming::default());
        let status = |name: &str| {
            index
                .route_statuses()
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .expect("a status")
        };
        let cors = status("cors");
        assert!(!cors.accepted.ok);
        assert_eq!(cors.accepted.reason, "UnsupportedValue");
        assert!(
            cors.accepted.message.contains("CORS"),
            "{}",
            cors.accepted.message
        );
        let chaos = status("chaos");
        assert!(chaos.accepted.ok);
        assert_eq!(
            (chaos.resolved_refs.ok, chaos.resolved_refs.reason),
            (false, "BackendNotFound")
        );
        let fine = status("fine");
        assert!(fine.accepted.ok && fine.resolved_refs.ok);
    }
}
