//! Per-request telemetry beyond the metrics: a span for each hop (OpenTelemetry, sent over
//! OTLP/gRPC) and the access log. Both are off unless configured; off, a request pays one
//! branch. On, a request that is not sampled and not logged pays for reading its headers.
//!
//! The span starts when the request arrives and ends when its response body ends, like the
//! metrics: a gRPC stream's status is in its trailers. The request continues the trace its
//! headers carry (`traceparent`, B3); the proxy rewrites them so the next hop, and the
//! application, see this hop's span as their parent.

pub mod access_log;
pub mod propagation;
pub mod redact;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::Request;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};
use opentelemetry_sdk::Resource;

use crate::config::{AccessLogFormat, ProxyConfig};
use crate::metrics::{Direction, HttpMetrics, Metrics, ResponseLabels};
use access_log::{AccessLog, Entry};
use propagation::Parent;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--trace-collector / STRAIT_TRACE_COLLECTOR {url:?}: {reason}")]
    Collector { url: String, reason: String },
    #[error("--access-log / STRAIT_ACCESS_LOG: cannot start the writer thread: {0}")]
    AccessLog(std::io::Error),
}

/// The proxy's tracing and access log.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracing: Option<Tracing>,
    access_log: Option<AccessLog>,
    redact: redact::Redact,
}

#[derive(Debug)]
struct Tracing {
    tracer: SdkTracer,
    _provider: SdkTracerProvider,
    flush: strait_admin::otel::export::Flush,
}

impl Telemetry {
    /// Tracing and the access log as `cfg` says. Spawns the exporter: call within the runtime.
    pub fn new(cfg: &ProxyConfig, metrics: &Arc<Metrics>) -> Result<Self, TelemetryError> {
        let tracing = match &cfg.trace_collector {
            Some(url) => Some(Tracing::new(cfg, url, metrics)?),
            None => None,
        };
        let access_log = match cfg.access_log {
            AccessLogFormat::Off => None,
            AccessLogFormat::Json => {
                Some(AccessLog::stdout(metrics.clone()).map_err(TelemetryError::AccessLog)?)
            }
        };
        Ok(Self {
            tracing,
            access_log,
            redact: cfg.access_log_redact.clone(),
        })
    }

    /// Sends the spans still queued (at shutdown), waiting at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        if let Some(t) = &self.tracing {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if t.flush.send(tx).await.is_ok() {
                let _ = tokio::time::timeout(timeout, rx).await;
            }
        }
    }

    /// Starts observing `req`: its span (rewriting its trace headers) and its log entry.
    /// `port`: the port the connection was made to (`server.port` when the authority has
    /// none).
    pub fn observe<B>(
        &self,
        req: &mut Request<B>,
        http: &HttpMetrics,
        port: Option<u16>,
    ) -> Option<Box<Observation>> {
        if self.tracing.is_none() && self.access_log.is_none() {
            return None;
        }
        let direction = http.direction();
        let (parent, formats) = propagation::extract(req.headers());
        // Not traced here: the log still names the trace the request belongs to, if any.
        let carried = match (&parent, &self.access_log) {
            (Parent::Span(cx), Some(_)) => Some(cx.span().span_context().clone()),
            _ => None,
        };
        let span = self
            .tracing
            .as_ref()
            .and_then(|t| t.start(req, direction, parent, formats, &self.redact, port));
        let log = self.access_log.as_ref().map(|log| {
            let trace = if span.is_some() { None } else { carried };
            (log.clone(), RequestInfo::of(req, trace, &self.redact))
        });
        Some(Box::new(Observation {
            start: Instant::now(),
            wall: SystemTime::now(),
            direction,
            span,
            log,
            peer: None,
            upstream: None,
            name: span_name(req.method()),
        }))
    }
}

impl Tracing {
    fn new(cfg: &ProxyConfig, url: &str, metrics: &Arc<Metrics>) -> Result<Self, TelemetryError> {
        let mut attributes = vec![KeyValue::new("strait.workload", cfg.workload.clone())];
        if let Some((ns, pod)) = cfg.workload.split_once('/') {
            attributes.push(KeyValue::new("k8s.namespace.name", ns.to_string()));
            attributes.push(KeyValue::new("k8s.pod.name", pod.to_string()));
        }
        if let Some(id) = &cfg.identity {
            attributes.push(KeyValue::new("strait.identity", id.to_string()));
        }
        // The standard variable (the injector puts the pod's owner there: k8s.deployment.name,
        // k8s.statefulset.name, ...).
        if let Ok(extra) = std::env::var("OTEL_RESOURCE_ATTRIBUTES") {
            attributes.extend(
                resource_attributes(&extra)
                    .into_iter()
                    .map(|(k, v)| KeyValue::new(k, v)),
            );
        }
        let resource = Resource::builder_empty()
            .with_service_name(cfg.service_name())
            .with_attributes(attributes)
            .build();
        let (provider, flush) = strait_admin::otel::provider(
            url,
            resource,
            cfg.trace_queue_size as usize,
            cfg.trace_sample_ratio,
            metrics.clone(),
        )
        .map_err(|reason| TelemetryError::Collector {
            url: url.to_string(),
            reason,
        })?;
        let tracer = provider.tracer("strait-proxy");
        tracing::info!(
            collector = url,
            ratio = cfg.trace_sample_ratio,
            "tracing on"
        );
        Ok(Self {
            tracer,
            _provider: provider,
            flush,
        })
    }

