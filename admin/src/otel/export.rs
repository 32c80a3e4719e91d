//! Span export off the request path: finished spans go into a bounded queue (a full queue drops
//! the span and counts it, it never waits) and one task sends them to the collector in batches.
//! A slow or unreachable collector costs dropped spans, never request latency.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

/// Where a [`QueueProcessor`] counts what became of spans (a binary's metrics).
pub trait SpanCounters: Send + Sync + std::fmt::Debug + 'static {
    /// `n` spans the collector accepted.
    fn exported(&self, n: u64);
    /// `n` spans lost: `queue_full` (the collector is slower than the spans) or
    /// `export_failed` (it refused or did not answer).
    fn dropped(&self, reason: &'static str, n: u64);
}

/// Spans per export call at most.
const MAX_BATCH: usize = 512;
/// How long a finished span may wait for its batch.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// The SDK's span processor, feeding [`run`] through a bounded queue.
#[derive(Debug)]
pub struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    metrics: Arc<dyn SpanCounters>,
}

/// Asks the export task to send what it holds now; answered when done.
pub type Flush = mpsc::Sender<oneshot::Sender<()>>;

impl QueueProcessor {
    /// The processor, and the export task to spawn, with its flush handle.
    pub fn new<E: SpanExporter + 'static>(
        exporter: E,
        capacity: usize,
        timeout: Duration,
        metrics: Arc<dyn SpanCounters>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send, Flush) {
        let (queue, rx) = mpsc::channel(capacity);
        let (flush, flush_rx) = mpsc::channel(1);
        let task = run(exporter, rx, flush_rx, timeout, metrics.clone());
        (Self { queue, metrics }, task, flush)
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn run<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    mut flush: mpsc::Receiver<oneshot::Sender<()>>,
    timeout: Duration,
    metrics: Arc<dyn SpanCounters>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(BATCH_DELAY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warning: Option<std::time::Instant> = None;
    let mut export = async |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        let n = spans.len() as u64;
        let result = tokio::time::timeout(timeout, exporter.export(spans)).await;
        match result {
            Ok(Ok(())) => {
                metrics.exported(n);
            }
            failed => {
                metrics.dropped("export_failed", n);
                // One warning per minute: a collector that is down must not flood the log.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_warning = Some(std::time::Instant::now());
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    tracing::warn!(spans = n, %error, "cannot send spans to the trace collector; dropping them");
                }
            }
        }
    };
    loop {
        tokio::select! {
            ack = flush.recv() => {
                while let Ok(span) = rx.try_recv() {
                    batch.push(span);
                    if batch.len() == MAX_BATCH {
                        export(&mut batch).await;
                    }
                }
                export(&mut batch).await;
                match ack {
                    Some(ack) => { let _ = ack.send(()); }
                    None => return,
                }
            }
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    export(&mut batch).await;
                    return;
                }
                if batch.len() >= MAX_BATCH {
                    export(&mut batch).await;
                }
            }
            _ = tick.tick() => export(&mut batch).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{SpanKind, TraceFlags, TraceState, Tracer, TracerProvider};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    #[derive(Debug, Default)]
    struct Metrics {
        exported: std::sync::atomic::AtomicU64,
        dropped: Mutex<std::collections::HashMap<&'static str, u64>>,
    }

    impl SpanCounters for Metrics {
        fn exported(&self, n: u64) {
            self.exported
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        fn dropped(&self, reason: &'static str, n: u64) {
            *self
                .dropped
                .lock()
                .expect("lock")
                .entry(reason)
                .or_default() += n;
        }
    }

    /// Records what it is sent; fails or stalls on demand.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        spans: Arc<Mutex<Vec<String>>>,
        fail: bool,
        stall: bool,
    }

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.stall {
                std::future::pending::<()>().await;
            }
            if self.fail {
                return Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "collector down".into(),
                ));
            }
            let mut spans = self.spans.lock().expect("lock");
            spans.extend(batch.into_iter().map(|s| s.name.to_string()));
            Ok(())
        }
    }

    fn new_provider(
        exporter: Recorder,
        capacity: usize,
        metrics: &Arc<Metrics>,
    ) -> (SdkTracerProvider, Flush) {
        let metrics: Arc<dyn SpanCounters> = metrics.clone();
        let (processor, task, flush) =
            QueueProcessor::new(exporter, capacity, Duration::from_millis(200), metrics);
        tokio::spawn(task);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        (provider, flush)
    }

    fn end_spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("test");
        let parent = opentelemetry::trace::SpanContext::new(
            opentelemetry::trace::TraceId::from(7u128),
            opentelemetry::trace::SpanId::from(9u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::trace::TraceContextExt::with_remote_span_context(
            &Context::new(),
            parent,
        );
        for i in 0..n {
            let span = tracer
                .span_builder(format!("span-{i}"))
                .with_kind(SpanKind::Server)
                .start_with_context(&tracer, &cx);
            drop(span);
        }
    }

    async fn flush(flush: &Flush) {
        let (tx, rx) = oneshot::channel();
        flush.send(tx).await.expect("task alive");
        rx.await.expect("flushed");
    }

    fn dropped(metrics: &Metrics, reason: &'static str) -> u64 {
        metrics
            .dropped
            .lock()
            .expect("lock")
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn spans_are_exported_in_batches_and_a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let recorder = Recorder::default();
        let (provider, handle) = new_provider(recorder.clone(), 4, &metrics);
        end_spans(&provider, 3);
        flush(&handle).await;
        assert_eq!(recorder.spans.lock().expect("lock").len(), 3);
        assert_eq!(
            metrics.exported.load(std::sync::atomic::Ordering::Relaxed),
            3
        );

        // A collector that never answers: the queue fills, the rest is dropped at once.
        let metrics = Arc::new(Metrics::default());
        let stalled = Recorder {
            stall: true,
            ..Default::default()
        };
        let (provider, _handle) = new_provider(stalled, 4, &metrics);
        end_spans(&provider, 600);
        assert!(
            dropped(&metrics, "queue_full") >= 590,
            "{}",
            dropped(&metrics, "queue_full")
        );
    }

    #[tokio::test]
    async fn failed_exports_are_counted() {
        let metrics = Arc::new(Metrics::default());
        let failing = Recorder {
            fail: true,
            ..Default::default()
        };
        let (provider, handle) = new_provider(failing, 16, &metrics);
        end_spans(&provider, 5);
        flush(&handle).await;
        assert_eq!(dropped(&metrics, "export_failed"), 5);
        assert_eq!(
            metrics.exported.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
