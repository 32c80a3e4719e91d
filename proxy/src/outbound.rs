//! Outbound: the application's own connections, redirected here by iptables.
//!
//! accept -> original destination -> discovery lookup -> detect (unless opaque) ->
//!   HTTP: per request, pick an endpoint (P2C) -> peer proxy over pooled HTTP/2 (mTLS when this
//!         proxy has an identity), or direct
//!   TCP:  pick an endpoint -> splice (over mTLS to a meshed peer with an identity)
//! A destination not in the mesh is passed through to its original address. TLS the
//! application speaks itself is opaque here. HTTP requests follow the destination's discovery
//! state one by one (a keep-alive connection opened before discovery answered joins the mesh
//! with its next request); opaque TCP is routed once, when the connection is accepted.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{Request, Response};
use hyper::body::Incoming;
use strait_api::discovery::ProtocolHint;
use tokio::net::TcpStream;

use crate::balance::Balancer;
use crate::detect::Protocol;
use crate::discovery::{Resolution, Resolved};
use crate::first_bytes::{self, Protocols, Speaker, Start, Timing, Upstream};
use crate::http::client::{send_upgrade, H2Conn};
use crate::http::error::ProxyError;
use crate::http::forward::{direct, to_peer};
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::http::server::{serve, Handler};
use crate::http::ReqBody;
use crate::identity::TlsTarget;
use crate::io::{CountingIo, PrefixedIo};
use crate::metrics::{Destination, Direction, HttpMetrics, Label};
use crate::retry;
use crate::router::grpc_timeout;
use crate::Context;
use http_body_util::Either;
use std::time::Duration;

const PASSTHROUGH: &str = "passthrough";

/// Endpoints a request may try when connections fail (nothing was sent to them).
const CONNECT_TRIES: usize = 3;

