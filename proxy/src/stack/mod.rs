//! A routed request's path, as a stack of tower services built once per route when discovery
//! sends it, and shared by every request the route takes:
//!
//! ```text
//!  request (matched to a route by router::Router)
//!    │
//!    ▼
//!  Fault ─────────────── HTTPFault (ExtensionRef): delay / abort a share
//!  Headers (request) ─── RequestHeaderModifier
//!  Headers (response) ── ResponseHeaderModifier
//!  Rewrite ───────────── URLRewrite: path, Host
//!  Mirror ────────────── RequestMirror: a teed copy to another backend, fire-and-forget
//!  Timeout ───────────── timeouts.request (and the client's grpc-timeout)
//!  Retry ─────────────── tower::retry with the route's policy and the destination's budget
//!  Timeout ───────────── timeouts.backendRequest, per attempt
//!  Split ─────────────── backendRefs by weight
//!    │
//!    ▼  per backend
//!  Headers / Rewrite / Mirror ── backendRef filters
//!  Balance ───────────── P2C peak-EWMA endpoint, pooled mTLS HTTP/2 to the peer proxy
//! ```
//!
//! A RequestRedirect rule ends in [`redirect::Redirect`] instead of the split: the proxy
//! answers. A rule that cannot be served as written ends in [`fail`]: 500, as the Gateway API
//! says. Layers that a route does not use are not in its stack. A destination without routes
//! needs none of this: its requests go to [`balance::send_to`] directly.

pub mod backends;
pub mod balance;
pub mod fault;
pub mod headers;
pub mod mirror;
pub mod redirect;
pub mod retry;
pub mod rewrite;
pub mod split;
pub mod timeout;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use strait_api::discovery::{filter, Backend, Filter, HeaderModifier, Route};
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::balance::{Balancer, EndpointSpec};
use crate::http::error::ProxyError;
use crate::http::forward::Clients;
use crate::http::{Body, ReqBody};
use crate::metrics::{HttpMetrics, Label};
use crate::retry::{RetryBudget, RetryPolicy};

pub type Req = Request<ReqBody>;
pub type Rsp = Response<Body>;
/// A route's (or a backend's) whole stack, boxed once.
pub type RouteService = BoxCloneSyncService<Req, Rsp, ProxyError>;

/// What every request leaving the proxy shares: the connection pools, and what it tells peers.
#[derive(Debug)]
pub struct Egress {
    pub clients: Clients,
    /// This workload, `<workload>.<namespace>`: told to peer proxies (`strait-src-workload`).
    pub workload: Option<http::HeaderValue>,
    pub mirrors: Arc<mirror::Mirrors>,
}

pub fn empty_body() -> Body {
    Either::Right(Full::new(Bytes::new()))
}

/// A service that fails every request with the error `make` builds.
pub fn fail<F>(make: F) -> RouteService
where
    F: Fn() -> ProxyError + Clone + Send + Sync + 'static,
{
    RouteService::new(tower::service_fn(move |_req: Req| {
        std::future::ready(Err::<Rsp, _>(make()))
    }))
}

/// A service that fails every request of an invalid route with 500.
fn invalid(route: &str, reason: String) -> RouteService {
    let route = route.to_string();
    fail(move || ProxyError::InvalidRoute {
        route: route.clone(),
        reason: reason.clone(),
    })
}

/// What building a destination's route stacks needs.
pub struct Build<'a> {
    pub egress: &'a Arc<Egress>,
    pub budget: &'a Arc<RetryBudget>,
    pub metrics: &'a Arc<HttpMetrics>,
    /// The destination itself (its service and balancer, kept up to date by the caller): a
    /// backend that is the destination uses its balancer.
    pub own: Option<(&'a str, &'a Arc<Balancer>)>,
    /// Backend balancers of the whole proxy: one per backend service, shared by every route
    /// of every destination (their load and connections survive updates).
    pub shared: &'a backends::SharedBalancers,
    /// Backend balancers this update's routes use (held by the destination until the next).
    pub used: HashMap<Arc<str>, Arc<Balancer>>,
    pub new_balancer: &'a dyn Fn() -> Balancer,
    pub to_specs: &'a dyn Fn(&[strait_api::discovery::Endpoint]) -> Vec<EndpointSpec>,
}

