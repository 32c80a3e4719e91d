//! HTTP routing: Gateway API HTTPRoutes bound to a Service (GAMMA) and SMI TrafficSplits, turned
//! into the ordered route list of a service port.
//!
//! Decisions (documented in docs/routing.md):
//! - An HTTPRoute and a TrafficSplit for the same service port: the HTTPRoute wins (the newer,
//!   richer API); the TrafficSplit is ignored with a warning.
//! - HTTPRoute rules are ordered by Gateway API precedence (exact path, longer prefix, method,
//!   more headers, more query parameters, then route name and rule order). A request matching
//!   no rule gets 404, as the Gateway API says.
//! - A TrafficSplit with `matches` routes matching requests to its backends; the others go to
//!   the root service. Without `matches`, every request is split.
//! - A backend that does not exist keeps its weight and its share of requests gets 500 (Gateway
//!   API); when every weight is 0, the route's requests get 500.

use std::collections::HashMap;

use strait_api::discovery::{
    path_match, Backend, Endpoint, PathMatch, RetryPolicy, Route, RouteMatch, ValueMatch,
};

use crate::resources::{
    BackendRef, GroupMatch, HttpRoute, HttpRouteGroup, HttpRouteMatch, HttpRouteRule,
    ReferenceGrant, TrafficSplit,
};
use crate::route_filters::{self, Place};

/// HTTPRoute annotation: gRPC status codes that are retried (comma-separated numbers; the
/// Gateway API has no field for them). Default: 14 (UNAVAILABLE).
pub const RETRY_GRPC_CODES: &str = "strait.io/retry-grpc-codes";

/// The endpoints of a service port: `(authority, endpoints)`, `None` when it does not exist.
pub type Resolve<'a> = dyn Fn(&str, &str, u16) -> Option<(String, Vec<Endpoint>)> + 'a;

/// Route sources of the whole mesh.
#[derive(Debug, Default)]
pub struct RouteSources<'a> {
    pub http_routes: Vec<&'a HttpRoute>,
    pub splits: Vec<&'a TrafficSplit>,
    pub groups: HashMap<(String, String), &'a HttpRouteGroup>,
    pub grants: Vec<&'a ReferenceGrant>,
    /// HTTPFaults (policy.strait.io), by (namespace, name), for ExtensionRef filters.
    pub faults: HashMap<(String, String), &'a crate::resources::HttpFault>,
}

impl RouteSources<'_> {
    /// Whether an HTTPRoute of `route_ns` may send to the Service `ns/name`: always within its
    /// namespace, across namespaces only with a ReferenceGrant in the Service's.
    pub fn may_refer(&self, kind: &str, route_ns: &str, ns: &str, name: &str) -> bool {
        route_ns == ns
            || self.grants.iter().any(|g| {
                g.metadata.namespace == ns && g.allows_route_to_service(kind, route_ns, name)
            })
    }

    /// The HTTPRoutes whose parentRefs name the Service `ns/name` (port `port`).
    fn attached(&self, ns: &str, name: &str, port: u16) -> Vec<&HttpRoute> {
        self.http_routes
            .iter()
            .copied()
            .filter(|r| {
                r.spec.parent_refs.iter().any(|p| {
                    p.kind.as_deref() == Some("Service")
                        && p.group.as_deref().unwrap_or("").is_empty()
                        && p.name == name
                        && p.namespace.as_deref().unwrap_or(&r.metadata.namespace) == ns
                        && p.port.is_none_or(|p| p == port)
                })
            })
            .collect()
    }

    /// Namespaces with consumer routes for the Service port: their clients get their own
    /// answer.
    pub fn consumer_namespaces(&self, ns: &str, name: &str, port: u16) -> Vec<String> {
        let mut namespaces: Vec<String> = self
            .attached(ns, name, port)
            .into_iter()
            .map(|r| r.metadata.namespace.clone())
            .filter(|route_ns| route_ns != ns)
            .collect();
        namespaces.sort();
        namespaces.dedup();
        namespaces
    }
}