pub async fn serve_connection(ctx: Arc<Context>, stream: TcpStream, orig_dst: SocketAddr) {
    let peer = stream.peer_addr().ok();
    let (resolution, state) = match &ctx.discovery {
        Some(d) => {
            let (r, s) = d.lookup(orig_dst).await;
            (Some(r), s)
        }
        None => (None, Arc::new(Resolved::NotInMesh)),
    };
    // Unanswered and inside the cluster: it may be a meshed pod, so no plaintext.
    let fail_closed = state.is_pending() && ctx.cfg.cluster_networks.contains(orig_dst.ip());
    // TCP is labelled by the state at accept: a spliced stream cannot change path.
    let label: &str = match &*state {
        Resolved::Mesh { service, .. } => service,
        _ => PASSTHROUGH,
    };
    let tcp = ctx.metrics.tcp(Direction::Outbound, label);
    let mut io = CountingIo::new(stream, tcp.read.clone(), tcp.written.clone());

    let opaque = ctx.cfg.opaque_ports.contains(orig_dst.port())
        || matches!(
            &*state,
            Resolved::Mesh {
                hint: ProtocolHint::Opaque,
                ..
            }
        );
    let known = ctx.protocols.outbound.get(&orig_dst);
    let (protocol, prefix, upstream) = if opaque {
        (Protocol::Opaque, bytes::Bytes::new(), None)
    } else if known == Some(Speaker::ServerFirst) {
        ctx.metrics.server_first_known(Direction::Outbound);
        (Protocol::Opaque, bytes::Bytes::new(), None)
    } else {
        // A silent client may be waiting for its server to speak: open the upstream after a
        // short wait, unless this destination is known to wait for its client.
        let permit = known
            .is_none()
            .then(|| ctx.protocols.speculation_permit(Direction::Outbound))
            .flatten();
        // Unknown but no permit (a burst): the old rule, TCP after the detection timeout.
        let degraded = known.is_none() && permit.is_none();
        let speculate = permit.is_some().then(|| {
            let route = tcp_route(resolution.as_deref(), orig_dst, fail_closed);
            let timeout = ctx.cfg.connect_timeout;
            async move {
                let (addr, tls) = route?;
                Upstream::connect(addr, timeout, tls.as_ref()).await
            }
        });
        let mut timing = Timing::new(&ctx.cfg, ctx.cfg.server_first_wait);
        if degraded {
            // Past the verdict of the speculations that started before this connection.
            timing.idle = first_bytes::degraded_wait(&ctx.cfg, timing.wait);
        }
        let learn = |outcome| Protocols::learn(&ctx.protocols.outbound, orig_dst, outcome);
        let started = first_bytes::start_counted(
            &mut io,
            &ctx,
            Direction::Outbound,
            timing,
            speculate,
            |outcome| {
                drop(permit);
                learn(outcome);
            },
        )
        .await;
        let Some((start, _)) = started else {
            return;
        };
        let clients_first = ctx.protocols.outbound.get(&orig_dst) == Some(Speaker::ClientFirst);
        let idle = ctx.cfg.detect_idle_timeout;
        let after =
            first_bytes::after_degraded(&mut io, start, degraded, clients_first, timing, idle);
        let Some((start, tcp_when_idle)) = after.await else {
            return;
        };
        match start {
            Start::Idle if tcp_when_idle => (Protocol::Opaque, bytes::Bytes::new(), None),
            Start::Silent | Start::Idle => return,
            Start::Server { greeting, upstream } => {
                crate::tcp::splice(io, upstream, &greeting).await;
                return;
            }
            Start::Client { detected, upstream } => (detected.protocol, detected.prefix, upstream),
        }
    };
    let io = PrefixedIo::new(prefix, io);

    match protocol {
        Protocol::Opaque | Protocol::Tls => {
            if let Some(upstream) = upstream {
                crate::tcp::splice(io, upstream, &[]).await;
                return;
            }
            // Decided once, by the state now (detection may have taken a while).
            let (addr, tls) = match tcp_route(resolution.as_deref(), orig_dst, fail_closed) {
                Ok(route) => route,
                Err(e @ ProxyError::DiscoveryUnavailable(_)) => {
                    strait_admin::log_limited!(tracing::Level::WARN, "discovery unavailable", "tcp", %orig_dst, "{e}");
                    ctx.metrics.discovery_unavailable.inc();
                    return;
                }
                Err(e) => {
                    strait_admin::log_limited!(tracing::Level::WARN, "no endpoints", "tcp", %orig_dst, "{e}; closing TCP connection");
                    return;
                }
            };
            if let Err(e) =
                crate::tcp::forward(io, addr, ctx.cfg.connect_timeout, tls.as_ref()).await
            {
                strait_admin::log_limited!(tracing::Level::WARN, "tcp forward failed", "outbound", %orig_dst, error = %e, "outbound TCP forward failed");
            }
        }
        Protocol::Http1 | Protocol::Http2 => {
            let handler = Arc::new(OutboundHttp {
                ctx: ctx.clone(),
                resolution,
                orig_dst,
                peer,
                passthrough_h2: OnceLock::new(),
            });
            serve(
                io,
                protocol,
                ctx.drain.clone().signaled(),
                handler,
                ctx.cfg.serve_settings(),
            )
            .await;
        }
    }
    drop(tcp);
}

/// Where an opaque TCP connection goes, by the destination's discovery state now: an endpoint
/// of its service (over mTLS to a meshed peer), or its original address.
fn tcp_route(
    resolution: Option<&Resolution>,
    orig_dst: SocketAddr,
    fail_closed: bool,
) -> Result<(SocketAddr, Option<TlsTarget>), ProxyError> {
    let now = resolution.map(|r| r.current());
    // Unanswered and inside the cluster: it may be a meshed pod, so no plaintext.
    if fail_closed && now.as_deref().is_none_or(Resolved::is_pending) {
        return Err(ProxyError::DiscoveryUnavailable(orig_dst));
    }
    match (resolution, now.as_deref()) {
        (Some(r), Some(Resolved::Mesh { service, .. })) => match r.balancer.pick() {
            Some(e) => Ok((e.addr(), e.tls.as_ref().map(|t| t.tcp.clone()))),
            None => Err(ProxyError::NoEndpoints(service.to_string())),
        },
        _ => Ok((orig_dst, None)),
    }
}

