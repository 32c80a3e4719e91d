//! The proxy's Prometheus metrics, served at the admin server's `/metrics`.
//!
//! Names follow Linkerd's (`request_total`, `response_total`, `tcp_open_total`, ...) under the
//! `strait_` prefix, with latencies in seconds. Labels stay bounded: `target` is the destination
//! service (outbound), `passthrough` (outbound, not in the mesh) or the application port
//! (inbound); never a raw path or a pod IP. A connection resolves its handles once, so the
//! per-request cost is an atomic add, plus one map lookup for the response status.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// A label value shared by every series that carries it (a target, a route, an identity):
/// cloning it per response is a reference-count increment, not a string copy.
#[derive(Debug, Clone, Hash, PartialEq, Eq, Default)]
pub struct Label(Arc<str>);

/// The `target` label.
pub type Target = Label;

impl Label {
    pub fn new(s: &str) -> Self {
        Self(s.into())
    }

    pub fn empty() -> Self {
        Self(Arc::from(""))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A label value a peer proxy sent in a header: text, and bounded in length (a DNS
    /// name's, 253 bytes), else none.
    pub fn from_peer(value: &http::HeaderValue) -> Option<Self> {
        value
            .to_str()
            .ok()
            .filter(|v| v.len() <= 253)
            .map(Self::new)
    }
}

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

/// Labels of a proxied connection or request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub direction: Direction,
    pub target: Target,
}

/// A gRPC status code, or empty for responses that are not gRPC (or ended without one).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct GrpcStatus(pub Option<u16>);

impl EncodeLabelValue for GrpcStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        match self.0 {
            Some(code) => write!(encoder, "{code}"),
            None => Ok(()),
        }
    }
}

/// Where a request went, once it is known: the route and backend chosen (outbound), the peer's
/// identity and whether the hop was mTLS. Carried from the forwarding code to the metrics in
/// the response's extensions.
#[derive(Debug, Clone, Default)]
pub struct Destination {
    pub route: Label,
    pub backend: Label,
    pub server_id: Label,
    pub tls: bool,
    /// The endpoint's address (the access log's `upstream`; not a label).
    pub upstream: Option<std::net::SocketAddr>,
    /// Inbound, from the client's proxy (mTLS only): the service the client addressed
    /// (`<name>.<namespace>`) and the client's workload (`<workload>.<namespace>`).
    pub dst_service: Label,
    pub src_workload: Label,
    /// Outbound, from the server's proxy (mTLS only): the workload that answered
    /// (`<workload>.<namespace>`).
    pub dst_workload: Label,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: Direction,
    pub target: Target,
    /// The service the request was for, its name and namespace (Linkerd's `dst_service` /
    /// `dst_namespace`, Istio's `destination_service_name` / `_namespace`).
    pub dst_namespace: Label,
    pub dst_service: Label,
    /// The workload that answered (Linkerd's `dst_deployment`, Istio's `destination_workload`).
    pub dst_workload: Label,
    /// The client's workload and its namespace (Istio's `source_workload` and
    /// `source_workload_namespace`).
    pub src_namespace: Label,
    pub src_workload: Label,
    pub route: Label,
    pub backend: Label,
    pub tls: bool,
    pub client_id: Label,
    pub server_id: Label,
    pub status_code: u16,
    pub grpc_status: GrpcStatus,
    pub classification: &'static str,
    /// Why the proxy itself answered (empty when the upstream answered).
    pub error: &'static str,
}

/// Labels of the latency and size histograms: per service, route and backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    pub target: Target,
    pub dst_namespace: Label,
    pub dst_service: Label,
    pub route: Label,
    pub backend: Label,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpeculationLabels {
    pub direction: Direction,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// Detection buckets, seconds: from a first packet already there to the timeout.
const DETECT_BUCKETS: [f64; 10] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 10.0,
];
/// Connection lifetime buckets, seconds.
const CONNECTION_BUCKETS: [f64; 11] = [
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0,
];