/// The routes of service `ns/name` port `port` as a client in `client_ns` sees them, and
/// whether unmatched requests go to the service itself (true) or get 404 (false). No routes:
/// plain service.
///
/// GAMMA: a producer route (in the Service's namespace) applies to every client; a consumer
/// route (in another namespace) only to clients in the route's namespace, for whom it
/// replaces the producer routes. A route elsewhere can never change what other namespaces'
/// clients reach.
pub fn routes_for(
    sources: &RouteSources<'_>,
    ns: &str,
    name: &str,
    port: u16,
    cluster_domain: &str,
    resolve: &Resolve<'_>,
    client_ns: Option<&str>,
) -> (Vec<Route>, bool) {
    let all = sources.attached(ns, name, port);
    let consumer: Vec<&HttpRoute> = match client_ns {
        Some(client) if client != ns => all
            .iter()
            .copied()
            .filter(|r| r.metadata.namespace == client)
            .collect(),
        _ => Vec::new(),
    };
    let attached = if consumer.is_empty() {
        all.into_iter()
            .filter(|r| r.metadata.namespace == ns)
            .collect()
    } else {
        consumer
    };
    let splits: Vec<&TrafficSplit> = sources
        .splits
        .iter()
        .copied()
        .filter(|s| {
            s.metadata.namespace == ns && short_name(&s.spec.service, ns, cluster_domain) == name
        })
        .collect();
    if !attached.is_empty() {
        for s in &splits {
            tracing::warn!(
                split = %format!("{}/{}", s.metadata.namespace, s.metadata.name),
                service = %format!("{ns}/{name}:{port}"),
                "an HTTPRoute also targets this service port; the HTTPRoute wins and the TrafficSplit is ignored"
            );
        }
        return (http_routes(&attached, port, resolve, sources), false);
    }
    if let Some(split) = splits.first() {
        if splits.len() > 1 {
            tracing::warn!(service = %format!("{ns}/{name}"), "several TrafficSplits for one service; using the first by name");
        }
        return (
            split_routes(split, sources, port, cluster_domain, resolve),
            true,
        );
    }
    (Vec::new(), true)
}

/// A Gateway API condition of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub ok: bool,
    /// The spec's reason (`Accepted`, `NoMatchingParent`, `ResolvedRefs`, `RefNotPermitted`,
    /// `BackendNotFound`, `InvalidKind`).
    pub reason: &'static str,
    pub message: String,
}

/// The status Strait gives an HTTPRoute bound to Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    /// A GRPCRoute's (its status goes to `grpcroutes/status`).
    pub grpc: bool,
    pub generation: Option<i64>,
    /// The Service parents, `(namespace, name, port)`.
    pub parents: Vec<(String, String, Option<u16>)>,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// The status of every HTTPRoute with a Service parent: `Accepted` (its parent Services
