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

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// A `target` label value, shared by every series of a connection: cloning it per response
/// is a reference-count increment, not a string copy.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Target(Arc<str>);

impl EncodeLabelValue for Target {
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: Direction,
    pub target: Target,
    pub status_code: u16,
    pub classification: &'static str,
    /// Why the proxy itself answered (empty when the upstream answered).
    pub error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub protocol: &'static str,
    pub timed_out: bool,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every metric of the proxy.
pub struct Metrics {
    registry: Registry,
    requests: Family<TargetLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: HistogramFamily<TargetLabels>,
    tcp_opened: Family<TargetLabels, Counter>,
    tcp_closed: Family<TargetLabels, Counter>,
    tcp_open: Family<TargetLabels, Gauge>,
    tcp_read: Family<TargetLabels, Counter>,
    tcp_written: Family<TargetLabels, Counter>,
    detect: Family<DetectLabels, Counter>,
    pub discovery_connected: Gauge,
    pub discovery_updates: Counter,
    /// NotAfter of the current certificate, Unix seconds.
    pub cert_expiry: Gauge,
    retries: Family<TargetLabels, Counter>,
    retries_exhausted: Family<TargetLabels, Counter>,
    certify: Family<ResultLabels, Counter>,
    inbound_refused: Family<RefusedLabels, Counter>,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strait");
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_open: Family::default(),
            tcp_read: Family::default(),
            tcp_written: Family::default(),
            detect: Family::default(),
            discovery_connected: Gauge::default(),
            discovery_updates: Counter::default(),
            cert_expiry: Gauge::default(),
            retries: Family::default(),
            retries_exhausted: Family::default(),
            certify: Family::default(),
            inbound_refused: Family::default(),
            registry: Registry::default(),
        };
        registry.register("request", "HTTP requests received", m.requests.clone());
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
        Metrics { registry, ..m }
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
            target: Target(target.into()),
        };
        self.tcp_opened.get_or_create(&labels).inc();
        let open = self.tcp_open.get_or_create(&labels).clone();
        open.inc();
        TcpMetrics {
            read: self.tcp_read.get_or_create(&labels).clone(),
            written: self.tcp_written.get_or_create(&labels).clone(),
            closed: self.tcp_closed.get_or_create(&labels).clone(),
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
                target: Target(port.to_string().into()),
                client_id: client_id.map(|c| c.to_string()).unwrap_or_default(),
            })
            .inc();
    }

    pub fn detected(&self, direction: Direction, protocol: &'static str, timed_out: bool) {
        self.detect
            .get_or_create(&DetectLabels {
                direction,
                protocol,
                timed_out,
            })
            .inc();
    }

    /// Handles for the requests of one connection.
    pub fn http(self: &Arc<Self>, direction: Direction, target: &str) -> HttpMetrics {
        let labels = TargetLabels {
            direction,
            target: Target(target.into()),
        };
        HttpMetrics {
            retries: self.retries.get_or_create(&labels).clone(),
            retries_exhausted: self.retries_exhausted.get_or_create(&labels).clone(),
            requests: self.requests.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            responses: self.responses.clone(),
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
}

impl Drop for TcpMetrics {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
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
    latency: Histogram,
    responses: Family<ResponseLabels, Counter>,
    labels: TargetLabels,
}

impl HttpMetrics {
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Records a response: `error` names why the proxy answered itself ("" for upstream answers).
    pub fn response(
        &self,
        status: u16,
        grpc_failed: bool,
        error: &'static str,
        latency: std::time::Duration,
    ) {
        self.latency.observe(latency.as_secs_f64());
        let failed = status >= 500 || grpc_failed || !error.is_empty();
        self.responses
            .get_or_create(&ResponseLabels {
                direction: self.labels.direction,
                target: self.labels.target.clone(),
                status_code: status,
                classification: if failed { "failure" } else { "success" },
                error,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names_and_labels() {
        let m = Arc::new(Metrics::new());
        let http = m.http(Direction::Outbound, "web.shop.svc.cluster.local:80");
        http.request();
        http.response(200, false, "", std::time::Duration::from_millis(3));
        http.response(
            503,
            false,
            "no endpoints",
            std::time::Duration::from_millis(1),
        );
        {
            let tcp = m.tcp(Direction::Inbound, "8080");
            tcp.read.inc_by(10);
        }
        let text = m.encode();
        for needle in [
            "strait_request_total{direction=\"outbound\",target=\"web.shop.svc.cluster.local:80\"} 1",
            "status_code=\"200\",classification=\"success\",error=\"\"} 1",
            "status_code=\"503\",classification=\"failure\",error=\"no endpoints\"} 1",
            "strait_response_latency_seconds_bucket{le=\"0.005\",direction=\"outbound\"",
            "strait_tcp_read_bytes_total{direction=\"inbound\",target=\"8080\"} 10",
            "strait_tcp_open_connections{direction=\"inbound\",target=\"8080\"} 0",
            "strait_tcp_close_total{direction=\"inbound\",target=\"8080\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
