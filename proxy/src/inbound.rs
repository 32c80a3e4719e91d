//! Inbound: connections to the pod, redirected here by iptables, forwarded to the application
//! on the original port.
//!
//! accept -> original destination -> detect ->
//!   mesh TLS (SNI = this workload's mesh name): terminate; ALPN h2 -> HTTP/2 from a peer proxy
//!     (`strait-orig-proto` requests go to the app as HTTP/1), http/1.1 -> HTTP/1 (upgrades),
//!     none -> opaque TCP
//!   plaintext on a strict port: refused
//!   other HTTP: to the app in the client's protocol; TCP (and the app's own TLS): spliced
//!
//! A connection to the mesh port itself (4143) is opaque TCP from a peer proxy: mesh TLS, then
//! a transport header naming the application's port ([`crate::transport_header`]). So on an
//! application's opaque port no timer looks for a ClientHello: the application is connected at
//! once and whoever speaks first decides (a server-speaks-first greeting goes to the client at
//! once; a client's first bytes are classified as everywhere else).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use strait_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::detect::Protocol;
use crate::first_bytes::{self, Protocols, Speaker, Start, Timing, Upstream};
use crate::http::client::{send_h1, H2Conn};
use crate::http::error::ProxyError;
use crate::http::forward::{direct, restore_orig_proto};
use crate::http::headers::{is_upgrade, strip_hop_by_hop};
use crate::http::server::{serve, Handler};
use crate::identity::Identity;
use crate::io::{CountingIo, PrefixedIo};
use crate::metrics::{Destination, Direction, HttpMetrics, Label};
use crate::Context;

pub async fn serve_connection(ctx: Arc<Context>, stream: TcpStream, orig_dst: SocketAddr) {
    let port = orig_dst.port();
    let peer = stream.peer_addr().ok();
    if port == ctx.cfg.inbound_addr.port() {
        serve_mesh_port(ctx, stream, orig_dst).await;
        return;
    }
    let label = port.to_string();
    let tcp = ctx.metrics.tcp(Direction::Inbound, &label);
    let mut io = CountingIo::new(stream, tcp.read.clone(), tcp.written.clone());
    let known = ctx.protocols.inbound.get(&port);
    // Opaque by the pod's setting, or by a Service's declaration (the control plane's).
    let configured_opaque = ctx.cfg.opaque_ports.contains(port) || ctx.authz.is_opaque(port);
    // An application known to speak first is handled as on an opaque port: only a mesh
    // ClientHello is looked for.
    let opaque_port = configured_opaque || known == Some(Speaker::ServerFirst);
    if opaque_port && ctx.identity.is_none() {
        if !configured_opaque {
            ctx.metrics.server_first_known(Direction::Inbound);
        }
        forward_tcp(&ctx, io, orig_dst, None, std::future::pending(), None, &[]).await;
        return;
    }
    // A silent client is given the application's connection when it could be served
    // plaintext TCP at all (not on a strict port, allowed unauthenticated).
    let plaintext_allowed = !(ctx.identity.is_some() && ctx.cfg.is_strict(port))
        && ctx.authz.authorize(port, None).is_ok();
    let (wait, speculate) = if opaque_port {
        // Mesh peers bring opaque TCP to the mesh port, so nothing here is worth waiting for:
        // the application is connected at once and whoever speaks first decides.
        (Duration::ZERO, plaintext_allowed)
    } else {
        (
            ctx.cfg.server_first_wait,
            plaintext_allowed && known.is_none(),
        )
    };
    let mut timing = Timing::new(&ctx.cfg, wait);
    if !plaintext_allowed {
        // Only mesh TLS can be served, and a mesh peer sends its ClientHello at once: a silent
        // client is not waited on.
        timing.idle = ctx.cfg.detect_timeout.max(wait);
    }
    let permit = speculate
        .then(|| ctx.protocols.speculation_permit(Direction::Inbound))
        .flatten();
    // Allowed but no permit (a burst): the old rule, TCP after the detection timeout.
    let degraded = speculate && permit.is_none();
    if degraded {
        // Past the verdict of the speculations that started before this connection.
        timing.idle = first_bytes::degraded_wait(&ctx.cfg, timing.wait);
    }
    let connect_timeout = ctx.cfg.connect_timeout;
    let speculate = permit
        .is_some()
        .then(|| Upstream::connect(orig_dst, connect_timeout, None));
    let learn = |outcome| {
        drop(permit);
        if !configured_opaque {
            Protocols::learn(&ctx.protocols.inbound, port, outcome);
        }
    };
    let started =
        first_bytes::start_counted(&mut io, &ctx, Direction::Inbound, timing, speculate, learn)
            .await;
    let Some((start, _)) = started else {
        return;
    };
    let clients_first =
        !opaque_port && ctx.protocols.inbound.get(&port) == Some(Speaker::ClientFirst);
    let idle = ctx.cfg.detect_idle_timeout;
    let after = first_bytes::after_degraded(&mut io, start, degraded, clients_first, timing, idle);
    let Some((start, tcp_when_idle)) = after.await else {
        return;
    };
    let (protocol, prefix, upstream) = match start {
        Start::Idle if tcp_when_idle => (Protocol::Opaque, bytes::Bytes::new(), None),
        Start::Silent | Start::Idle => return,
        Start::Server { greeting, upstream } => {
            let end = std::future::pending();
            forward_tcp(&ctx, io, orig_dst, None, end, Some(upstream), &greeting).await;
            return;
        }
        Start::Client { detected, upstream } => {
            // On an opaque port only a ClientHello counts: anything else is TCP.
            let protocol = match detected.protocol {
                Protocol::Http1 | Protocol::Http2 if opaque_port => Protocol::Opaque,
                p => p,
            };
            (protocol, detected.prefix, upstream)
        }
    };
    let mesh_tls = protocol == Protocol::Tls
        && ctx
            .identity
            .as_ref()
            .is_some_and(|id| client_hello_sni(&prefix).as_deref() == Some(id.sni.as_str()));
    let io = PrefixedIo::new(prefix, io);

    if mesh_tls {
        drop(upstream);
        if let Some(identity) = ctx.identity.clone() {
            serve_mesh_tls(ctx, identity, io, orig_dst, peer).await;
        }
        return;
    }
    if ctx.identity.is_some() && ctx.cfg.is_strict(port) {
        strait_admin::log_limited!(tracing::Level::INFO, "refused", "plaintext", %orig_dst, "refused a plaintext connection on a strict port");
        ctx.metrics.refused("plaintext", port, None);
        return;
    }
    match protocol {
        Protocol::Opaque | Protocol::Tls => {
            forward_tcp(
                &ctx,
                io,
                orig_dst,
                None,
                std::future::pending(),
                upstream,
                &[],
            )
            .await
        }
        Protocol::Http1 | Protocol::Http2 => {
            drop(upstream);
            serve_http(
                &ctx,
                io,
                protocol,
                orig_dst,
                peer,
                None,
                std::future::pending(),
            )
            .await
        }
    }
    drop(tcp);
}

