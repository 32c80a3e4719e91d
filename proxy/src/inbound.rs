//! Inbound: connections to the pod, redirected here by iptables, forwarded to the application
//! on the original port.
//!
//! accept -> original destination -> detect (unless opaque) ->
//!   HTTP/2 from a peer proxy: requests marked `strait-orig-proto` go to the app as HTTP/1
//!   other HTTP: to the app in the client's protocol
//!   TCP: splice to the app

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::detect::{self, Protocol};
use crate::http::client::{send_h1, H2Conn};
use crate::http::error::ProxyError;
use crate::http::forward::{direct, restore_orig_proto};
use crate::http::headers::{is_grpc, is_upgrade, strip_hop_by_hop};
use crate::http::server::{serve, Handler};
use crate::http::Body;
use crate::io::{CountingIo, PrefixedIo};
use crate::metrics::{Direction, HttpMetrics};
use crate::Context;

pub async fn serve_connection(ctx: Arc<Context>, stream: TcpStream, orig_dst: SocketAddr) {
    let label = orig_dst.port().to_string();
    let tcp = ctx.metrics.tcp(Direction::Inbound, &label);
    let mut io = CountingIo::new(stream, tcp.read.clone(), tcp.written.clone());
    let (protocol, prefix) = if ctx.cfg.opaque_ports.contains(orig_dst.port()) {
        (Protocol::Opaque, bytes::Bytes::new())
    } else {
        match detect::detect(&mut io, ctx.cfg.detect_timeout).await {
            Ok(d) => {
                ctx.metrics
                    .detected(Direction::Inbound, d.protocol.as_str(), d.timed_out);
                (d.protocol, d.prefix)
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection failed during detection");
                return;
            }
        }
    };
    let io = PrefixedIo::new(prefix, io);
    match protocol {
        Protocol::Opaque => {
            if let Err(e) = crate::tcp::forward(io, orig_dst, ctx.cfg.connect_timeout).await {
                tracing::warn!(app = %orig_dst, error = %e, "inbound TCP forward failed");
            }
        }
        Protocol::Http1 | Protocol::Http2 => {
            let handler = Arc::new(InboundHttp {
                metrics: ctx.metrics.http(Direction::Inbound, &label),
                app_h2: ctx.clients.h2.get(orig_dst),
                ctx: ctx.clone(),
                app: orig_dst,
            });
            serve(io, protocol, ctx.drain.clone(), handler).await;
        }
    }
    drop(tcp);
}

struct InboundHttp {
    ctx: Arc<Context>,
    app: SocketAddr,
    app_h2: Arc<H2Conn>,
    metrics: HttpMetrics,
}

impl Handler for InboundHttp {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        self.metrics.request();
        let grpc = is_grpc(&req);
        let version = req.version();
        let (resp, error) = match self.forward(req).await {
            Ok(mut resp) => {
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                *resp.version_mut() = version;
                (resp.map(Either::Left), "")
            }
            Err(e) => {
                tracing::warn!(app = %self.app, error = %e, "inbound request failed");
                (e.to_response(grpc), e.kind())
            }
        };
        let grpc_failed = resp.headers().get("grpc-status").is_some_and(|s| s != "0");
        self.metrics
            .response(resp.status().as_u16(), grpc_failed, error, start.elapsed());
        resp
    }
}

impl InboundHttp {
    async fn forward(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        if restore_orig_proto(&mut req) {
            strip_hop_by_hop(req.headers_mut(), false);
            return send_h1(&self.ctx.clients.h1, self.app, req).await;
        }
        let upgrade = is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        direct(&self.ctx.clients, self.app, &self.app_h2, req).await
    }
}
