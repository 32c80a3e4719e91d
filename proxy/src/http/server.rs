//! Serving a detected HTTP connection with hyper, under the drain signal: on drain, in-flight
//! requests finish and the connection closes (HTTP/1 stops keep-alive, HTTP/2 sends GOAWAY).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::ProxyError;
use super::headers::{is_grpc, strip_hop_by_hop};
use super::limits::{check_request, check_response, Limits, LIBRARY_MAX_HEADERS};
use super::metered::{grpc_status, Metered};
use super::Body;
use crate::detect::Protocol;
use crate::metrics::{Destination, HttpMetrics};

/// Forwards one request of a connection; [`serve`] turns its result into the response and
/// records the metrics, the same way for every side.
pub trait Handler: Send + Sync + 'static {
    /// Where one request goes, decided once when it arrives (outbound: the destination's
    /// discovery state at that moment), so that forwarding and metrics agree.
    type Target: Send + Sync;
    /// Decides the request's target; may wait (bounded) for a first discovery answer.
    fn target(&self, req: &Request<Incoming>) -> impl Future<Output = Self::Target> + Send;
    fn forward(
        &self,
        req: Request<Incoming>,
        target: &Self::Target,
    ) -> impl Future<Output = Result<Response<Body>, ProxyError>> + Send;
    /// The metrics that count a request to `target`.
    fn metrics<'a>(&'a self, target: &'a Self::Target) -> &'a HttpMetrics;
    /// Where requests go, for the log line of a failure.
    fn describe(&self) -> String;
    /// Tracing and the access log.
    fn telemetry(&self) -> &crate::telemetry::Telemetry;
    /// The client's address, for the access log.
    fn peer(&self) -> Option<std::net::SocketAddr>;
    /// Where requests go when the response does not say (the application, a passthrough
    /// destination), for the access log.
    fn upstream(&self) -> Option<std::net::SocketAddr>;
}

/// How a connection is served: the header-read timeout and the header limits.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub header_read_timeout: Duration,
    pub limits: Limits,
}

/// One request: check it, forward it, check the response, map a failure to the proxy's own
/// response, drop hop-by-hop response headers, answer in the client's HTTP version, and count
/// it.
async fn handle<H: Handler>(
    handler: &H,
    mut req: Request<Incoming>,
    limits: &Limits,
) -> Response<Metered<Body>> {
    let start = std::time::Instant::now();
    let target = handler.target(&req).await;
    let metrics = handler.metrics(&target);
    metrics.request();
    let grpc = is_grpc(&req);
    // The request body's size, when known up front: its Content-Length, or 0 without a body.
    let request_bytes = if hyper::body::Body::is_end_stream(req.body()) {
        Some(0)
    } else {
        req.headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let version = req.version();
    let port = handler.upstream().map(|a| a.port());
    let mut observation = handler.telemetry().observe(&mut req, metrics, port);
    let forwarded = match check_request(&req, limits) {
        Err(e) => Err(e),
        Ok(()) => match handler.forward(req, &target).await {
            Ok(resp) => check_response(&resp, limits).map(|()| resp),
            Err(e) => Err(e),
        },
    };
    let (mut resp, error) = match forwarded {
        Ok(mut resp) => {
            if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                strip_hop_by_hop(resp.headers_mut(), false);
            }
            // hyper answers an HTTP/1.0 client in 1.0 on the wire whatever this says; saying
            // 1.1 lets it keep the connection when the client asked for keep-alive (and add
            // `Connection: keep-alive`), which a 1.0 response without that header (stripped
            // above: hop-by-hop) would refuse.
            *resp.version_mut() = if version == http::Version::HTTP_10 {
                http::Version::HTTP_11
            } else {
                version
            };
            (resp, "")
        }
        Err(e) => {
            strait_admin::log_limited!(
                tracing::Level::WARN,
                "request failed",
                e.kind(),
                to = %handler.describe(),
                error = %e,
                "request failed"
            );
            (e.to_response(grpc), e.kind())
        }
    };
    let dst = resp.extensions_mut().remove::<Destination>();
    if let Some(o) = observation.as_mut() {
        o.peer = handler.peer();
        o.upstream = match &dst {
            Some(d) => d.upstream.or_else(|| handler.upstream()),
            None if error.is_empty() => handler.upstream(),
            None => None,
        };
    }
    let recorder = metrics.response(
        resp.status().as_u16(),
        dst,
        error,
        start.elapsed(),
        request_bytes,
        observation.as_ref().and_then(|o| o.sampled_trace_id()),
    );
    let status = grpc_status(resp.headers());
    resp.map(|body| Metered::new(body, recorder, grpc, status).observed(observation))
}

/// Serves `io` as `protocol` until `stop` resolves (the drain, or the end of a mesh
/// connection's life), then lets in-flight requests finish and closes; an HTTP/1 request whose
/// headers take longer than `header_read_timeout` is cut.
pub async fn serve<I, H, S>(
    io: I,
    protocol: Protocol,
    stop: S,
    handler: Arc<H>,
    settings: ServeSettings,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
    S: Future<Output = ()> + Send,
{
    tokio::pin!(stop);
    let limits = settings.limits;
    let svc = service_fn(move |req| {
        let handler = handler.clone();
        // Boxed: hyper moves the service's future into the connection's state (HTTP/1) or into
        // a task per stream (HTTP/2, where the task's creation and completion move it again);
        // a pointer moves for free, the future itself is kilobytes.
        Box::pin(async move { Ok::<_, Infallible>(handle(&*handler, req, &limits).await) })
    });
    let result = match protocol {
        Protocol::Http1 => {
            let io = TokioIo::new(io);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // The response is the upstream's: no Date of the proxy's own.
                .auto_date_header(false)
                .header_read_timeout(settings.header_read_timeout)
                // Header names as the client wrote them reach an HTTP/1 upstream through this
                // proxy, and the upstream's reach the client; names that crossed HTTP/2
                // (lowercased there) are written in canonical Title-Case.
                .preserve_header_case(true)
                .title_case_headers(true)
                // Above the proxy's own limits, which answer with the setting's name.
                .max_headers(LIBRARY_MAX_HEADERS)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Http2 => {
            // Streams are multiplexed: responses ready together leave in one write.
            let io = TokioIo::new(crate::coalesce::Coalesce::new(io));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .initial_stream_window_size(super::client::WINDOW)
                .initial_connection_window_size(super::client::CONN_WINDOW)
                .max_concurrent_streams(1024)
                .max_header_list_size(settings.limits.h2_header_list_size())
                .keep_alive_interval(Duration::from_secs(20))
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Opaque | Protocol::Tls => return,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<'a, H: Handler, F: Future>(
        _f: impl Fn(&'a H, Request<Incoming>, &'a Limits) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request's future is moved at least once per request (into hyper's connection state
    /// or a task per stream); what only some requests need (connecting, upgrades) is boxed
    /// so that it does not weigh on all. It was 11 KB before that.
    #[test]
    fn a_requests_future_stays_small() {
        let outbound = future_size(handle::<crate::outbound::OutboundHttp>);
        let inbound = future_size(handle::<crate::inbound::InboundHttp>);
        assert!(
            outbound <= 6144,
            "outbound request future: {outbound} bytes"
        );
        assert!(inbound <= 6144, "inbound request future: {inbound} bytes");
    }
}