fn detect_histogram() -> Histogram {
    Histogram::new(DETECT_BUCKETS)
}

fn connection_histogram() -> Histogram {
    Histogram::new(CONNECTION_BUCKETS)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The exemplar of a latency observation: the trace of a sampled request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabels {
    pub trace_id: String,
}

type LatencyHistogram = HistogramWithExemplars<TraceLabels>;
type LatencyFamily = Family<RouteLabels, LatencyHistogram, fn() -> LatencyHistogram>;

fn latency_histogram() -> LatencyHistogram {
    HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter())
}

/// Body size buckets, bytes: 64 B to 64 MiB by powers of 4.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        64.0, 4.0, 11,
    ))
}

/// `<name>.<namespace>` of a Kubernetes service authority (`web.shop.svc.cluster.local:80`);
/// `None` for anything else (an IP, passthrough).
pub fn service_of(authority: &str) -> Option<(&str, &str)> {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => {
            Some((name, ns))
        }
        _ => None,
    }
}

/// Every metric of the proxy.
pub struct Metrics {
    registry: Registry,
    requests: Family<TargetLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: LatencyFamily,
    request_size: HistogramFamily<RouteLabels>,
    response_size: HistogramFamily<RouteLabels>,
    /// This proxy's workload and namespace (the `src_*` labels of its outbound requests, the
    /// `dst_workload` of its inbound ones).
    workload: std::sync::RwLock<(Label, Label)>,
    detect_duration: HistogramFamily<DirectionLabels>,
    tcp_duration: HistogramFamily<TargetLabels>,
    /// This proxy's own SPIFFE ID (empty without identity).
    local_id: std::sync::RwLock<Label>,
    tcp_opened: Family<TargetLabels, Counter>,
    tcp_closed: Family<TargetLabels, Counter>,
    tcp_open: Family<TargetLabels, Gauge>,
    tcp_read: Family<TargetLabels, Counter>,
    tcp_written: Family<TargetLabels, Counter>,
    detect: Family<DetectLabels, Counter>,
    speculation: Family<SpeculationLabels, Counter>,
    /// Connections that skipped detection because their destination is known to speak first.
    server_first_known: Family<DirectionLabels, Counter>,
    pub discovery_connected: Gauge,
    pub discovery_updates: Counter,
    /// Connections and requests refused: discovery had not answered for a destination inside
    /// the cluster networks.
    pub discovery_unavailable: Counter,
    /// NotAfter of the current certificate, Unix seconds.
    pub cert_expiry: Gauge,
    retries: Family<TargetLabels, Counter>,
    retries_exhausted: Family<TargetLabels, Counter>,
    certify: Family<ResultLabels, Counter>,
    inbound_refused: Family<RefusedLabels, Counter>,
    /// Spans sent to the collector.
    pub spans_exported: Counter,
    /// Spans dropped: `queue_full` (the collector is slower than traffic) or `export_failed`.
    pub spans_dropped: Family<ReasonLabels, Counter>,
    /// Access log lines dropped because stdout was not keeping up.
    pub access_log_dropped: Counter,
    /// Mirrored requests (HTTPRoute RequestMirror), by mirror backend and outcome.
    mirrors: Family<MirrorLabels, Counter>,
}