    /// This hop's span, if sampled; the request's headers then name it as the parent.
    fn start<B>(
        &self,
        req: &mut Request<B>,
        direction: Direction,
        parent: Parent,
        formats: propagation::Formats,
        redact: &redact::Redact,
        default_port: Option<u16>,
    ) -> Option<Span> {
        let cx = match parent {
            Parent::Unsampled => return None,
            Parent::Span(cx) => cx,
            Parent::None => Context::new(),
        };
        let parent_id = {
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid().then(|| sc.span_id())
        };
        let kind = match direction {
            Direction::Inbound => SpanKind::Server,
            Direction::Outbound => SpanKind::Client,
        };
        let method = method_name(req.method());
        let mut span = self
            .tracer
            .span_builder(span_name(req.method()))
            .with_kind(kind)
            .start_with_context(&self.tracer, &cx);
        if !span.is_recording() {
            return None;
        }
        let uri = req.uri();
        let authority = crate::http::headers::authority(req);
        let (host, port) = split_authority(authority.as_ref().map_or("", |a| a.as_str()));
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.clone()),
            KeyValue::new("url.path", uri.path().to_string()),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", protocol_version(req.version())),
            KeyValue::new("server.address", host.to_string()),
            KeyValue::new("strait.direction", direction.as_str()),
        ];
        // Without a port in the authority, the port the connection was made to.
        if let Some(port) = port.or(default_port) {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        if method == "_OTHER" {
            attributes.push(KeyValue::new(
                "http.request.method_original",
                req.method().as_str().to_string(),
            ));
        }
        if let Some(q) = uri.query() {
            attributes.push(KeyValue::new("url.query", redact.query(q).into_owned()));
        }
        if let Some(ua) = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("user_agent.original", ua.to_string()));
        }
        span.set_attributes(attributes);
        propagation::inject(req.headers_mut(), span.span_context(), parent_id, formats);
        Some(span)
    }
}

/// What the access log needs of the request, taken before it is forwarded.
#[derive(Debug)]
struct RequestInfo {
    method: http::Method,
    authority: String,
    path: String,
    version: http::Version,
    user_agent: String,
    request_bytes: Option<u64>,
    trace: Option<opentelemetry::trace::SpanContext>,
    request_id: String,
}

/// The request id header, propagated to the application and the next hop.
pub const REQUEST_ID: http::header::HeaderName =
    http::header::HeaderName::from_static("x-request-id");

/// A random request id in the UUID v4 form.
fn new_request_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

impl RequestInfo {
    /// What the log needs of `req`; gives it an `x-request-id` when it has none, so that the
    /// application and the next hop log the same id.
    fn of<B>(
        req: &mut Request<B>,
        trace: Option<opentelemetry::trace::SpanContext>,
        redact: &redact::Redact,
    ) -> Self {
        let request_id = match req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
            Some(id) => id.to_owned(),
            None => {
                let id = new_request_id();
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    req.headers_mut().insert(REQUEST_ID, v);
                }
                id
            }
        };
        let header =
            |name: http::header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
        Self {
            request_id,
            method: req.method().clone(),
            authority: crate::http::headers::authority(req)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            path: redact
                .apply(req.uri().path_and_query().map_or("/", |p| p.as_str()))
                .into_owned(),
            version: req.version(),
            user_agent: header(http::header::USER_AGENT).unwrap_or("").to_string(),
            request_bytes: header(http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
            trace,
        }
    }
}

/// One request being observed, until its response body ends.
#[derive(Debug)]
pub struct Observation {
    start: Instant,
    wall: SystemTime,
    direction: Direction,
    span: Option<Span>,
    log: Option<(AccessLog, RequestInfo)>,
    /// The client's address.
    pub peer: Option<std::net::SocketAddr>,
    /// Where the request went (the endpoint, or the application).
    pub upstream: Option<std::net::SocketAddr>,
    /// The span's name before a route is known.
    name: Cow<'static, str>,
}

/// How a response ended, for [`Observation::finish`].
#[derive(Debug)]
pub struct Outcome<'a> {
    pub labels: Option<&'a ResponseLabels>,
    pub grpc_status: Option<u16>,
    pub failed: bool,
    pub response_bytes: u64,
}

impl Observation {
    /// The trace id of this hop's span, when the request is sampled (the latency histogram's
    /// exemplar).
    pub fn sampled_trace_id(&self) -> Option<String> {
        self.span
            .as_ref()
            .map(|s| s.span_context())
            .filter(|sc| sc.is_sampled())
            .map(|sc| sc.trace_id().to_string())
    }