/// exist; a consumer route says whose clients it applies to) and `ResolvedRefs` (every backend
/// exists and may be referred to).
pub fn route_statuses(
    sources: &RouteSources<'_>,
    service_exists: &dyn Fn(&str, &str) -> bool,
    resolve: &Resolve<'_>,
) -> Vec<RouteStatus> {
    let mut out = Vec::new();
    for route in &sources.http_routes {
        let route_ns = route.metadata.namespace.as_str();
        let parents: Vec<(String, String, Option<u16>)> = route
            .spec
            .parent_refs
            .iter()
            .filter(|p| {
                p.kind.as_deref() == Some("Service") && p.group.as_deref().unwrap_or("").is_empty()
            })
            .map(|p| {
                (
                    p.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
                    p.name.clone(),
                    p.port,
                )
            })
            .collect();
        if parents.is_empty() {
            continue; // a Gateway's route: not the mesh's to report on
        }
        let missing: Vec<String> = parents
            .iter()
            .filter(|(ns, name, _)| !service_exists(ns, name))
            .map(|(ns, name, _)| format!("{ns}/{name}"))
            .collect();
        let consumer_of: Vec<String> = parents
            .iter()
            .filter(|(ns, _, _)| ns != route_ns)
            .map(|(ns, name, _)| format!("{ns}/{name}"))
            .collect();
        let accepted = if !missing.is_empty() {
            Condition {
                ok: false,
                reason: "NoMatchingParent",
                message: format!("parent Service {} does not exist", missing.join(", ")),
            }
        } else if !consumer_of.is_empty() {
            Condition {
                ok: true,
                reason: "Accepted",
                message: format!(
                    "consumer route for {}: applies to clients in namespace {route_ns} only",
                    consumer_of.join(", ")
                ),
            }
        } else {
            Condition {
                ok: true,
                reason: "Accepted",
                message: "producer route: applies to every client".into(),
            }
        };
        let mut resolved_refs = Condition {
            ok: true,
            reason: "ResolvedRefs",
            message: "every backend resolved".into(),
        };
        'rules: for rule in &route.spec.rules {
            for b in &rule.backend_refs {
                let ns = b.namespace.as_deref().unwrap_or(route_ns);
                let port = b.port.or(parents.first().and_then(|p| p.2)).unwrap_or(0);
                let problem = if b.kind.as_deref().unwrap_or("Service") != "Service"
                    || !b.group.as_deref().unwrap_or("").is_empty()
                {
                    Some((
                        "InvalidKind",
                        format!("backend {} is not a Service", b.name),
                    ))
                } else if !sources.may_refer(route.kind(), route_ns, ns, &b.name) {
                    Some((
                        "RefNotPermitted",
                        format!(
                            "backend {ns}/{} is in another namespace and no ReferenceGrant there allows HTTPRoutes of {route_ns}; its share gets 500",
                            b.name
                        ),
                    ))
                } else if b.port.is_some() && resolve(ns, &b.name, port).is_none()
                    || !service_exists(ns, &b.name)
                {
                    Some((
                        "BackendNotFound",
                        format!("backend Service {ns}/{} (port {port}) does not exist; its share gets 500", b.name),
                    ))
                } else {
                    None
                };
                if let Some((reason, message)) = problem {
                    resolved_refs = Condition {
                        ok: false,
                        reason,
                        message,
                    };
                    break 'rules;
                }
            }
        }
        let mut accepted = accepted;
        let parent_port = parents.first().and_then(|p| p.2).unwrap_or(0);
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let kind = if route.grpc { "grpcroute" } else { "httproute" };
            let name = format!("{kind} {route_ns}/{}#{i}", route.metadata.name);
            if let Some(p) = filter_problem(
                rule,
                &name,
                (route.kind(), route_ns),
                parent_port,
                resolve,
                sources,
            ) {
                let condition = match p.condition {
                    route_filters::Condition::Accepted => &mut accepted,
                    route_filters::Condition::ResolvedRefs => &mut resolved_refs,
                };
                if condition.ok {
                    *condition = Condition {
                        ok: false,
                        reason: p.reason,
                        message: format!("rule {i}: {}", p.message),
                    };
                }
            }
        }
        out.push(RouteStatus {
            namespace: route_ns.to_string(),
            name: route.metadata.name.clone(),
            grpc: route.grpc,
            generation: route.metadata.generation,
            parents,
            accepted,
            resolved_refs,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The first reason a rule's filters (or its backendRefs' filters) cannot be applied, or a
/// mirror backend that does not exist.
fn filter_problem(
    rule: &HttpRouteRule,
    name: &str,
    (kind, route_ns): (&str, &str),
    parent_port: u16,
    resolve: &Resolve<'_>,
    sources: &RouteSources<'_>,
) -> Option<route_filters::Problem> {
    let at = (name, (kind, route_ns), parent_port);
    with_filter_context(at, resolve, sources, |cx| first_problem(rule, cx))
}

/// What `filter_problem` looks for, in a rule's filter context.
fn first_problem(
    rule: &HttpRouteRule,
    cx: &route_filters::Context<'_>,
) -> Option<route_filters::Problem> {
    let lists = std::iter::once((&rule.filters, Place::Rule)).chain(
        rule.backend_refs
            .iter()
            .map(|b| (&b.filters, Place::Backend)),
    );
    for (filters, place) in lists {
        match route_filters::translate(filters, place, cx) {
            Err(p) => {
                return Some(route_filters::Problem {
                    message: format!("{}; the rule's requests get 500", p.message),
                    ..p
                })
            }
            Ok(translated) => {
                for f in translated {
                    if let Some(strait_api::discovery::filter::Kind::RequestMirror(m)) = f.kind {
                        if let Some(b) = m.backend.filter(|b| !b.exists) {
                            return Some(route_filters::Problem {
                                condition: route_filters::Condition::ResolvedRefs,
                                reason: "BackendNotFound",
                                message: format!("mirror backend {} does not exist (or may not be referred to); nothing is mirrored", b.service),
                            });
                        }
                    }
                }
            }
        }
    }
    None
}

/// Logs the status of every route that is new or changed since `previous` (one line each:
/// what `kubectl get httproute -o yaml` would show in Kubernetes mode).
pub fn log_status_changes(previous: &[RouteStatus], now: &[RouteStatus]) {
    for status in now.iter().filter(|s| !previous.contains(s)) {
        let level_ok = status.accepted.ok && status.resolved_refs.ok;
        let route = format!("{}/{}", status.namespace, status.name);
        let accepted = format!(
            "{} ({}: {})",
            if status.accepted.ok { "True" } else { "False" },
            status.accepted.reason,
            status.accepted.message
        );
        let resolved = format!(
            "{} ({}: {})",
            if status.resolved_refs.ok {
                "True"
            } else {
                "False"
            },
            status.resolved_refs.reason,
            status.resolved_refs.message
        );
        let kind = if status.grpc {
            "GRPCRoute"
        } else {
            "HTTPRoute"
        };
        if level_ok {
            tracing::info!(%route, %accepted, resolved_refs = %resolved, "{kind} status");
        } else {
            tracing::warn!(%route, %accepted, resolved_refs = %resolved, "{kind} status");
        }
    }
}

/// The `status` of an HTTPRoute as the Gateway API writes it: one entry per Service parent,
/// with the `Accepted` and `ResolvedRefs` conditions.
pub fn status_json(status: &RouteStatus, now_rfc3339: &str) -> serde_json::Value {
    let condition = |type_: &str, c: &Condition| {
        let mut v = serde_json::json!({
            "type": type_,
            "status": if c.ok { "True" } else { "False" },
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": now_rfc3339,
        });
        if let Some(g) = status.generation {
            v["observedGeneration"] = g.into();
        }
        v
    };
    let parents: Vec<serde_json::Value> = status
        .parents
        .iter()
        .map(|(ns, name, port)| {
            let mut parent = serde_json::json!({"group": "", "kind": "Service", "name": name, "namespace": ns});
            if let Some(port) = port {
                parent["port"] = (*port).into();
            }
            serde_json::json!({
                "parentRef": parent,
                "controllerName": CONTROLLER_NAME,
                "conditions": [condition("Accepted", &status.accepted), condition("ResolvedRefs", &status.resolved_refs)],
            })
        })
        .collect();
    serde_json::json!({"status": {"parents": parents}})
}

/// The controller name in route status entries.
pub const CONTROLLER_NAME: &str = "strait.io/mesh";

/// `web`, `web.shop`, `web.shop.svc`, `web.shop.svc.cluster.local` -> `web`.
fn short_name<'a>(service: &'a str, ns: &str, cluster_domain: &str) -> &'a str {
    for suffix in [
        format!(".{ns}.svc.{cluster_domain}"),
        format!(".{ns}.svc"),
        format!(".{ns}"),
    ] {
        if let Some(short) = service.strip_suffix(suffix.as_str()) {
            return short;
        }
    }
    service
}

