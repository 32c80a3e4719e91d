//! Per-request routing of one destination: the routes discovery sent (HTTPRoute,
//! TrafficSplit), compiled once per update, matched per request.
//!
//! Matching follows the Gateway API: a route matches when any of its matches does; a match
//! needs its path, every header, every query parameter and the method. Prefix paths match by
//! path element (`/api` matches `/api` and `/api/x`, not `/apix`). Routes are already in order
//! of precedence; the first that matches wins.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Request};
use regex::Regex;
use strait_api::discovery::{path_match, Route, RouteMatch, ValueMatch};

use crate::stack::{Build, RouteService};

/// The routes of one destination.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    /// Requests matching no route go to the service's own endpoints (TrafficSplit) instead of
    /// getting 404 (HTTPRoute).
    pub unmatched_to_service: bool,
}

/// One route: its matches, and the stack its requests go through (filters, timeouts, retries,
/// split, balancers; see [`crate::stack`]).
pub struct CompiledRoute {
    pub name: Arc<str>,
    matches: Vec<CompiledMatch>,
    pub stack: RouteService,
}

impl std::fmt::Debug for CompiledRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRoute")
            .field("name", &self.name)
            .field("matches", &self.matches)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum PathMatcher {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    /// A regex that did not compile: matches nothing (never widens a route).
    Never,
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
    Never,
}

/// One route match, compiled (routes and per-route authorization share it).
#[derive(Debug)]
pub struct CompiledMatch {
    path: Option<PathMatcher>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
    method: Option<Method>,
}

fn anchored(re: &str, route: &str) -> Option<Regex> {
    match Regex::new(&format!("^(?:{re})$")) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(route, regex = re, error = %e, "invalid regular expression; it matches nothing");
            None
        }
    }
}

fn value_matcher(v: &ValueMatch, route: &str) -> ValueMatcher {
    if v.regex {
        anchored(&v.value, route).map_or(ValueMatcher::Never, ValueMatcher::Regex)
    } else {
        ValueMatcher::Exact(v.value.clone())
    }
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Regex(r) => r.is_match(value),
            ValueMatcher::Never => false,
        }
    }
}

pub fn compile_match(m: &RouteMatch, route: &str) -> CompiledMatch {
    let path = m
        .path
        .as_ref()
        .map(|p| match path_match::Kind::try_from(p.kind) {
            Ok(path_match::Kind::Exact) => PathMatcher::Exact(p.value.clone()),
            Ok(path_match::Kind::Regex) => {
                anchored(&p.value, route).map_or(PathMatcher::Never, PathMatcher::Regex)
            }
            _ => PathMatcher::Prefix(p.value.trim_end_matches('/').to_string()),
        });
    CompiledMatch {
        path,
        headers: m
            .headers
            .iter()
            .filter_map(|h| {
                Some((
                    HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    value_matcher(h, route),
                ))
            })
            .collect(),
        query: m
            .query_params
            .iter()
            .map(|q| (q.name.clone(), value_matcher(q, route)))
            .collect(),
        method: (!m.method.is_empty())
            .then(|| Method::from_bytes(m.method.as_bytes()).ok())
            .flatten(),
    }
}

impl CompiledMatch {
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatcher::Exact(p)) => path == p,
            Some(PathMatcher::Prefix(p)) => {
                p.is_empty()
                    || (path.starts_with(p.as_str())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            Some(PathMatcher::Regex(r)) => r.is_match(path),
            Some(PathMatcher::Never) => false,
        };
        if !path_ok || self.method.as_ref().is_some_and(|m| m != req.method()) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, m)| {
            req.headers()
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        });
        if !headers_ok {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let query = req.uri().query().unwrap_or("");
        self.query.iter().all(|(name, m)| {
            query.split('&').any(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                k == name && m.matches(v)
            })
        })
    }
}