/// The requests of one outbound HTTP connection. Each request goes by its destination's
/// discovery state when it arrives, not by the state when the connection was accepted.
struct OutboundHttp {
    ctx: Arc<Context>,
    /// None when the proxy runs without discovery.
    resolution: Option<Arc<Resolution>>,
    orig_dst: SocketAddr,
    /// The client's address.
    peer: Option<SocketAddr>,
    /// The pooled connection to `orig_dst`, for requests passed through.
    passthrough_h2: OnceLock<Arc<H2Conn>>,
}

/// Where one outbound request goes, decided when it arrives.
enum Target {
    /// To its original destination, outside the mesh.
    Passthrough,
    /// Nowhere: discovery has not answered for a destination inside the cluster networks.
    Unavailable,
    /// Through the mesh, to the service's endpoints and routes.
    Mesh {
        service: Arc<str>,
        resolution: Arc<Resolution>,
        metrics: Arc<HttpMetrics>,
    },
}

impl Handler for OutboundHttp {
    type Target = Target;

    async fn target(&self, _req: &Request<Incoming>) -> Target {
        let Some(resolution) = &self.resolution else {
            return Target::Passthrough;
        };
        let timeout = self
            .ctx
            .discovery
            .as_ref()
            .map_or(Duration::ZERO, |d| d.first_answer_timeout());
        match &*resolution.state_for_request(timeout).await {
            Resolved::Mesh {
                service, metrics, ..
            } => Target::Mesh {
                service: service.clone(),
                resolution: resolution.clone(),
                metrics: metrics.clone(),
            },
            Resolved::NotInMesh => Target::Passthrough,
            Resolved::Pending if self.ctx.cfg.cluster_networks.contains(self.orig_dst.ip()) => {
                Target::Unavailable
            }
            Resolved::Pending => Target::Passthrough,
        }
    }

    fn metrics<'a>(&'a self, target: &'a Target) -> &'a HttpMetrics {
        match target {
            Target::Mesh { metrics, .. } => metrics,
            Target::Passthrough | Target::Unavailable => &self.ctx.passthrough_metrics,
        }
    }

    fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.ctx.telemetry
    }

    fn describe(&self) -> String {
        self.orig_dst.to_string()
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn upstream(&self) -> Option<SocketAddr> {
        Some(self.orig_dst)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        target: &Target,
    ) -> Result<Response<Incoming>, ProxyError> {
        let upgrade = is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        if crate::http::headers::authority(&req).is_none() {
            // HTTP/1.0 without Host (1.1 without one was refused): the destination the
            // client connected to is the request's authority.
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = self.orig_dst.to_string().parse().ok();
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        if let Target::Unavailable = target {
            self.ctx.metrics.discovery_unavailable.inc();
            return Err(ProxyError::DiscoveryUnavailable(self.orig_dst));
        }
        let Target::Mesh {
            service,
            resolution,
            metrics,
        } = target
        else {
            let h2 = self
                .passthrough_h2
                .get_or_init(|| self.ctx.clients.h2.get(self.orig_dst));
            return direct(&self.ctx.clients, self.orig_dst, h2, req.map(Either::Left)).await;
        };
        resolution.retry_budget.deposit();
        let router = resolution.router.load();
        let route = match router.route(&req) {
            _ if router.is_empty() => None,
            Some(route) => Some(route),
            None if router.unmatched_to_service => None,
            None => return Err(ProxyError::NoRoute(service.to_string())),
        };
        let Some(route) = route else {
            let timeout = grpc_timeout(&req);
            let req = req.map(Either::Left);
            return with_timeout(
                timeout,
                self.send_to(&resolution.balancer, service, req, upgrade),
            )
            .await;
        };
        route.modify(&mut req);
        let backend = route.pick_backend().ok_or_else(|| {
            ProxyError::NoBackend(format!("{}: every backend weight is 0", route.name))
        })?;
        let Some(balancer) = &backend.balancer else {
            return Err(ProxyError::NoBackend(format!(
                "{}: backend {} does not exist",
                route.name, backend.service
            )));
        };
        // The request timeout bounds every attempt together; backendRequest each one.
        let overall = [route.request_timeout, grpc_timeout(&req)]
            .into_iter()
            .flatten()
            .min();
        let per_attempt = route.backend_timeout;
        let result = match route
            .retry
            .as_ref()
            .filter(|_| !upgrade && retry::is_replayable(&req))
        {
            None => {
                let attempt = with_timeout(
                    per_attempt,
                    self.send_to(balancer, &backend.service, req.map(Either::Left), upgrade),
                );
                with_timeout(overall, attempt).await
            }
            Some(policy) => {
                let attempts = self.with_retries(
                    (balancer, &backend.service),
                    req,
                    policy,
                    per_attempt,
                    &resolution.retry_budget,
                    metrics,
                );
                with_timeout(overall, attempts).await
            }
        };
        result.map(|mut resp| {
            if let Some(dst) = resp.extensions_mut().get_mut::<Destination>() {
                dst.route = Label::from(route.name.clone());
            }
            resp
        })
    }
}

/// Bounds `fut` (until the response headers) by `timeout`, if any.
async fn with_timeout<F>(
    timeout: Option<Duration>,
    fut: F,
) -> Result<Response<Incoming>, ProxyError>
where
    F: std::future::Future<Output = Result<Response<Incoming>, ProxyError>>,
{
    match timeout {
        Some(after) => tokio::time::timeout(after, fut)
            .await
            .unwrap_or(Err(ProxyError::Timeout { after })),
        None => fut.await,
    }
}

impl OutboundHttp {
    /// Sends a replayable request, retrying as `policy` says while the budget allows.
    async fn with_retries(
        &self,
        (balancer, service): (&Balancer, &Arc<str>),
        req: Request<Incoming>,
        policy: &retry::RetryPolicy,
        per_attempt: Option<Duration>,
        budget: &retry::RetryBudget,
        metrics: &HttpMetrics,
    ) -> Result<Response<Incoming>, ProxyError> {
        let grpc = crate::http::headers::is_grpc(&req);
        let replay = retry::Replayable::buffer(req).await?;
        let mut attempt = 0;
        loop {
            let result = with_timeout(
                per_attempt,
                self.send_to(balancer, service, replay.request(), false),
            )
            .await;
            if attempt >= policy.attempts || !retry::should_retry(&result, policy, grpc) {
                return result;
            }
            if !budget.withdraw() {
                metrics.retries_exhausted.inc();
                return result;
            }
            metrics.retries.inc();
            attempt += 1;
            drop(result);
            if !policy.backoff.is_zero() {
                // Jittered: half to all of the backoff.
                tokio::time::sleep(policy.backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
            }
        }
    }

    /// Sends `req` to an endpoint of `balancer` (the service `service`).
    ///
    /// A meshed endpoint whose connection cannot be established costs the request nothing:
    /// nothing was sent, so it moves to another endpoint (up to [`CONNECT_TRIES`]), and the
    /// failure counts against that endpoint at once. An endpoint whose first connection is
    /// still being attempted is passed over when another one is already connected, so requests
    /// do not queue behind a connect to a black-holed endpoint.
    async fn send_to(
        &self,
        balancer: &Balancer,
        service: &Arc<str>,
        mut req: Request<ReqBody>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let no_endpoints = || ProxyError::NoEndpoints(service.to_string());
        let mut endpoint = balancer.pick().ok_or_else(no_endpoints)?;
        let mut tries = 0;
        let in_flight = loop {
            // Only pooled HTTP/2 to a meshed peer is set up ahead of the request.
            if !endpoint.spec.meshed || upgrade {
                break endpoint.start();
            }
            if !endpoint.h2.is_open() && endpoint.h2.is_connecting() && tries == 0 {
                if let Some(other) = balancer.pick().filter(|o| o.h2.is_open()) {
                    endpoint = other;
                }
            }
            let mut in_flight = endpoint.start();
            match endpoint.h2.ready().await {
                Ok(()) => {
                    in_flight.connected();
                    break in_flight;
                }
                Err(e) => {
                    in_flight.failure();
                    tries += 1;
                    if tries >= CONNECT_TRIES.min(balancer.len()) {
                        return Err(e);
                    }
                    // Another endpoint than this one, if the balancer gives one.
                    let failed = endpoint.addr();
                    endpoint = (0..4)
                        .filter_map(|_| balancer.pick())
                        .find(|e| e.addr() != failed)
                        .ok_or(e)?;
                }
            }
        };
        if endpoint.tls.is_some() && endpoint.spec.meshed {
            tell_peer(&mut req, service, self.ctx.workload.as_ref());
        }
        let result = match (&endpoint.tls, endpoint.spec.meshed, upgrade) {
            // An upgrade to a meshed peer: its own mTLS connection, HTTP/1.1 inside.
            (Some(tls), true, true) => {
                send_upgrade(
                    endpoint.addr(),
                    self.ctx.cfg.connect_timeout,
                    Some(&tls.http1),
                    req,
                )
                .await
            }
            (_, true, false) => to_peer(&endpoint.h2, req).await,
            _ => direct(&self.ctx.clients, endpoint.addr(), &endpoint.h2, req).await,
        };
        match result {
            Ok(mut resp) => {
                in_flight.response(resp.status());
                let mtls = endpoint.tls.is_some() && endpoint.spec.meshed;
                let dst_workload = said_by_server(resp.headers_mut(), mtls);
                resp.extensions_mut().insert(Destination {
                    route: Label::empty(),
                    backend: Label::from(service.clone()),
                    server_id: Label::from(endpoint.spec.identity.clone()),
                    tls: mtls,
                    upstream: Some(endpoint.addr()),
                    dst_workload,
                    ..Destination::default()
                });
                Ok(resp)
            }
            Err(e) => {
                in_flight.failure();
                Err(e)
            }
        }
    }
}

/// Tells the server's proxy (over mTLS) which service the request went to and which workload
/// sent it, for its metrics' `dst_service` and `src_workload`.
fn tell_peer<B>(req: &mut Request<B>, service: &str, workload: Option<&http::HeaderValue>) {
    let headers = req.headers_mut();
    if let Some((name, ns)) = crate::metrics::service_of(service) {
        if let Ok(v) = http::HeaderValue::from_str(&format!("{name}.{ns}")) {
            headers.insert(crate::http::headers::DST_SERVICE, v);
        }
    }
    if let Some(w) = workload {
        headers.insert(crate::http::headers::SRC_WORKLOAD, w.clone());
    }
}

/// The workload the server's proxy says answered (trusted over mTLS only); the header is
/// removed whoever sent it.
fn said_by_server(headers: &mut http::HeaderMap, mtls: bool) -> Label {
    headers
        .remove(crate::http::headers::DST_WORKLOAD)
        .filter(|_| mtls)
        .as_ref()
        .and_then(Label::from_peer)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_workload_is_read_over_mtls_only_and_never_passed_on() {
        let header = crate::http::headers::DST_WORKLOAD;
        let mut headers = http::HeaderMap::new();
        headers.insert(header.clone(), http::HeaderValue::from_static("web.shop"));
        assert_eq!(said_by_server(&mut headers, true).as_str(), "web.shop");
        assert!(headers.is_empty());
        // An unmeshed server (or its application) cannot name itself.
        headers.insert(
            header.clone(),
            http::HeaderValue::from_static("admin.kube-system"),
        );
        assert_eq!(said_by_server(&mut headers, false).as_str(), "");
        assert!(headers.is_empty());
        let long = "w".repeat(300);
        let Ok(long) = http::HeaderValue::from_str(&long) else {
            panic!("a header value")
        };
        headers.insert(header, long);
        assert_eq!(said_by_server(&mut headers, true).as_str(), "");
    }
}