fn millis(d: Option<&String>, what: &str, route: &str) -> u64 {
    match d.map(|s| humantime::parse_duration(s)) {
        None => 0,
        Some(Ok(d)) => d.as_millis() as u64,
        Some(Err(e)) => {
            tracing::warn!(route, what, error = %e, "not a duration; ignored");
            0
        }
    }
}

fn http_routes(
    attached: &[&HttpRoute],
    port: u16,
    resolve: &Resolve<'_>,
    sources: &RouteSources<'_>,
) -> Vec<Route> {
    // One route per (rule, match), so precedence can be sorted per match.
    let mut keyed = Vec::new();
    let mut sorted: Vec<&&HttpRoute> = attached.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for route in sorted {
        let route_ns = route.metadata.namespace.as_str();
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let kind = if route.grpc { "grpcroute" } else { "httproute" };
            let name = format!("{kind} {route_ns}/{}#{i}", route.metadata.name);
            let mut base = rule_route(
                &name,
                rule,
                (route.kind(), route_ns),
                port,
                resolve,
                sources,
            );
            if let (Some(retry), Some(codes)) = (
                base.retry.as_mut(),
                route.metadata.annotations.get(RETRY_GRPC_CODES),
            ) {
                retry.grpc_codes = codes
                    .split(',')
                    .filter_map(|c| c.trim().parse().ok())
                    .collect();
            }
            let matches = if rule.matches.is_empty() {
                vec![HttpRouteMatch::default()]
            } else {
                rule.matches.clone()
            };
            for m in matches {
                let compiled = route_match(&m);
                let key = precedence(&compiled);
                let mut r = base.clone();
                r.matches = vec![compiled];
                route_filters::bind_matched_prefix(&mut r);
                keyed.push((key, keyed.len(), r));
            }
        }
    }
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, _, r)| r).collect()
}

/// Gateway API precedence, larger first.
fn precedence(m: &RouteMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(p) if p.kind == path_match::Kind::Exact as i32 => (2, p.value.len()),
        Some(p) if p.kind == path_match::Kind::Prefix as i32 => (1, p.value.len()),
        Some(p) => (0, p.value.len()),
        None => (1, 1),
    };
    (
        kind,
        len,
        !m.method.is_empty(),
        m.headers.len(),
        m.query_params.len(),
    )
}

/// An HTTPRoute match as proxies get it (HTTPRoutes, GRPCRoutes and the route matches of
/// policies).
pub fn route_match(m: &HttpRouteMatch) -> RouteMatch {
    let path = m.path.as_ref().map_or(
        PathMatch {
            kind: path_match::Kind::Prefix as i32,
            value: "/".into(),
        },
        |p| PathMatch {
            kind: match p.type_.as_deref() {
                Some("Exact") => path_match::Kind::Exact,
                Some("RegularExpression") => path_match::Kind::Regex,
                _ => path_match::Kind::Prefix,
            } as i32,
            value: p.value.clone().unwrap_or_else(|| "/".into()),
        },
    );
    let value_match = |n: &crate::resources::NamedMatch| ValueMatch {
        name: n.name.to_ascii_lowercase(),
        value: n.value.clone(),
        regex: n.type_.as_deref() == Some("RegularExpression"),
    };
    RouteMatch {
        path: Some(path),
        headers: m.headers.iter().map(value_match).collect(),
        query_params: m
            .query_params
            .iter()
            .map(|q| ValueMatch {
                name: q.name.clone(),
                ..value_match(q)
            })
            .collect(),
        method: m.method.clone().unwrap_or_default(),
    }
}