/// Labels of a mirrored request: `outcome` is `sent` (the mirror answered; its response is
/// discarded), `failed` (no answer, or its body was cut) or `skipped` (too many mirrors in
/// flight, or a body that cannot be copied).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub backend: Label,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
    pub target: Target,
    pub client_id: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl strait_admin::otel::export::SpanCounters for Metrics {
    fn exported(&self, n: u64) {
        self.spans_exported.inc_by(n);
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        self.spans_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // `process_*` at the root (standard names), everything else under `strait_`.
        let mut root = Registry::default();
        strait_admin::process::register(&mut root, "strait", "proxy");
        let registry = root.sub_registry_with_prefix("strait");
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            request_size: Family::new_with_constructor(size_histogram),
            response_size: Family::new_with_constructor(size_histogram),
            workload: std::sync::RwLock::new((Label::empty(), Label::empty())),
            detect_duration: Family::new_with_constructor(detect_histogram),
            tcp_duration: Family::new_with_constructor(connection_histogram),
            local_id: std::sync::RwLock::new(Label::empty()),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_open: Family::default(),
            tcp_read: Family::default(),
            tcp_written: Family::default(),
            detect: Family::default(),
            speculation: Family::default(),
            server_first_known: Family::default(),
            discovery_connected: Gauge::default(),
            discovery_updates: Counter::default(),
            discovery_unavailable: Counter::default(),
            cert_expiry: Gauge::default(),
            retries: Family::default(),
            retries_exhausted: Family::default(),
            certify: Family::default(),
            inbound_refused: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Family::default(),
            access_log_dropped: Counter::default(),
            mirrors: Family::default(),
            registry: Registry::default(),
        };
        registry.register("request", "HTTP requests received", m.requests.clone());
        registry.register(
            "http_mirror",
            "Requests mirrored (HTTPRoute RequestMirror) by mirror backend; outcome sent, failed or skipped",
            m.mirrors.clone(),
        );
        registry.register(
            "response",
            "HTTP responses sent, by status and classification",
            m.responses.clone(),
        );
        registry.register(
            "response_latency_seconds",
            "Time from receiving a request to the response headers",
            m.latency.clone(),
        );
        registry.register(
            "request_size_bytes",
            "HTTP request body sizes, from Content-Length (bodiless requests count 0; streamed ones without a length are not observed)",
            m.request_size.clone(),
        );
        registry.register(
            "response_size_bytes",
            "HTTP response body sizes, bytes sent",
            m.response_size.clone(),
        );
        registry.register("tcp_open", "TCP connections accepted", m.tcp_opened.clone());
        registry.register("tcp_close", "TCP connections closed", m.tcp_closed.clone());
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            m.tcp_open.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from accepted connections",
            m.tcp_read.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to accepted connections",
            m.tcp_written.clone(),
        );
        registry.register(
            "protocol_detect",
            "Protocol detection results",
            m.detect.clone(),
        );
        registry.register(
            "protocol_speculation",
            "Upstream connections opened for a silent client, by who spoke first (server_first, client_first, quiet, connect_failed)",
            m.speculation.clone(),
        );
        registry.register(
            "protocol_server_first_known",
            "Connections sent straight to opaque TCP because their destination is remembered as server-first",
            m.server_first_known.clone(),
        );
        registry.register(
            "protocol_detect_duration_seconds",
            "Time protocol detection took",
            m.detect_duration.clone(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "Lifetime of closed connections",
            m.tcp_duration.clone(),
        );
        registry.register(
            "discovery_connected",
            "1 while at least one discovery stream is connected",
            m.discovery_connected.clone(),
        );
        registry.register(
            "discovery_update",
            "Discovery answers received",
            m.discovery_updates.clone(),
        );
        registry.register(
            "discovery_unavailable",
            "Outbound connections and requests refused because discovery had not answered for a destination inside the cluster networks",
            m.discovery_unavailable.clone(),
        );
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "NotAfter of the proxy's current certificate (Unix seconds)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "identity_certify",
            "Certificate requests, by result",
            m.certify.clone(),
        );
        registry.register(
            "inbound_refused",
            "Inbound connections or requests refused (plaintext on a strict port, denied by policy)",
            m.inbound_refused.clone(),
        );
        registry.register("retry", "Retries sent", m.retries.clone());
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            m.retries_exhausted.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans sent to the OpenTelemetry collector",
            m.spans_exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: queue_full or export_failed",
            m.spans_dropped.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because stdout was not keeping up",
            m.access_log_dropped.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Sets this proxy's own identity (the client identity outbound, the server one inbound).
    pub fn set_local_id(&self, id: &str) {
        *self.local_id.write().unwrap_or_else(|p| p.into_inner()) = Label::new(id);
    }

    /// This proxy's workload (`<workload>.<namespace>`): `src_workload`/`src_namespace`
    /// outbound, `dst_workload` inbound.
    pub fn set_workload(&self, workload: &str) {
        *self.workload.write().unwrap_or_else(|p| p.into_inner()) = split_workload(workload);
    }

    fn local_id(&self) -> Label {
        self.local_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }

    /// Handles for one accepted connection; call [`TcpMetrics::closed`] when it ends.
    pub fn tcp(&self, direction: Direction, target: &str) -> TcpMetrics {
        let labels = TargetLabels {
            direction,
            target: Label::new(target),
        };
        self.tcp_opened.get_or_create(&labels).inc();
        let open = self.tcp_open.get_or_create(&labels).clone();
        open.inc();
        TcpMetrics {
            read: self.tcp_read.get_or_create(&labels).clone(),
            written: self.tcp_written.get_or_create(&labels).clone(),
            closed: self.tcp_closed.get_or_create(&labels).clone(),
            duration: self.tcp_duration.get_or_create(&labels).clone(),
            opened: std::time::Instant::now(),
            open,
        }
    }

    pub fn certified(&self, ok: bool) {
        self.certify
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts a refused inbound connection or request.
    pub fn refused(
        &self,
        reason: &'static str,
        port: u16,
        client_id: Option<&strait_identity::SpiffeId>,
    ) {
        self.inbound_refused
            .get_or_create(&RefusedLabels {
                reason,
                target: Label::new(&port.to_string()),
                client_id: client_id.map(|c| c.to_string()).unwrap_or_default(),
            })
            .inc();
    }

    pub fn detected(
        &self,
        direction: Direction,
        protocol: &'static str,
        took: std::time::Duration,
    ) {
        self.detect_duration
            .get_or_create(&DirectionLabels { direction })
            .observe(took.as_secs_f64());
        self.detect
            .get_or_create(&DetectLabels {
                direction,
                protocol,
            })
            .inc();
    }

    /// Counts one mirrored request.
    pub fn mirror(&self, backend: &Label, outcome: &'static str) {
        self.mirrors
            .get_or_create(&MirrorLabels {
                backend: backend.clone(),
                outcome,
            })
            .inc();
    }

    pub fn server_first_known(&self, direction: Direction) {
        self.server_first_known
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn speculated(&self, direction: Direction, outcome: crate::first_bytes::Outcome) {
        if outcome != crate::first_bytes::Outcome::NotNeeded {
            self.speculation
                .get_or_create(&SpeculationLabels {
                    direction,
                    outcome: outcome.as_str(),
                })
                .inc();
        }
    }

    /// Handles for the requests of one connection. `peer`: the client's identity, for inbound
    /// mesh TLS connections.
    pub fn http(
        self: &Arc<Self>,
        direction: Direction,
        target: &str,
        peer: Option<&str>,
    ) -> HttpMetrics {
        let labels = TargetLabels {
            direction,
            target: Label::new(target),
        };
        let local = self.local_id();
        let (client_id, server_id) = match direction {
            Direction::Inbound => (peer.map(Label::new).unwrap_or_default(), local),
            Direction::Outbound => (local, Label::empty()),
        };
        let (workload, namespace) = self
            .workload
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Outbound, the service is the target's and the client is this workload; inbound, this
        // workload answers (in its namespace) and the client's proxy names the service.
        let (dst_service, dst_namespace, dst_workload, src_workload, src_namespace) =
            match (direction, service_of(target)) {
                (Direction::Outbound, Some((name, ns))) => (
                    Label::new(name),
                    Label::new(ns),
                    Label::empty(),
                    workload,
                    namespace,
                ),
                (Direction::Outbound, None) => (
                    Label::empty(),
                    Label::empty(),
                    Label::empty(),
                    workload,
                    namespace,
                ),
                (Direction::Inbound, _) => (
                    Label::empty(),
                    namespace,
                    workload,
                    Label::empty(),
                    Label::empty(),
                ),
            };
        HttpMetrics {
            dst_service,
            dst_namespace,
            dst_workload,
            src_workload,
            src_namespace,
            request_size: self.request_size.clone(),
            response_size: self.response_size.clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            retries_exhausted: self.retries_exhausted.get_or_create(&labels).clone(),
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.clone(),
            responses: self.responses.clone(),
            tls: peer.is_some(),
            client_id,
            server_id,
            labels,
        }
    }
}

/// Per-connection TCP handles.
#[derive(Debug)]
pub struct TcpMetrics {
    pub read: Counter,
    pub written: Counter,
    closed: Counter,
    open: Gauge,
    duration: Histogram,
    opened: std::time::Instant,
}

impl Drop for TcpMetrics {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
        self.duration.observe(self.opened.elapsed().as_secs_f64());
    }
}