/// The SNI of the ClientHello in `prefix`, if it parses.
fn client_hello_sni(prefix: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = prefix;
    acceptor.read_tls(&mut reader).ok()?;
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted.client_hello().server_name().map(str::to_owned),
        _ => None,
    }
}

async fn serve_mesh_tls<I>(
    ctx: Arc<Context>,
    identity: Arc<Identity>,
    io: I,
    orig_dst: SocketAddr,
    peer: Option<SocketAddr>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config.clone());
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            strait_admin::log_limited!(tracing::Level::INFO, "refused", "tls handshake", %orig_dst, error = %e, "refused a mesh TLS connection");
            ctx.metrics.refused("tls handshake", orig_dst.port(), None);
            return;
        }
        Err(_) => {
            strait_admin::log_limited!(tracing::Level::INFO, "refused", "tls timeout", %orig_dst, "mesh TLS handshake timed out");
            return;
        }
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (client, end) = mesh_client(&identity, tls.get_ref().1, orig_dst);
    match alpn.as_deref() {
        Some(strait_identity::tls::ALPN_H2) => {
            serve_http(&ctx, tls, Protocol::Http2, orig_dst, peer, client, end).await
        }
        Some(strait_identity::tls::ALPN_HTTP1) => {
            serve_http(&ctx, tls, Protocol::Http1, orig_dst, peer, client, end).await
        }
        _ => forward_tcp(&ctx, tls, orig_dst, client, end, None, &[]).await,
    }
}

/// The client of an accepted mesh TLS connection to `app`, and the connection's life: until
/// its maximum age, or until the anchors change under it and the client's chain no longer
/// verifies.
fn mesh_client(
    identity: &Arc<Identity>,
    session: &rustls::ServerConnection,
    app: SocketAddr,
) -> (
    Option<SpiffeId>,
    impl std::future::Future<Output = ()> + Send,
) {
    let client = strait_identity::tls::peer_identity(session.peer_certificates());
    let chain: Vec<_> = session
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let (identity, who) = (identity.clone(), client.clone());
    let end = async move {
        let why = identity.connection_end(chain).await;
        tracing::info!(%app, client = %display_client(who.as_ref()), why, "closing a mesh connection");
    };
    (client, end)
}