fn rule_route(
    name: &str,
    rule: &HttpRouteRule,
    (kind, route_ns): (&str, &str),
    parent_port: u16,
    resolve: &Resolve<'_>,
    sources: &RouteSources<'_>,
) -> Route {
    let at = (name, (kind, route_ns), parent_port);
    with_filter_context(at, resolve, sources, |cx| rule_route_in(name, rule, cx))
}

/// The context filters are translated in: the rule's backend resolution and the mesh's
/// HTTPFaults.
fn with_filter_context<R>(
    (name, (kind, route_ns), parent_port): (&str, (&str, &str), u16),
    resolve: &Resolve<'_>,
    sources: &RouteSources<'_>,
    f: impl FnOnce(&route_filters::Context<'_>) -> R,
) -> R {
    let backend =
        |b: &BackendRef| backend_of(b, name, (kind, route_ns), parent_port, resolve, sources);
    let fault = |ns: &str, fault: &str| {
        sources
            .faults
            .get(&(ns.to_string(), fault.to_string()))
            .copied()
    };
    f(&route_filters::Context {
        route_ns,
        backend: &backend,
        fault: &fault,
    })
}

fn rule_route_in(name: &str, rule: &HttpRouteRule, cx: &route_filters::Context<'_>) -> Route {
    let backend = cx.backend;
    let mut invalid = String::new();
    let mut problem = |p: route_filters::Problem| {
        if invalid.is_empty() {
            tracing::warn!(
                route = name,
                reason = p.reason,
                "{}; the rule's requests get 500",
                p.message
            );
            invalid = p.message;
        }
        Vec::new()
    };
    let backends: Vec<Backend> = rule
        .backend_refs
        .iter()
        .map(|b| Backend {
            filters: route_filters::translate(&b.filters, Place::Backend, cx)
                .unwrap_or_else(&mut problem),
            ..backend(b)
        })
        .collect();
    let filters =
        route_filters::translate(&rule.filters, Place::Rule, cx).unwrap_or_else(&mut problem);
    let retry = rule.retry.as_ref().map(|r| RetryPolicy {
        attempts: r.attempts.unwrap_or(0),
        codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
        grpc_codes: Vec::new(),
        backoff_ms: millis(r.backoff.as_ref(), "retry.backoff", name),
    });
    Route {
        name: name.to_string(),
        matches: Vec::new(),
        backends,
        request_timeout_ms: millis(
            rule.timeouts.as_ref().and_then(|t| t.request.as_ref()),
            "timeouts.request",
            name,
        ),
        backend_request_timeout_ms: millis(
            rule.timeouts
                .as_ref()
                .and_then(|t| t.backend_request.as_ref()),
            "timeouts.backendRequest",
            name,
        ),
        retry,
        request_header_modifier: None,
        filters,
        invalid,
    }
}

/// A backendRef as proxies get it: its service's endpoints, or `exists: false` (its share of
/// requests gets 500) when it does not exist, is not a Service, or is in another namespace
/// without a ReferenceGrant there.
fn backend_of(
    b: &BackendRef,
    name: &str,
    (kind, route_ns): (&str, &str),
    parent_port: u16,
    resolve: &Resolve<'_>,
    sources: &RouteSources<'_>,
) -> Backend {
    let kind_ok = b.kind.as_deref().unwrap_or("Service") == "Service"
        && b.group.as_deref().unwrap_or("").is_empty();
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    let port = b.port.unwrap_or(parent_port);
    let weight = b.weight.unwrap_or(1);
    let missing = || Backend {
        service: format!("{}.{ns}:{port}", b.name),
        weight,
        ..Default::default()
    };
    if kind_ok && !sources.may_refer(kind, route_ns, ns, &b.name) {
        tracing::warn!(route = name, backend = %format!("{ns}/{}:{port}", b.name), "backend in another namespace without a ReferenceGrant there; its share gets 500");
        return missing();
    }
    match resolve(ns, &b.name, port).filter(|_| kind_ok) {
        Some((service, endpoints)) => Backend {
            service,
            weight,
            endpoints,
            exists: true,
            filters: Vec::new(),
        },
        None => {
            tracing::warn!(route = name, backend = %format!("{ns}/{}:{port}", b.name), "backend service port does not exist; its share gets 500");
            missing()
        }
    }
}

fn split_routes(
    split: &TrafficSplit,
    sources: &RouteSources<'_>,
    port: u16,
    cluster_domain: &str,
    resolve: &Resolve<'_>,
) -> Vec<Route> {
    let ns = split.metadata.namespace.as_str();
    let name = format!("trafficsplit {ns}/{}", split.metadata.name);
    let backends: Vec<Backend> = split
        .spec
        .backends
        .iter()
        .map(|b| {
            let svc = short_name(&b.service, ns, cluster_domain);
            let weight = b.weight.thousandths().map_or(0, |w| (w / 1000).max(u64::from(w > 0)) as u32);
            match resolve(ns, svc, port) {
                Some((service, endpoints)) => Backend {
                    service,
                    weight,
                    endpoints,
                    exists: true,
                    filters: Vec::new(),
                },
                None => {
                    tracing::warn!(split = %name, backend = svc, port, "backend service port does not exist; its share gets 500");
                    Backend {
                        service: format!("{svc}.{ns}:{port}"),
                        weight,
                        ..Default::default()
                    }
                }
            }
        })
        .collect();
    let route = |matches: Vec<RouteMatch>| Route {
        name: name.clone(),
        matches,
        backends: backends.clone(),
        ..Default::default()
    };
    if split.spec.matches.is_empty() {
        return vec![route(Vec::new())];
    }
    let mut matches = Vec::new();
    for r in &split.spec.matches {
        if r.kind.as_deref().is_some_and(|k| k != "HTTPRouteGroup") {
            tracing::warn!(split = %name, kind = ?r.kind, "only HTTPRouteGroup matches are supported; ignored");
            continue;
        }
        match sources.groups.get(&(ns.to_string(), r.name.clone())) {
            Some(group) => matches.extend(group.spec.matches.iter().map(group_match)),
            None => {
                tracing::warn!(split = %name, group = %r.name, "HTTPRouteGroup not found; it matches nothing")
            }
        }
    }
    if matches.is_empty() {
        // Every referenced group is missing: nothing matches, everything goes to the root.
        return vec![Route {
            name: name.clone(),
            matches: vec![RouteMatch {
                path: Some(PathMatch {
                    kind: path_match::Kind::Exact as i32,
                    value: "\u{0}never".into(),
                }),
                ..Default::default()
            }],
            backends,
            ..Default::default()
        }];
    }
    vec![route(matches)]
}

/// An SMI match: the path regex, the methods (any of), the headers (all, values are regexes).
/// Several methods become one match per method.
fn group_match(m: &GroupMatch) -> RouteMatch {
    let path = m.path_regex.as_ref().map(|r| PathMatch {
        kind: path_match::Kind::Regex as i32,
        value: r.clone(),
    });
    let headers = m
        .headers
        .as_ref()
        .map(|h| {
            h.pairs()
                .into_iter()
                .map(|(name, value)| ValueMatch {
                    name: name.to_ascii_lowercase(),
                    value,
                    regex: true,
                })
                .collect()
        })
        .unwrap_or_default();
    let method = match m.methods.as_slice() {
        [one] if one != "*" => one.clone(),
        _ => String::new(),
    };
    RouteMatch {
        path,
        headers,
        query_params: Vec::new(),
        method,
    }
}

#[cfg(test)]
mod tests {
    use crate::index::{MeshIndex, Naming};
    use crate::local::parse::parse_documents;
    use strait_api::discovery::destination_update::Update;
    use strait_api::discovery::Destination;

    const SERVICES: &str = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: web-v1, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: web-v1, namespace: shop, labels: {kubernetes.io/service-name: web-v1}}
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
---
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: web-v2, namespace: shop, labels: {kubernetes.io/service-name: web-v2}}
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.2]}]
---
kind: Service
metadata: {name: orders, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: grpc, port: 9000}]}
"#;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/k8s/crd")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn destination(extra: &str, target: &str) -> Destination {
        let mut docs = parse_documents(SERVICES).expect("services");
        docs.extend(parse_documents(extra).expect("routes"));
        match MeshIndex::build(&docs, &Naming::default())
            .lookup(target, None)
            .update
            .clone()
        {
            Some(Update::Destination(d)) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_captured_httproute_becomes_ordered_routes_with_weights_and_timeouts() {
        let d = destination(&fixture("httproutes-v1-list.json"), "10.96.0.10:80");
        assert!(
            !d.unmatched_to_service,
            "HTTPRoute: unmatched requests get 404"
        );
        assert_eq!(d.routes.len(), 2, "{:#?}", d.routes);
        // The more specific rule first: PathPrefix /api + header x-canary.
        let canary = &d.routes[0];
        let m = &canary.matches[0];
        assert_eq!(m.path.as_ref().map(|p| p.value.as_str()), Some("/api"));
        assert_eq!(m.headers[0].name, "x-canary");
        assert_eq!(canary.backends.len(), 1);
        assert_eq!(
            canary.backends[0].service,
            "web-v2.shop.svc.cluster.local:80"
        );
        assert_eq!(canary.backends[0].endpoints[0].ip, "10.0.0.2");
        let split = &d.routes[1];
        let weights: Vec<_> = split
            .backends
            .iter()
            .map(|b| (b.service.as_str(), b.weight))
            .collect();
        assert_eq!(
            weights,
            [
                ("web-v1.shop.svc.cluster.local:80", 90),
                ("web-v2.shop.svc.cluster.local:80", 10)
            ]
        );
        assert_eq!(split.request_timeout_ms, 10_000);
        // v1beta1 reads the same.
        let beta = destination(&fixture("httproutes-v1beta1-list.json"), "10.96.0.10:80");
        assert_eq!(beta.routes, d.routes);
    }

    #[test]
    fn the_captured_trafficsplits_split_and_send_unmatched_requests_to_the_root() {
        let d = destination(
            &fixture("trafficsplits-v1alpha4-list.json"),
            "10.96.0.10:80",
        );
        assert!(
            d.unmatched_to_service,
            "TrafficSplit: unmatched requests go to the root service"
        );
        assert_eq!(d.routes.len(), 1);
        let weights: Vec<_> = d.routes[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [90, 10]);
        // orders-split names its root by FQDN, weights 500/500; its backends do not exist here.
        let orders = destination(
            &fixture("trafficsplits-v1alpha2-list.json"),
            "10.96.0.20:9000",
        );
        assert_eq!(orders.routes.len(), 1, "{:#?}", orders.routes);
        assert!(orders.routes[0]
            .backends
            .iter()
            .all(|b| !b.exists && b.weight == 500));
    }

    #[test]
    fn an_httproute_wins_over_a_trafficsplit_for_the_same_service() {
        let both = format!(
            "{}\n---\n{}",
            fixture("httproutes-v1-list.json"),
            fixture("trafficsplits-v1alpha4-list.json")
        );
        let d = destination(&both, "10.96.0.10:80");
        assert!(
            d.routes.iter().all(|r| r.name.starts_with("httproute")),
            "{:#?}",
            d.routes
        );
    }

    #[test]
    fn a_grpcroute_matches_methods_of_grpc_requests_and_retries_by_status() {
        let route = r#"
kind: GRPCRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: echo, namespace: shop, annotations: {strait.io/retry-grpc-codes: "14", strait.io/retry-attempts: "3"}}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{method: {service: strait.test.v1.Echo, method: Unary}}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{method: {method: ServerStream}, headers: [{name: x-tier, value: gold}]}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{method: {service: strait.test.v1.Echo}}]
    backendRefs: [{name: web-v1, port: 80, weight: 3}, {name: web-v2, port: 80, weight: 1}]
"#;
        let d = destination(route, "10.96.0.10:80");
        let paths: Vec<(i32, &str)> = d
            .routes
            .iter()
            .map(|r| {
                let p = r.matches[0].path.as_ref().expect("path");
                (p.kind, p.value.as_str())
            })
            .collect();
        // Exact method first, then the service prefix, then the method-only regex.
        assert_eq!(
            paths,
            [
                (
                    strait_api::discovery::path_match::Kind::Exact as i32,
                    "/strait.test.v1.Echo/Unary"
                ),
                (
                    strait_api::discovery::path_match::Kind::Prefix as i32,
                    "/strait.test.v1.Echo"
                ),
                (
                    strait_api::discovery::path_match::Kind::Regex as i32,
                    "/[^/]+/ServerStream"
                ),
            ]
        );
        for r in &d.routes {
            assert!(r.name.starts_with("grpcroute shop/echo#"), "{}", r.name);
            assert_eq!(r.matches[0].method, "POST");
            assert!(
                r.matches[0]
                    .headers
                    .iter()
                    .any(|h| h.name == "content-type" && h.regex),
                "only gRPC requests: {:?}",
                r.matches[0].headers
            );
            let retry = r.retry.as_ref().expect("retry from the annotations");
            assert_eq!(
                (retry.attempts, retry.grpc_codes.as_slice()),
                (3, &[14][..])
            );
        }
        assert!(d.routes[2].matches[0]
            .headers
            .iter()
            .any(|h| h.name == "x-tier"));
        let weights: Vec<u32> = d.routes[1].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [3, 1]);
    }

    #[test]
    fn header_modifiers_retries_and_missing_backends() {
        let route = r#"
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, weight: 1}, {name: ghost, port: 80, weight: 1}]
    retry: {codes: [503], attempts: 2, backoff: 50ms}
    timeouts: {request: 200ms, backendRequest: 100ms}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Env, value: canary}], remove: [x-debug]}