/// Per-connection HTTP handles.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Retries sent.
    pub retries: Counter,
    /// Retries skipped: budget spent.
    pub retries_exhausted: Counter,
    requests: Counter,
    latency: LatencyFamily,
    request_size: HistogramFamily<RouteLabels>,
    response_size: HistogramFamily<RouteLabels>,
    responses: Family<ResponseLabels, Counter>,
    labels: TargetLabels,
    dst_service: Label,
    dst_namespace: Label,
    dst_workload: Label,
    src_workload: Label,
    src_namespace: Label,
    /// Connection-level defaults; outbound, the destination fills in the server side.
    tls: bool,
    client_id: Label,
    server_id: Label,
}

impl HttpMetrics {
    pub fn request(&self) {
        self.requests.inc();
    }

    pub fn direction(&self) -> Direction {
        self.labels.direction
    }

    /// Records the latency to the response headers and returns what counts the response when
    /// its stream ends (the gRPC status usually comes in the trailers). `error` names why the
    /// proxy answered itself ("" for upstream answers).
    pub fn response(
        &self,
        status: u16,
        dst: Option<Destination>,
        error: &'static str,
        latency: std::time::Duration,
        request_bytes: Option<u64>,
        trace_id: Option<String>,
    ) -> ResponseRecorder {
        let dst = dst.unwrap_or_default();
        // Inbound, what the client's proxy said (`<name>.<namespace>`).
        let (dst_service, dst_namespace) = match dst.dst_service.as_str().split_once('.') {
            Some((name, ns)) => (Label::new(name), Label::new(ns)),
            None => (self.dst_service.clone(), self.dst_namespace.clone()),
        };
        let (src_workload, src_namespace) = if dst.src_workload.as_str().is_empty() {
            (self.src_workload.clone(), self.src_namespace.clone())
        } else {
            split_workload(dst.src_workload.as_str())
        };
        // Outbound, what the server's proxy said; a passthrough's namespace is the workload's.
        let (dst_workload, dst_namespace) = if dst.dst_workload.as_str().is_empty() {
            (self.dst_workload.clone(), dst_namespace)
        } else {
            let (workload, namespace) = split_workload(dst.dst_workload.as_str());
            let ns = if dst_namespace.as_str().is_empty() {
                namespace
            } else {
                dst_namespace
            };
            (workload, ns)
        };
        let route_labels = RouteLabels {
            direction: self.labels.direction,
            target: self.labels.target.clone(),
            dst_namespace: dst_namespace.clone(),
            dst_service: dst_service.clone(),
            route: dst.route.clone(),
            backend: dst.backend.clone(),
        };
        self.latency.get_or_create(&route_labels).observe(
            latency.as_secs_f64(),
            trace_id.map(|trace_id| TraceLabels { trace_id }),
            None,
        );
        if let Some(n) = request_bytes {
            self.request_size
                .get_or_create(&route_labels)
                .observe(n as f64);
        }
        let response_size = self.response_size.get_or_create(&route_labels).clone();
        let server_id = if dst.server_id.0.is_empty() {
            self.server_id.clone()
        } else {
            dst.server_id
        };
        ResponseRecorder {
            family: self.responses.clone(),
            response_size,
            labels: Some(ResponseLabels {
                direction: self.labels.direction,
                target: self.labels.target.clone(),
                dst_namespace,
                dst_service,
                dst_workload,
                src_namespace,
                src_workload,
                route: dst.route,
                backend: dst.backend,
                tls: self.tls || dst.tls,
                client_id: self.client_id.clone(),
                server_id,
                status_code: status,
                grpc_status: GrpcStatus(None),
                classification: "success",
                error,
            }),
        }
    }
}

