//! Does bridging the proxy's per-request spans through tracing-opentelemetry cost more than
//! the OpenTelemetry API the proxy uses directly? `cargo bench -p strait-admin --bench spans`
//! makes the same span (a CLIENT span, a name, 10 attributes) both ways into a processor that
//! discards it, and prints the time per span. Nothing asserts: the figures are in
//! docs/performance.md.

use std::time::Instant;

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};
use tracing_subscriber::layer::SubscriberExt as _;

/// Drops every finished span (what the export queue costs is the same either way).
#[derive(Debug)]
struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        std::hint::black_box(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

const SPANS: u32 = 200_000;

fn provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_span_processor(Discard)
        .build()
}

fn direct() -> f64 {
    let provider = provider();
    let tracer = provider.tracer("bench");
    let start = Instant::now();
    for i in 0..SPANS {
        let mut span = tracer
            .span_builder("GET")
            .with_kind(SpanKind::Client)
            .start_with_context(&tracer, &Context::new());
        span.set_attributes([
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("url.path", "/api/items"),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("server.address", "web.shop.svc.cluster.local"),
            KeyValue::new("server.port", 80i64),
            KeyValue::new("network.protocol.version", "1.1"),
            KeyValue::new("http.response.status_code", 200i64),
            KeyValue::new("strait.direction", "outbound"),
            KeyValue::new("strait.tls", true),
            KeyValue::new("strait.request", i64::from(i)),
        ]);
        span.end();
    }
    start.elapsed().as_nanos() as f64 / f64::from(SPANS)
}

fn bridged() -> f64 {
    let provider = provider();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("bench"));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let start = Instant::now();
        for i in 0..SPANS {
            let span = tracing::info_span!(
                "GET",
                otel.kind = "client",
                http.request.method = "GET",
                url.path = "/api/items",
                url.scheme = "http",
                server.address = "web.shop.svc.cluster.local",
                server.port = 80i64,
                network.protocol.version = "1.1",
                http.response.status_code = tracing::field::Empty,
                strait.direction = "outbound",
                strait.tls = true,
                strait.request = i64::from(i),
            );
            span.record("http.response.status_code", 200i64);
            drop(span);
        }
        start.elapsed().as_nanos() as f64 / f64::from(SPANS)
    })
}

fn main() {
    // Warm both paths, then alternate three rounds each.
    let _ = (direct(), bridged());
    let mut d = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        d.push(direct());
        b.push(bridged());
    }
    d.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    println!("span_direct_ns {:.0}", d[1]);
    println!("span_bridged_ns {:.0}", b[1]);
    println!("span_bridged_over_direct {:.2}", b[1] / d[1]);
}