"#;
        let d = destination(&route.replace("metadata: {name: r, namespace: shop}", "metadata: {name: r, namespace: shop, annotations: {strait.io/retry-grpc-codes: \"14, 8\"}}"), "10.96.0.10:80");
        let r = &d.routes[0];
        assert_eq!(
            r.retry.as_ref().map(|p| p.grpc_codes.clone()),
            Some(vec![14, 8])
        );
        assert_eq!(r.request_timeout_ms, 200);
        assert_eq!(r.backend_request_timeout_ms, 100);
        let retry = r.retry.as_ref().expect("retry");
        assert_eq!(
            (retry.attempts, retry.codes.as_slice(), retry.backoff_ms),
            (2, &[503][..], 50)
        );
        let Some(strait_api::discovery::filter::Kind::RequestHeaderModifier(m)) =
            r.filters.first().and_then(|f| f.kind.as_ref())
        else {
            panic!("a RequestHeaderModifier: {:?}", r.filters)
        };
        assert_eq!(m.set[0].name, "x-env");
        assert_eq!(m.remove, ["x-debug"]);
        assert!(
            r.backends[0].exists && !r.backends[1].exists,
            "{:?}",
            r.backends
        );
    }

    const OTHER_NAMESPACE: &str = r#"
kind: Service
metadata: {name: evil, namespace: plain}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: evil, namespace: plain, labels: {kubernetes.io/service-name: evil}}
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.9.9]}]
"#;

    fn destination_for(extra: &str, target: &str, client_ns: Option<&str>) -> Destination {
        let mut docs = parse_documents(SERVICES).expect("services");
        docs.extend(parse_documents(OTHER_NAMESPACE).expect("other"));
        docs.extend(parse_documents(extra).expect("routes"));
        match MeshIndex::build(&docs, &Naming::default())
            .lookup(target, client_ns)
            .update
            .clone()
        {
            Some(Update::Destination(d)) => d,
            other => panic!("{other:?}"),
        }
    }

    /// The hijack seen against a real API server: a route in another namespace naming the
    /// Service as its parent.
    const CONSUMER_ROUTE: &str = r#"