/// Counts one response, once: when its body ends, or when it is dropped unfinished.
#[derive(Debug)]
pub struct ResponseRecorder {
    family: Family<ResponseLabels, Counter>,
    response_size: Histogram,
    labels: Option<ResponseLabels>,
}

impl ResponseRecorder {
    /// Records with the gRPC status seen (headers of a trailers-only response, or trailers);
    /// `complete`: the body reached its end.
    /// The labels the response will be counted with (until counted).
    pub fn labels(&self) -> Option<&ResponseLabels> {
        self.labels.as_ref()
    }

    /// Counts the response; returns whether it is a failure (`None`: already counted).
    pub fn finish(
        &mut self,
        grpc_status: Option<u16>,
        grpc: bool,
        complete: bool,
        bytes: u64,
    ) -> Option<bool> {
        let mut labels = self.labels.take()?;
        self.response_size.observe(bytes as f64);
        labels.grpc_status = GrpcStatus(grpc_status);
        let grpc_failed = match grpc_status {
            Some(code) => code != 0,
            None => grpc && labels.status_code == 200,
        };
        let failed =
            labels.status_code >= 500 || grpc_failed || !labels.error.is_empty() || !complete;
        labels.classification = if failed { "failure" } else { "success" };
        self.family.get_or_create(&labels).inc();
        Some(failed)
    }
}