impl Router {
    /// Compiles `routes` into their stacks; `build` says what they share (balancers by
    /// backend service, the destination's own balancer, its retry budget and metrics).
    pub fn compile(routes: &[Route], unmatched_to_service: bool, build: &mut Build<'_>) -> Self {
        let compiled = routes
            .iter()
            .map(|r| CompiledRoute {
                name: r.name.as_str().into(),
                matches: r
                    .matches
                    .iter()
                    .map(|m| compile_match(m, &r.name))
                    .collect(),
                stack: build.route(r),
            })
            .collect();
        Self {
            routes: compiled,
            unmatched_to_service,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route matching `req`.
    pub fn route<B>(&self, req: &Request<B>) -> Option<&CompiledRoute> {
        self.routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}

/// The deadline a gRPC client sent (`grpc-timeout: 100m`), if any.
pub fn grpc_timeout<B>(req: &Request<B>) -> Option<Duration> {
    let v = req.headers().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balancer;
    use crate::metrics::{HttpMetrics, Metrics};
    use crate::retry::RetryBudget;
    use crate::stack::Egress;
    use std::collections::HashMap;
    use strait_api::discovery::{Backend, PathMatch};

    fn route(name: &str, m: RouteMatch, weights: &[(u32, bool)]) -> Route {
        Route {
            name: name.into(),
            matches: vec![m],
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, (w, exists))| Backend {
                    service: format!("b{i}"),
                    weight: *w,
                    endpoints: Vec::new(),
                    exists: *exists,
                    filters: Vec::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch {
                kind: path_match::Kind::Prefix as i32,
                value: p.into(),
            }),
            ..Default::default()
        }
    }

    fn egress() -> Arc<Egress> {
        Arc::new(Egress {
            clients: crate::http::forward::Clients::new(
                Duration::from_secs(1),
                Duration::from_secs(3),
            ),
            workload: None,
            mirrors: Arc::new(crate::stack::mirror::Mirrors::new(Arc::new(Metrics::new()))),
        })
    }

    fn compile(routes: &[Route]) -> Router {
        let (egress, budget, metrics) = shared();
        let shared_balancers = crate::stack::backends::SharedBalancers::default();
        let mut build = Build {
            egress: &egress,
            budget: &budget,
            metrics: &metrics,
            own: None,
            shared: &shared_balancers,
            used: HashMap::new(),
            new_balancer: &|| Balancer::new(Duration::from_secs(1), None),
            to_specs: &|_| Vec::new(),
        };
        Router::compile(routes, false, &mut build)
    }

    #[allow(clippy::type_complexity)]
    fn shared() -> (Arc<Egress>, Arc<RetryBudget>, Arc<HttpMetrics>) {
        let budget = Arc::new(RetryBudget::new(&crate::retry::BudgetSettings {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }));
        let metrics = Arc::new(Arc::new(Metrics::new()).http(
            crate::metrics::Direction::Outbound,
            "web",
            None,
        ));
        (egress(), budget, metrics)
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn one_balancer_per_backend_service_and_the_destination_keeps_its_own() {
        // Two routes split between b0 and b1; b0 is the destination itself.
        let routes = [
            route("a", prefix("/a"), &[(1, true), (1, true)]),
            route("b", prefix("/b"), &[(1, true), (1, true)]),
        ];
        let own = Arc::new(Balancer::new(Duration::from_secs(1), None));
        let made = std::sync::atomic::AtomicUsize::new(0);
        let (egress, budget, metrics) = shared();
        let shared_balancers = crate::stack::backends::SharedBalancers::default();
        let new_balancer = || {
            made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Balancer::new(Duration::from_secs(1), None)
        };
        let mut build = Build {
            egress: &egress,
            budget: &budget,
            metrics: &metrics,
            own: Some(("b0", &own)),
            shared: &shared_balancers,
            used: HashMap::new(),
            new_balancer: &new_balancer,
            to_specs: &|_| Vec::new(),
        };
        Router::compile(&routes, false, &mut build);
        // b0 took the destination's balancer; b1 got one, shared by both routes.
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 1);
        let used = build.used;
        assert_eq!(used.len(), 1);
        let kept = used.get("b1").cloned().expect("b1");
        // The next update keeps the same balancer (its load and connections).
        let mut build = Build {
            egress: &egress,
            budget: &budget,
            metrics: &metrics,
            own: Some(("b0", &own)),
            shared: &shared_balancers,
            used: HashMap::new(),
            new_balancer: &|| panic!("no new balancer"),
            to_specs: &|_| Vec::new(),
        };
        Router::compile(&routes, false, &mut build);
        assert!(Arc::ptr_eq(&build.used["b1"], &kept));
        // Another destination whose route sends to b1 shares that balancer too.
        let other_own = Arc::new(Balancer::new(Duration::from_secs(1), None));
        let mut other = Build {
            egress: &egress,
            budget: &budget,
            metrics: &metrics,
            own: Some(("c0", &other_own)),
            shared: &shared_balancers,
            used: HashMap::new(),
            // b0 is not this destination: it gets a balancer of its own (once).
            new_balancer: &|| Balancer::new(Duration::from_secs(1), None),
            to_specs: &|_| Vec::new(),
        };
        Router::compile(&routes[1..], false, &mut other);
        assert!(Arc::ptr_eq(&other.used["b1"], &kept));
        assert_eq!(other.used.len(), 2);
    }

    #[test]
    fn prefixes_match_by_path_element_and_headers_must_all_match() {
        let mut canary = prefix("/api");
        canary.headers = vec![ValueMatch {
            name: "x-canary".into(),
            value: "1".into(),
            regex: false,
        }];
        let r = compile(&[
            route("canary", canary, &[(1, true)]),
            route("all", prefix("/"), &[(1, true)]),
        ]);
        let name = |p: &str, h: &[(&str, &str)]| r.route(&req(p, h)).map(|r| r.name.to_string());
        assert_eq!(
            name("/api/x", &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            name("/api", &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(name("/apix", &[("x-canary", "1")]).as_deref(), Some("all"));
        assert_eq!(name("/api/x", &[("x-canary", "0")]).as_deref(), Some("all"));
    }

    #[test]
    fn regex_exact_method_and_query_matches() {
        let m = RouteMatch {
            path: Some(PathMatch {
                kind: path_match::Kind::Regex as i32,
                value: "/v[0-9]+/items".into(),
            }),
            query_params: vec![ValueMatch {
                name: "debug".into(),
                value: "true".into(),
                regex: false,
            }],
            method: "POST".into(),
            ..Default::default()
        };
        let r = compile(&[route("re", m, &[(1, true)])]);
        let post = |uri: &str| Request::post(uri).body(()).expect("request");
        assert!(r.route(&post("/v2/items?debug=true&x=1")).is_some());
        assert!(
            r.route(&post("/v2/items")).is_none(),
            "query parameter required"
        );
        assert!(
            r.route(&post("/v2/items/extra?debug=true")).is_none(),
            "regex is anchored"
        );
        assert!(
            r.route(&req("/v2/items?debug=true", &[])).is_none(),
            "method must match"
        );
        let bad = RouteMatch {
            path: Some(PathMatch {
                kind: path_match::Kind::Regex as i32,
                value: "([".into(),
            }),
            ..Default::default()
        };
        assert!(compile(&[route("bad", bad, &[(1, true)])])
            .route(&req("/", &[]))
            .is_none());
    }

    #[test]
    fn grpc_timeouts_parse() {
        let with = |v: &str| {
            Request::builder()
                .header("grpc-timeout", v)
                .body(())
                .expect("request")
        };
        assert_eq!(
            grpc_timeout(&with("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(grpc_timeout(&with("2S")), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(&with("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(&with("x")), None);
        assert_eq!(grpc_timeout(&with("")), None);
    }
}
