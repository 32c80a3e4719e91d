//! The admin server: `/live`, `/ready`, `/metrics`, `/protocols` (who speaks first, as
//! learned), `POST /shutdown` (loopback clients only),
//! and the application's probes rewritten by the injector (`/app-health/<container>/<kind>`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app_probe::{self, AppProbes};
use crate::drain::{Drain, DrainTrigger};
use crate::metrics::Metrics;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub trigger: Arc<DrainTrigger>,
    pub drain: Drain,
    pub probes: AppProbes,
    pub protocols: Arc<crate::first_bytes::Protocols>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(strait_admin::HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    /// True once the proxy's certificate is past its NotAfter (renewal kept failing): it can
    /// no longer prove who it is, so it stops reporting ready until a new one is installed.
    fn certificate_expired(&self) -> bool {
        let not_after = self.metrics.cert_expiry.get();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        not_after > 0 && now >= not_after
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *r.status_mut() = status;
            r
        };
        let path = req.uri().path();
        if let Some(name) = path.strip_prefix(app_probe::PREFIX) {
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            }
            let agent = req
                .headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok());
            return self.probes.check(name, agent).await;
        }
        match (req.method(), path) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if self.certificate_expired() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "certificate expired: the identity API could not renew it\n",
                    )
                } else if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                let accept = req
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (content_type, body) =
                    strait_admin::exposition::negotiate(self.metrics.encode(), accept);
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                r
            }
            (&Method::GET, "/protocols") => {
                let mut r = Response::new(Full::new(Bytes::from(
                    self.protocols.to_json().to_string() + "\n",
                )));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::POST, "/shutdown") => {
                if peer.ip().is_loopback() {
                    tracing::info!("shutdown requested through the admin server");
                    self.trigger.drain();
                    text(StatusCode::OK, "draining\n")
                } else {
                    text(
                        StatusCode::FORBIDDEN,
                        "shutdown is only accepted from loopback\n",
                    )
                }
            }
            (_, "/live" | "/ready" | "/metrics" | "/protocols" | "/shutdown") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live /ready /metrics /protocols /shutdown /app-health/<container>/<kind>\n",
            ),
        }
    }
}
