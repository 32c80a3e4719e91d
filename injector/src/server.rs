//! The webhook's HTTPS server and its plaintext admin server (`/live`, `/ready`, `/metrics`).
//!
//! Two webhook paths, so the injector never needs to read Namespaces from the API:
//! `/inject` is called by the webhook entry whose `namespaceSelector` matches namespaces
//! labelled `strait.io/inject=enabled`; `/inject-opt-in` by the entry for every other namespace,
//! where only pods annotated `strait.io/inject: enabled` are injected.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use strait_identity::tls::Credentials;

use crate::config::InjectConfig;
use crate::review::{pod_name, review_in, Outcome};

/// AdmissionReview bodies are a pod and its old version; 4 MiB is far above any real one.
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The injector's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<ResultLabels, Counter>,
    pub duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        strait_admin::process::register(&mut registry, "strait", "injector");
        strait_admin::otel::counters()
            .register(registry.sub_registry_with_prefix("strait_injector"));
        let requests = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "strait_injector_admission_requests",
            "Admission reviews answered, by result (injected, skipped, ignored, error)",
            requests.clone(),
        );
        registry.register(
            "strait_injector_admission_duration_seconds",
            "Time to answer an admission review",
            duration.clone(),
        );
        Self {
            registry,
            requests,
            duration,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shared by every connection.
#[derive(Debug)]
pub struct State {
    pub config: InjectConfig,
    pub metrics: Metrics,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

/// One webhook request.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // The webhook entry that called: whether the namespace opted in, and whether its
    // PodSecurity level forbids the init container (see `strait install`).
    let path = req.uri().path().to_string();
    let (namespace_enabled, pod_security) = match path.as_str() {
        "/inject" => (true, false),
        "/inject-opt-in" => (false, false),
        "/inject-pod-security" => (true, true),
        "/inject-opt-in-pod-security" => (false, true),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: use /inject, /inject-opt-in, /inject-pod-security or /inject-opt-in-pod-security\n",
            )
        }
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n");
    }
    let started = Instant::now();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            state
                .metrics
                .requests
                .get_or_create(&ResultLabels {
                    result: "error".into(),
                })
                .inc();
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            );
        }
    };
    let span = tracing::info_span!(
        "admission review",
        path = %path,
        pod = tracing::field::Empty,
        result = tracing::field::Empty
    );
    let _entered = span.enter();
    let (status, bytes, result) =
        match review_in(&body, namespace_enabled, pod_security, &state.config) {
            Ok((answer, outcome)) => {
                let pod = pod_name(&body);
                span.record("pod", tracing::field::display(&pod));
                match &outcome {
                    Outcome::Injected => tracing::info!(%pod, "injected"),
                    Outcome::Skipped(why) => {
                        tracing::debug!(%pod, reason = why.as_str(), "not injected")
                    }
                    Outcome::Ignored => {}
                    Outcome::Failed(error) => {
                        tracing::warn!(%pod, %error, "admitted without the sidecar")
                    }
                }
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                (StatusCode::OK, bytes, outcome.label())
            }
            Err(error) => {
                tracing::warn!(%error, "bad admission request");
                (
                    StatusCode::BAD_REQUEST,
                    format!("{error}\n").into_bytes(),
                    "error",
                )
            }
        };
    span.record("result", result);
    state
        .metrics
        .requests
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .inc();
    state
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let mut resp = text(status, bytes);
    if status == StatusCode::OK {
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    resp
}

/// Keeps the serving certificate up to date with its files (a renewed Secret is picked up
/// without a restart). Fails only if the first load fails.
pub async fn load_certificate(
    creds: Arc<Credentials>,
    cert: PathBuf,
    key: PathBuf,
) -> Result<(), String> {
    let load = move |creds: &Credentials| -> Result<(String, String), String> {
        let cert_pem = std::fs::read_to_string(&cert)
            .map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(&key)
            .map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?;
        let chain = strait_identity::ca::pem_blocks(&cert_pem, "CERTIFICATE");
        let key_der = strait_identity::ca::pem_blocks(&key_pem, "PRIVATE KEY")
            .into_iter()
            .next()
            .ok_or_else(|| format!("--tls-key {}: no PKCS#8 PRIVATE KEY block", key.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "--tls-cert {}: no CERTIFICATE block",
                cert.display()
            ));
        }
        creds
            .install(chain, key_der)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        Ok((cert_pem, key_pem))
    };
    let mut current = load(&creds)?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            // `load` re-reads both files; only a change is installed and logged.
            match load(&creds) {
                Ok(pair) if pair != current => {
                    tracing::info!("serving certificate reloaded");
                    current = pair;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "keeping the current serving certificate"),
            }
        }
    });
    Ok(())
}

/// The webhook's TLS settings: TLS 1.2 and 1.3 (the API server's client does both), h2 and
/// HTTP/1.1.
pub fn tls_config(creds: Arc<Credentials>) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(strait_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(creds);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the webhook on `listener` until the process ends.
pub async fn serve_webhook(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(strait_admin::HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_pending_accept_reset_streams(20)
                .max_concurrent_streams(256);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

/// The injector's state, as its admin port reports it.
struct Health {
    state: Arc<State>,
    ready: Arc<Credentials>,
}

impl strait_admin::Health for Health {
    fn ready(&self) -> Result<(), &'static str> {
        if self.ready.is_ready() {
            Ok(())
        } else {
            Err("no serving certificate")
        }
    }

    fn metrics(&self) -> String {
        self.state.metrics.encode()
    }
}

/// Serves `/live`, `/ready` and `/metrics` in plaintext (for probes and Prometheus).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    ready: Arc<Credentials>,
) {
    strait_admin::serve(listener, Arc::new(Health { state, ready })).await;
}
