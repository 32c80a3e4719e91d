//! The control plane's admin server: `/live`, `/ready` (the state is loaded: the directory was
//! read, or the API's core kinds were listed) and `/metrics` (Prometheus).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::index::MeshIndex;

/// The control plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    services: Gauge,
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let services = Gauge::default();
        let ready = Gauge::default();
        registry.register(
            "strait_control_plane_services",
            "Services in the served mesh state",
            services.clone(),
        );
        registry.register(
            "strait_control_plane_ready",
            "1 once the mesh state is loaded",
            ready.clone(),
        );
        Self {
            registry,
            services,
            ready,
        }
    }
}

impl Metrics {
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    fn encode(&self, index: &MeshIndex, ready: bool) -> String {
        self.services.set(index.service_count() as i64);
        self.ready.set(i64::from(ready));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

/// Serves until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    index: watch::Receiver<Arc<MeshIndex>>,
    ready: watch::Receiver<bool>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, index, ready) = (metrics.clone(), index.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let is_ready = *ready.borrow();
                let resp = match req.uri().path() {
                    "/live" => text(StatusCode::OK, "live\n"),
                    "/ready" if is_ready => text(StatusCode::OK, "ready\n"),
                    "/ready" => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "mesh state not loaded yet\n",
                    ),
                    "/metrics" => {
                        let body = metrics.encode(&index.borrow(), is_ready);
                        let mut r = text(StatusCode::OK, body);
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
