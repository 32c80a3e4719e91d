//! What every Strait server shares: the admin endpoints kubelet probes and Prometheus read
//! (`/live`, `/ready`, `/metrics`, plaintext HTTP/1), and the signal that stops a server.

pub mod exposition;
pub mod listen;
pub mod log;
pub mod otel;
pub mod process;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// What a server reports on its admin port.
pub trait Health: Send + Sync + 'static {
    /// `Err(why)` while the server cannot serve yet.
    fn ready(&self) -> Result<(), &'static str>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

/// The answer to a GET of `path`; `accept` chooses the metrics format.
pub fn respond<H: Health + ?Sized>(
    health: &H,
    path: &str,
    accept: Option<&str>,
) -> Response<Full<Bytes>> {
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            let (content_type, body) = exposition::negotiate(health.metrics(), accept);
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// How long an admin or webhook client may take to send a request's headers: a slower one is
/// cut, so idle or trickling connections cannot pile up.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints until the process ends.
pub async fn serve<H: Health>(listener: tokio::net::TcpListener, health: Arc<H>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let resp = respond(&*health, req.uri().path(), accept);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake(AtomicBool);

    impl Health for Fake {
        fn ready(&self) -> Result<(), &'static str> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("state not loaded yet")
            }
        }
        fn metrics(&self) -> String {
            "up 1\n".into()
        }
    }

    async fn body(r: Response<Full<Bytes>>) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_with_the_servers_state() {
        let h = Fake(AtomicBool::new(false));
        assert_eq!(respond(&h, "/live", None).status(), StatusCode::OK);
        let r = respond(&h, "/ready", None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await, "state not loaded yet\n");
        h.0.store(true, Ordering::Relaxed);
        assert_eq!(respond(&h, "/ready", None).status(), StatusCode::OK);
        let r = respond(
            &h,
            "/metrics",
            Some("application/openmetrics-text; version=1.0.0"),
        );
        assert!(r.headers()[hyper::header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|v| v.starts_with("application/openmetrics-text")));
        assert_eq!(body(r).await, "up 1\n");
        assert_eq!(respond(&h, "/x", None).status(), StatusCode::NOT_FOUND);
    }
}