impl Drop for ResponseRecorder {
    fn drop(&mut self) {
        // Dropped before the end: the client went away or the stream was reset.
        let _ = self.finish(None, false, false, 0);
    }
}

/// `<workload>.<namespace>` as (workload, namespace): a namespace has no dot, a workload may.
/// Without a dot, all of it is the workload.
fn split_workload(s: &str) -> (Label, Label) {
    match s.rsplit_once('.') {
        Some((w, ns)) => (Label::new(w), Label::new(ns)),
        None => (Label::new(s), Label::empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_named_from_their_authority() {
        assert_eq!(
            service_of("web.shop.svc.cluster.local:80"),
            Some(("web", "shop"))
        );
        assert_eq!(service_of("web.shop.svc"), Some(("web", "shop")));
        assert_eq!(service_of("10.96.0.10:80"), None);
        assert_eq!(service_of("passthrough"), None);
        assert_eq!(service_of("example.com:443"), None);
    }

    #[test]
    fn exposition_has_the_documented_names_and_labels() {
        let m = Arc::new(Metrics::new());
        m.set_local_id("spiffe://cluster.local/ns/shop/sa/client");
        m.set_workload("frontend.shop");
        let http = m.http(Direction::Outbound, "web.shop.svc.cluster.local:80", None);
        http.request();
        let dst = Destination {
            route: Label::new("web-canary"),
            backend: Label::new("web-v2.shop.svc.cluster.local:80"),
            server_id: Label::new("spiffe://cluster.local/ns/shop/sa/web"),
            tls: true,
            dst_workload: Label::new("web-v2.shop"),
            ..Destination::default()
        };
        http.response(
            200,
            Some(dst),
            "",
            std::time::Duration::from_millis(3),
            Some(0),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        )
        .finish(None, false, true, 1500);
        drop(http.response(
            503,
            None,
            "no endpoints",
            std::time::Duration::from_millis(1),
            None,
            None,
        ));
        let inbound = m.http(
            Direction::Inbound,
            "8080",
            Some("spiffe://cluster.local/ns/a/sa/x"),
        );
        // Inbound, the client's proxy named the service and its workload.
        let said = Destination {
            dst_service: Label::new("web.shop"),
            src_workload: Label::new("client.a"),
            ..Destination::default()
        };
        inbound
            .response(
                200,
                Some(said),
                "",
                std::time::Duration::from_millis(1),
                Some(10),
                None,
            )
            .finish(Some(0), true, true, 20);
        m.detected(
            Direction::Inbound,
            "http/1",
            std::time::Duration::from_micros(50),
        );
        {
            let tcp = m.tcp(Direction::Inbound, "8080");
            tcp.read.inc_by(10);
        }
        let text = m.encode();
        for needle in [
            "strait_request_total{direction=\"outbound\",target=\"web.shop.svc.cluster.local:80\"} 1",
            "strait_response_total{direction=\"outbound\",target=\"web.shop.svc.cluster.local:80\",dst_namespace=\"shop\",dst_service=\"web\",dst_workload=\"web-v2\",src_namespace=\"shop\",src_workload=\"frontend\",route=\"web-canary\",backend=\"web-v2.shop.svc.cluster.local:80\",tls=\"true\",client_id=\"spiffe://cluster.local/ns/shop/sa/client\",server_id=\"spiffe://cluster.local/ns/shop/sa/web\",status_code=\"200\",grpc_status=\"\",classification=\"success\",error=\"\"} 1",
            "status_code=\"503\",grpc_status=\"\",classification=\"failure\",error=\"no endpoints\"} 1",
            "direction=\"inbound\",target=\"8080\",dst_namespace=\"shop\",dst_service=\"web\",dst_workload=\"frontend\",src_namespace=\"a\",src_workload=\"client\",route=\"\",backend=\"\",tls=\"true\",client_id=\"spiffe://cluster.local/ns/a/sa/x\",server_id=\"spiffe://cluster.local/ns/shop/sa/client\",status_code=\"200\",grpc_status=\"0\",classification=\"success\"",
            "strait_response_latency_seconds_bucket{le=\"0.005\",direction=\"outbound\",target=\"web.shop.svc.cluster.local:80\",dst_namespace=\"shop\",dst_service=\"web\",route=\"web-canary\"",
            "strait_response_size_bytes_bucket{le=\"4096.0\",direction=\"outbound\",target=\"web.shop.svc.cluster.local:80\",dst_namespace=\"shop\",dst_service=\"web\",route=\"web-canary\",backend=\"web-v2.shop.svc.cluster.local:80\"} 1",
            "strait_request_size_bytes_sum{direction=\"inbound\",target=\"8080\",dst_namespace=\"shop\",dst_service=\"web\",route=\"\",backend=\"\"} 10.0",
            "strait_protocol_detect_duration_seconds_count{direction=\"inbound\"} 1",
            // The sampled request's trace, as the latency bucket's exemplar.
            " # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.003",
            "strait_tcp_read_bytes_total{direction=\"inbound\",target=\"8080\"} 10",
            "strait_tcp_open_connections{direction=\"inbound\",target=\"8080\"} 0",
            "strait_tcp_close_total{direction=\"inbound\",target=\"8080\"} 1",
            "strait_tcp_connection_duration_seconds_count{direction=\"inbound\",target=\"8080\"} 1",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "strait_build_info{",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