impl Build<'_> {
    /// The balancer of backend `b`, updated with its endpoints; `None` when it does not exist.
    pub fn balancer(&mut self, b: &Backend) -> Option<Arc<Balancer>> {
        if !b.exists {
            return None;
        }
        if let Some((_, own)) = self.own.filter(|(s, _)| **s == *b.service) {
            return Some((*own).clone());
        }
        if let Some(shared) = self.used.get(b.service.as_str()) {
            return Some(shared.clone());
        }
        let (service, balancer) = self
            .shared
            .get_or_make(b.service.as_str(), self.new_balancer);
        balancer.update((self.to_specs)(&b.endpoints));
        self.used.insert(service, balancer.clone());
        Some(balancer)
    }

    /// A backend's stack: its filters, then its balancer (or 500 when it does not exist).
    fn backend(&mut self, b: &Backend, route: &str) -> Result<RouteService, String> {
        let leaf = match self.balancer(b) {
            Some(balancer) => RouteService::new(balance::Balance::new(
                balancer,
                b.service.as_str().into(),
                self.egress.clone(),
            )),
            None => {
                let message = format!("{route}: backend {} does not exist", b.service);
                return Ok(fail(move || ProxyError::NoBackend(message.clone())));
            }
        };
        if b.filters.is_empty() {
            return Ok(leaf);
        }
        let f = Filters::compile(&b.filters, None, self, Place::Backend)?;
        Ok(RouteService::new(
            ServiceBuilder::new()
                .option_layer(f.request_headers)
                .option_layer(f.response_headers)
                .option_layer(f.rewrite)
                .option_layer(f.mirror)
                .service(leaf),
        ))
    }

    /// The stack of route `r`; a route that cannot be served as written answers 500.
    pub fn route(&mut self, r: &Route) -> RouteService {
        match self.try_route(r) {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(route = %r.name, %reason, "route cannot be served; its requests get 500");
                invalid(&r.name, reason)
            }
        }
    }

    fn try_route(&mut self, r: &Route) -> Result<RouteService, String> {
        if !r.invalid.is_empty() {
            return Err(r.invalid.clone());
        }
        let f = Filters::compile(
            &r.filters,
            r.request_header_modifier.as_ref(),
            self,
            Place::Rule,
        )?;
        if let Some(redirect) = f.redirect {
            return Ok(RouteService::new(
                ServiceBuilder::new()
                    .option_layer(f.fault)
                    .option_layer(f.response_headers)
                    .service(redirect),
            ));
        }
        let name: Arc<str> = r.name.as_str().into();
        let backends = r
            .backends
            .iter()
            .map(|b| Ok((b.weight, self.backend(b, &r.name)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let split = split::Split::new(name, backends);
        let retry = r.retry.as_ref().filter(|p| p.attempts > 0).map(|p| {
            retry::RetryLayer::new(
                RetryPolicy {
                    attempts: p.attempts.min(10),
                    codes: p
                        .codes
                        .iter()
                        .filter_map(|c| u16::try_from(*c).ok())
                        .collect(),
                    grpc_codes: if p.grpc_codes.is_empty() {
                        vec![14]
                    } else {
                        p.grpc_codes.clone()
                    },
                    backoff: Duration::from_millis(p.backoff_ms.min(10_000)),
                },
                self.budget,
                self.metrics,
            )
        });
        let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Ok(RouteService::new(
            ServiceBuilder::new()
                .option_layer(f.fault)
                .option_layer(f.request_headers)
                .option_layer(f.response_headers)
                .option_layer(f.rewrite)
                .option_layer(f.mirror)
                .layer(timeout::TimeoutLayer::request(millis(r.request_timeout_ms)))
                .option_layer(retry)
                .option_layer(timeout::TimeoutLayer::attempt(millis(
                    r.backend_request_timeout_ms,
                )))
                .service(split),
        ))
    }
}

/// Where filters are written: some are only for rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Rule,
    Backend,
}

/// A rule's (or a backend's) filters, compiled: at most one layer of each kind.
#[derive(Default)]
struct Filters {
    request_headers: Option<headers::HeadersLayer>,
    response_headers: Option<headers::HeadersLayer>,
    rewrite: Option<rewrite::RewriteLayer>,
    redirect: Option<redirect::Redirect>,
    mirror: Option<mirror::MirrorLayer>,
    fault: Option<fault::FaultLayer>,
}

impl Filters {
    fn compile(
        filters: &[Filter],
        legacy: Option<&HeaderModifier>,
        build: &mut Build<'_>,
        place: Place,
    ) -> Result<Self, String> {
        let mut request = headers::Edits::default();
        let mut response = headers::Edits::default();
        if let Some(m) = legacy {
            request = request.merge(headers::Edits::compile(m).map_err(|e| e.to_string())?);
        }
        let mut out = Filters::default();
        let mut mirrors = Vec::new();
        let (mut rewrites, mut redirects, mut faults) = (0, 0, 0);
        for f in filters {
            match &f.kind {
                Some(filter::Kind::RequestHeaderModifier(m)) => {
                    request = request.merge(
                        headers::Edits::compile(m)
                            .map_err(|e| format!("RequestHeaderModifier: {e}"))?,
                    );
                }
                Some(filter::Kind::ResponseHeaderModifier(m)) => {
                    response = response.merge(
                        headers::Edits::compile(m)
                            .map_err(|e| format!("ResponseHeaderModifier: {e}"))?,
                    );
                }
                Some(filter::Kind::UrlRewrite(u)) => {
                    rewrites += 1;
                    out.rewrite = rewrite::RewriteLayer::compile(u)
                        .map_err(|e| format!("URLRewrite: {e}"))?;
                }
                Some(filter::Kind::RequestRedirect(r)) => {
                    if place == Place::Backend {
                        return Err("RequestRedirect is not allowed on a backendRef".into());
                    }
                    redirects += 1;
                    out.redirect = Some(
                        redirect::Redirect::compile(r)
                            .map_err(|e| format!("RequestRedirect: {e}"))?,
                    );
                }
                Some(filter::Kind::RequestMirror(m)) => {
                    let Some(backend) = &m.backend else {
                        return Err("RequestMirror without a backendRef".into());
                    };
                    let to = match build.balancer(backend) {
                        Some(balancer) => RouteService::new(balance::Balance::new(
                            balancer,
                            backend.service.as_str().into(),
                            build.egress.clone(),
                        )),
                        None => {
                            let message =
                                format!("mirror backend {} does not exist", backend.service);
                            fail(move || ProxyError::NoBackend(message.clone()))
                        }
                    };
                    mirrors.push(mirror::Target {
                        to,
                        backend: Label::new(&backend.service),
                        numerator: m.numerator,
                        denominator: m.denominator,
                    });
                }
                Some(filter::Kind::Fault(fault)) => {
                    if place == Place::Backend {
                        return Err("an HTTPFault is not allowed on a backendRef".into());
                    }
                    faults += 1;
                    out.fault =
                        fault::FaultLayer::compile(fault).map_err(|e| format!("HTTPFault: {e}"))?;
                }
                None => return Err("a filter this proxy does not know".into()),
            }
        }
        if rewrites > 1 || redirects > 1 || faults > 1 {
            return Err(
                "URLRewrite, RequestRedirect and HTTPFault may each appear once per rule".into(),
            );
        }
        if rewrites > 0 && redirects > 0 {
            return Err("RequestRedirect and URLRewrite cannot be used on the same rule".into());
        }
        out.request_headers = headers::HeadersLayer::new(request, headers::Side::Request);
        out.response_headers = headers::HeadersLayer::new(response, headers::Side::Response);
        out.mirror = mirror::MirrorLayer::new(mirrors, &build.egress.mirrors);
        Ok(out)
    }
}