    /// Ends the span and writes the log entry.
    pub fn finish(self: Box<Self>, outcome: Outcome<'_>) {
        let Observation {
            start,
            wall,
            direction,
            span,
            log,
            peer,
            upstream,
            name,
        } = *self;
        let labels = outcome.labels;
        let status = labels.map_or(0, |l| l.status_code);
        let error = labels.map_or("", |l| l.error);
        let get = |f: fn(&ResponseLabels) -> &str| labels.map_or("", f);
        let route = get(|l| l.route.as_str());
        let backend = get(|l| l.backend.as_str());
        let client_id = get(|l| l.client_id.as_str());
        let server_id = get(|l| l.server_id.as_str());
        let tls = labels.is_some_and(|l| l.tls);
        // The span's ids, for the log line.
        let mut ids = None;
        if let Some(mut span) = span {
            if log.is_some() {
                let sc = span.span_context();
                ids = Some((sc.trace_id().to_string(), sc.span_id().to_string()));
            }
            let mut attributes = vec![
                KeyValue::new("http.response.status_code", i64::from(status)),
                KeyValue::new("strait.tls", tls),
            ];
            let mut text = |key: &'static str, value: &str| {
                if !value.is_empty() {
                    attributes.push(KeyValue::new(key, value.to_string()));
                }
            };
            text("strait.route", route);
            text("strait.backend", backend);
            text("strait.client.id", client_id);
            text("strait.server.id", server_id);
            text("strait.error", error);
            if let Some(code) = outcome.grpc_status {
                attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            }
            // A route is known: `{method} {route}` (a bounded set of names).
            if !route.is_empty() {
                span.update_name(format!("{name} {route}"));
            }
            // Semantic conventions: a 4xx is an error of the client, so of a CLIENT span, not
            // of a SERVER one.
            let client_error = direction == Direction::Outbound && (400..500).contains(&status);
            if outcome.failed || client_error {
                let kind = if !error.is_empty() {
                    error.to_string()
                } else if status >= 400 {
                    status.to_string()
                } else if let Some(code) = outcome.grpc_status.filter(|c| *c != 0) {
                    format!("grpc_status_{code}")
                } else {
                    "stream_incomplete".to_string()
                };
                attributes.push(KeyValue::new("error.type", kind.clone()));
                span.set_status(Status::error(kind));
            }
            span.set_attributes(attributes);
            span.end();
        }
        if let Some((log, req)) = log {
            let (trace_id, span_id) = match (&ids, &req.trace) {
                (Some((t, s)), _) => (t.clone(), s.clone()),
                (None, Some(sc)) => (sc.trace_id().to_string(), String::new()),
                (None, None) => (String::new(), String::new()),
            };
            log.log(&Entry {
                timestamp: humantime::format_rfc3339_millis(wall).to_string(),
                direction: direction.as_str(),
                client_id,
                server_id,
                method: req.method.as_str(),
                authority: &req.authority,
                path: &req.path,
                protocol: protocol_name(req.version),
                status,
                grpc_status: outcome.grpc_status,
                classification: if outcome.failed { "failure" } else { "success" },
                error,
                route,
                backend,
                tls,
                duration_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                peer: &peer.map(|a| a.to_string()).unwrap_or_default(),
                upstream: &upstream.map(|a| a.to_string()).unwrap_or_default(),
                request_id: &req.request_id,
                request_bytes: req.request_bytes,
                response_bytes: outcome.response_bytes,
                user_agent: &req.user_agent,
                trace_id: &trace_id,
                span_id: &span_id,
            });
        }
    }
}

/// The method as a span name: the standard ones without an allocation.
fn method_name(m: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let name = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        // Semantic conventions: other methods are `_OTHER`, keeping span names bounded.
        _ => "_OTHER",
    };
    Cow::Borrowed(name)
}

/// A span's name before its route is known: the method, or `HTTP` for a method outside the
/// standard ones (semantic conventions).
fn span_name(m: &http::Method) -> Cow<'static, str> {
    match method_name(m) {
        Cow::Borrowed("_OTHER") => Cow::Borrowed("HTTP"),
        name => name,
    }
}

/// `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by commas, values percent-encoded.
fn resource_attributes(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), redact::percent_decode(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// `host[:port]` (IPv6 literals in brackets) as host and port.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            match port.parse() {
                Ok(p) => (host.trim_start_matches('[').trim_end_matches(']'), Some(p)),
                Err(_) => (authority, None),
            }
        }
        _ => (
            authority.trim_start_matches('[').trim_end_matches(']'),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("web.shop:80"), ("web.shop", Some(80)));
        assert_eq!(split_authority("web"), ("web", None));
        assert_eq!(split_authority("[fd00::1]:8080"), ("fd00::1", Some(8080)));
        assert_eq!(split_authority("[fd00::1]"), ("fd00::1", None));
        assert_eq!(split_authority(""), ("", None));
    }

    #[test]
    fn unusual_methods_keep_span_names_bounded() {
        assert_eq!(method_name(&http::Method::GET), "GET");
        let odd = http::Method::from_bytes(b"PROPFIND").expect("method");
        assert_eq!(method_name(&odd), "_OTHER");
    }
}
