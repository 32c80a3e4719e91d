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

use crate::detect::Protocol;
use crate::discovery::{Resolution, Resolved};
use crate::first_bytes::{self, Protocols, Speaker, Start, Timing, Upstream};
use crate::http::client::H2Conn;
use crate::http::error::ProxyError;
use crate::http::forward::direct;
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::http::server::{serve, Handler};
use crate::http::{Body, ReqBody};
use crate::identity::TlsTarget;
use crate::io::{CountingIo, PrefixedIo};
use crate::metrics::{Destination, Direction, HttpMetrics, Label};
use crate::router::grpc_timeout;
use crate::stack::balance::send_to;
use crate::Context;
use http_body_util::Either;
use std::time::Duration;
use tower::ServiceExt;

const PASSTHROUGH: &str = "passthrough";

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
pub(crate) struct OutboundHttp {
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
pub(crate) enum Target {
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
        req: Request<Incoming>,
        target: &Target,
    ) -> Result<Response<Body>, ProxyError> {
        let mut req = req.map(ReqBody::Stream);
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
            ..
        } = target
        else {
            let clients = &self.ctx.egress.clients;
            let h2 = self
                .passthrough_h2
                .get_or_init(|| clients.h2.get(self.orig_dst));
            let resp = direct(clients, self.orig_dst, h2, req).await?;
            return Ok(resp.map(Either::Left));
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
            // No routes: straight to the service's endpoints, bounded by a gRPC deadline.
            let deadline = grpc_timeout(&req);
            let send = send_to(&resolution.balancer, service, &self.ctx.egress, req);
            return match deadline {
                Some(after) => tokio::time::timeout(after, send)
                    .await
                    .unwrap_or(Err(ProxyError::Timeout { after })),
                None => send.await,
            };
        };
        let mut resp = route.stack.clone().oneshot(req).await?;
        let name = Label::from(route.name.clone());
        match resp.extensions_mut().get_mut::<Destination>() {
            Some(dst) => dst.route = name,
            None => {
                resp.extensions_mut().insert(Destination {
                    route: name,
                    ..Destination::default()
                });
            }
        }
        Ok(resp)
    }
}
