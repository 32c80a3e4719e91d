//! Traces of the control plane and the injector: their `tracing` spans (a discovery push, a
//! certificate issuance and its token check, a Kubernetes watch batch, an admission review)
//! become OpenTelemetry spans through tracing-opentelemetry and leave over OTLP/gRPC when a
//! collector is configured, through the same bounded queue as the proxy's ([`export`]): a slow
//! or absent collector costs dropped spans, never a push or an admission. Without a collector
//! nothing is installed.

pub mod export;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// How long an export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Spans held for export at most.
const QUEUE: usize = 2048;

/// Where spans go, and which share of traces.
#[derive(Debug, Clone)]
pub struct Settings {
    /// OTLP/gRPC endpoint, `http://host:4317`.
    pub collector: String,
    /// `service.name`: `strait-control-plane`, `strait-injector`.
    pub service_name: String,
    /// Share of traces started here that are kept (`ParentBased(TraceIdRatioBased)`).
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// What became of this process's spans, for its `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    exported: Counter,
    dropped: Family<ReasonLabels, Counter>,
}

impl Counters {
    /// Registers `trace_spans_exported_total` and `trace_spans_dropped_total{reason}` under
    /// `registry`'s prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans_exported",
            "Spans the trace collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans lost: queue_full (the collector is slower than the spans) or export_failed",
            self.dropped.clone(),
        );
    }
}

impl export::SpanCounters for Counters {
    fn exported(&self, n: u64) {
        self.exported.inc_by(n);
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(n);
    }
}

/// This process's span counters (one set: the process has one tracer).
pub fn counters() -> Arc<Counters> {
    static COUNTERS: LazyLock<Arc<Counters>> = LazyLock::new(Arc::default);
    COUNTERS.clone()
}

/// Keeps the tracer alive; [`Guard::flush`] sends what is queued (at shutdown).
#[derive(Debug)]
pub struct Guard {
    _provider: SdkTracerProvider,
    flush: export::Flush,
}

impl Guard {
    pub async fn flush(&self, timeout: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.flush.send(tx).await.is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

/// A tracer provider exporting to `collector` (OTLP/gRPC) through [`export::QueueProcessor`]
/// (`queue` spans at most, counted in `counters`), sampling `ParentBased(TraceIdRatioBased(
/// ratio))`, its export task spawned (call within the runtime). Shared by every binary.
pub fn provider(
    collector: &str,
    resource: Resource,
    queue: usize,
    ratio: f64,
    counters: Arc<dyn export::SpanCounters>,
) -> Result<(SdkTracerProvider, export::Flush), String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(&resource);
    let (processor, task, flush) = export::QueueProcessor::new(
        exporter,
        queue,
        EXPORT_TIMEOUT + Duration::from_secs(1),
        counters,
    );
    tokio::spawn(task);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio.clamp(0.0, 1.0),
        ))))
        .with_resource(resource)
        .build();
    Ok((provider, flush))
}

/// A tracer exporting to `settings.collector`, its export task spawned (call within the
/// runtime).
pub fn tracer(settings: &Settings) -> Result<(opentelemetry_sdk::trace::SdkTracer, Guard), String> {
    let mut attributes = Vec::new();
    for (env, key) in [
        ("STRAIT_POD_NAME", "k8s.pod.name"),
        ("STRAIT_POD_NAMESPACE", "k8s.namespace.name"),
    ] {
        if let Ok(v) = std::env::var(env) {
            attributes.push(KeyValue::new(key, v));
        }
    }
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attributes(attributes)
        .build();
    let (provider, flush) = provider(
        &settings.collector,
        resource,
        QUEUE,
        settings.sample_ratio,
        counters(),
    )
    .map_err(|e| format!("STRAIT_TRACE_COLLECTOR {:?}: {e}", settings.collector))?;
    let tracer = provider.tracer(settings.service_name.clone());
    Ok((
        tracer,
        Guard {
            _provider: provider,
            flush,
        },
    ))
}