/// A connection to the mesh port: mesh TLS from a peer proxy, then the transport header naming
/// the application's port, then opaque TCP to it under the same policy as on that port.
async fn serve_mesh_port(ctx: Arc<Context>, stream: TcpStream, local: SocketAddr) {
    let Some(identity) = ctx.identity.clone() else {
        strait_admin::log_limited!(tracing::Level::INFO, "refused", "mesh port without identity", %local, "refused a connection to the mesh port: this proxy has no identity, so it serves no mesh TLS");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config.clone());
    let handshake = async {
        let mut tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
        let port = crate::transport_header::read(&mut tls)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((tls, port))
    };
    let (tls, target) = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            strait_admin::log_limited!(tracing::Level::INFO, "refused", "mesh port", %local, error = %e, "refused a connection to the mesh port");
            ctx.metrics.refused("tls handshake", local.port(), None);
            return;
        }
        Err(_) => {
            strait_admin::log_limited!(tracing::Level::INFO, "refused", "mesh port timeout", %local, "a connection to the mesh port sent no TLS handshake and transport header within 10 s");
            return;
        }
    };
    let app = SocketAddr::new(local.ip(), target);
    let (client, end) = mesh_client(&identity, tls.get_ref().1, app);
    // The proxy's own ports are not applications: no loop through them.
    let cfg = &ctx.cfg;
    if [cfg.inbound_addr, cfg.outbound_addr, cfg.admin_addr]
        .iter()
        .any(|a| a.port() == target)
    {
        strait_admin::log_limited!(tracing::Level::INFO, "refused", "proxy port", %local, target, client = %display_client(client.as_ref()), "refused a transport header naming one of the proxy's own ports");
        ctx.metrics.refused("proxy port", target, client.as_ref());
        return;
    }
    let tcp = ctx.metrics.tcp(Direction::Inbound, &target.to_string());
    let io = CountingIo::new(tls, tcp.read.clone(), tcp.written.clone());
    forward_tcp(&ctx, io, app, client, end, None, &[]).await;
    drop(tcp);
}

/// Splices an inbound TCP connection to the application (over `upstream` when already open,
/// after sending the client the application's `greeting`), if the policy allows `client` on
/// its port, for as long as it does: a policy change that revokes it closes the connection at
/// once.
async fn forward_tcp<I: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Context,
    io: I,
    app: SocketAddr,
    client: Option<SpiffeId>,
    end: impl std::future::Future<Output = ()>,
    upstream: Option<Upstream>,
    greeting: &[u8],
) {
    let port = app.port();
    if let Err(denied) = ctx.authz.authorize(port, client.as_ref()) {
        strait_admin::log_limited!(tracing::Level::INFO, "refused", denied.reason(), %app, client = %display_client(client.as_ref()), %denied, "refused a TCP connection");
        ctx.metrics.refused(denied.reason(), port, client.as_ref());
        return;
    }
    let splice = async {
        let upstream = match upstream {
            Some(u) => u,
            None => Upstream::connect(app, ctx.cfg.connect_timeout, None).await?,
        };
        crate::tcp::splice(io, upstream, greeting).await;
        Ok::<(), ProxyError>(())
    };
    tokio::select! {
        result = splice => {
            if let Err(e) = result {
                strait_admin::log_limited!(tracing::Level::WARN, "tcp forward failed", "inbound", %app, error = %e, "inbound TCP forward failed");
            }
        }
        () = end => {}
        denied = ctx.authz.revoked(port, client.as_ref()) => {
            strait_admin::log_limited!(tracing::Level::INFO, "revoked", denied.reason(), %app, client = %display_client(client.as_ref()), %denied, "closed a TCP connection the policy no longer allows");
            ctx.metrics.refused("revoked", port, client.as_ref());
        }
    }
}

/// A client's SPIFFE ID as a URI, or who it is without one.
fn display_client(client: Option<&SpiffeId>) -> String {
    client.map_or_else(
        || "an unauthenticated client".to_string(),
        ToString::to_string,
    )
}