kind: HTTPRoute
metadata: {name: takeover, namespace: plain}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop, port: 80}]
  rules: [{backendRefs: [{name: evil, port: 80}]}]
"#;

    #[test]
    fn a_route_in_another_namespace_applies_to_its_own_clients_only() {
        // Clients in the Service's namespace and in any third namespace: untouched.
        for client in [Some("shop"), Some("default"), None] {
            let d = destination_for(CONSUMER_ROUTE, "10.96.0.10:80", client);
            assert!(d.routes.is_empty(), "{client:?}: {:#?}", d.routes);
            assert!(d.unmatched_to_service);
        }
        // Clients in the route's own namespace: their consumer route.
        let d = destination_for(
            CONSUMER_ROUTE,
            "web.shop.svc.cluster.local:80",
            Some("plain"),
        );
        assert_eq!(d.routes.len(), 1, "{:#?}", d.routes);
        assert_eq!(
            d.routes[0].backends[0].service,
            "evil.plain.svc.cluster.local:80"
        );
        assert!(d.routes[0].backends[0].exists);
    }

    #[test]
    fn a_consumer_route_replaces_the_producer_route_for_its_namespace_only() {
        let producer = r#"
kind: HTTPRoute
metadata: {name: producer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web-v1, port: 80}]}]
"#;
        let both = format!("{producer}---\n{CONSUMER_ROUTE}");
        let everyone = destination_for(&both, "10.96.0.10:80", Some("default"));
        assert_eq!(
            everyone.routes[0].backends[0].service,
            "web-v1.shop.svc.cluster.local:80"
        );
        let consumer = destination_for(&both, "10.96.0.10:80", Some("plain"));
        assert_eq!(consumer.routes.len(), 1);
        assert_eq!(
            consumer.routes[0].backends[0].service,
            "evil.plain.svc.cluster.local:80"
        );
    }

    #[test]
    fn a_backend_in_another_namespace_needs_a_reference_grant_there() {
        let route = r#"
kind: HTTPRoute
metadata: {name: producer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web-v1, port: 80, weight: 50}, {name: evil, namespace: plain, port: 80, weight: 50}]}]
"#;
        let d = destination_for(route, "10.96.0.10:80", Some("shop"));
        let evil = &d.routes[0].backends[1];
        assert!(!evil.exists, "no ReferenceGrant: its share gets 500");
        assert!(evil.endpoints.is_empty());
        assert!(d.routes[0].backends[0].exists);
        // A grant for another Service, or from another namespace, is not enough.
        let wrong = r#"
---
kind: ReferenceGrant
metadata: {name: g, namespace: plain}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service}]
---
kind: ReferenceGrant
metadata: {name: g2, namespace: plain}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: other}]
"#;
        let d = destination_for(&format!("{route}{wrong}"), "10.96.0.10:80", Some("shop"));
        assert!(!d.routes[0].backends[1].exists);
        let grant = r#"
---
kind: ReferenceGrant
metadata: {name: allow-shop, namespace: plain}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: evil}]
"#;
        let d = destination_for(&format!("{route}{grant}"), "10.96.0.10:80", Some("shop"));
        assert!(d.routes[0].backends[1].exists);
        assert_eq!(d.routes[0].backends[1].endpoints[0].ip, "10.0.9.9");
    }
}