async fn serve_http<I, E>(
    ctx: &Arc<Context>,
    io: I,
    protocol: Protocol,
    app: SocketAddr,
    peer: Option<SocketAddr>,
    client: Option<SpiffeId>,
    end: E,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::future::Future<Output = ()> + Send,
{
    let handler = Arc::new(InboundHttp {
        metrics: ctx.metrics.http(
            Direction::Inbound,
            &app.port().to_string(),
            client.as_ref().map(|c| c.to_string()).as_deref(),
        ),
        app_h2: ctx.egress.clients.h2.get(app),
        ctx: ctx.clone(),
        app,
        peer,
        client,
    });
    let drain = ctx.drain.clone();
    let stop = async move {
        tokio::select! {
            _ = drain.signaled() => {}
            _ = end => {}
        }
    };
    serve(io, protocol, stop, handler, ctx.cfg.serve_settings()).await;
}

pub(crate) struct InboundHttp {
    ctx: Arc<Context>,
    app: SocketAddr,
    app_h2: Arc<H2Conn>,
    /// The client's address.
    peer: Option<SocketAddr>,
    metrics: HttpMetrics,
    /// The client's identity, for mesh TLS connections.
    client: Option<SpiffeId>,
}

impl Handler for InboundHttp {
    type Target = ();

    async fn target(&self, _req: &Request<Incoming>) {}

    fn metrics<'a>(&'a self, _target: &'a ()) -> &'a HttpMetrics {
        &self.metrics
    }

    fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.ctx.telemetry
    }

    fn describe(&self) -> String {
        format!("app {} (client {:?})", self.app, self.client)
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn upstream(&self) -> Option<SocketAddr> {
        Some(self.app)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        _target: &(),
    ) -> Result<Response<crate::http::Body>, ProxyError> {
        let mut req = req.map(crate::http::ReqBody::Stream);
        // What the client's proxy said (trusted over mTLS only; never passed to the app).
        let said = said_by_peer(req.headers_mut(), self.client.is_some());
        if let Err(denied) =
            self.ctx
                .authz
                .authorize_request(self.app.port(), self.client.as_ref(), &req)
        {
            self.ctx
                .metrics
                .refused(denied.reason(), self.app.port(), self.client.as_ref());
            return Err(ProxyError::Unauthorized {
                client: self.client.as_ref().map_or_else(
                    || "an unauthenticated client".to_string(),
                    ToString::to_string,
                ),
                denied,
            });
        }
        if let Err(limited) = self
            .ctx
            .authz
            .rate_limit(self.app.port(), self.client.as_ref(), &req)
        {
            self.ctx
                .metrics
                .refused("rate limited", self.app.port(), self.client.as_ref());
            return Err(ProxyError::RateLimited {
                policy: limited.policy,
                retry_after: limited.retry_after,
            });
        }
        let resp = if restore_orig_proto(&mut req) {
            strip_hop_by_hop(req.headers_mut(), false);
            send_h1(
                &self.ctx.egress.clients.h1,
                self.app,
                self.ctx.egress.clients.connect_timeout,
                req,
            )
            .await
        } else {
            let upgrade = is_upgrade(&req);
            strip_hop_by_hop(req.headers_mut(), upgrade);
            direct(&self.ctx.egress.clients, self.app, &self.app_h2, req).await
        };
        resp.map(|mut resp| {
            // The application's word is not the workload's: only this proxy says it, and only
            // to a peer proxy (which removes it).
            let headers = resp.headers_mut();
            headers.remove(crate::http::headers::DST_WORKLOAD);
            if let Some(said) = said {
                if let Some(w) = &self.ctx.egress.workload {
                    headers.insert(crate::http::headers::DST_WORKLOAD, w.clone());
                }
                resp.extensions_mut().insert(said);
            }
            resp.map(Either::Left)
        })
    }
}

/// The service and client workload a peer proxy named, as a [`Destination`] for the metrics;
/// the headers are removed whoever sent them.
fn said_by_peer(headers: &mut http::HeaderMap, mtls: bool) -> Option<Destination> {
    let take = |headers: &mut http::HeaderMap, name| {
        headers.remove(name).as_ref().and_then(Label::from_peer)
    };
    let service = take(headers, crate::http::headers::DST_SERVICE);
    let workload = take(headers, crate::http::headers::SRC_WORKLOAD);
    if !mtls || (service.is_none() && workload.is_none()) {
        return None;
    }
    Some(Destination {
        dst_service: service.unwrap_or_default(),
        src_workload: workload.unwrap_or_default(),
        ..Destination::default()
    })
}
