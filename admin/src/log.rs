//! Logging for every binary: the filter from `STRAIT_LOG`, the format from `STRAIT_LOG_FORMAT`
//! (`plain`, the default, or `json`: one object per line), colours only on a terminal; and a
//! rate limit for warnings that a request or a connection can cause, so that a failure storm
//! costs a few lines, not gigabytes.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use tracing;

/// Installs the global subscriber on stderr. `default_filter` applies when `STRAIT_LOG` is
/// unset. A bad `STRAIT_LOG_FORMAT` falls back to `plain` and says so.
pub fn init(default_filter: &str) {
    let _ = init_traced(default_filter, None);
}

/// As [`init`], and with `traces`, Strait's own spans (INFO and above) also go to an
/// OpenTelemetry collector through tracing-opentelemetry. Returns the guard that keeps the
/// exporter alive (None without traces, or when the collector address is unusable: said on
/// stderr, logging goes on).
pub fn init_traced(
    default_filter: &str,
    traces: Option<&crate::otel::Settings>,
) -> Option<crate::otel::Guard> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

    let filter = tracing_subscriber::EnvFilter::try_from_env("STRAIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let format = std::env::var("STRAIT_LOG_FORMAT").unwrap_or_default();
    let plain = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    };
    let fmt: Boxed = match format.as_str() {
        "json" => plain()
            .json()
            .flatten_event(true)
            .with_filter(filter)
            .boxed(),
        _ => plain().with_filter(filter).boxed(),
    };
    let mut layers = vec![fmt];
    let mut failure = None;
    let guard = match traces.map(crate::otel::tracer) {
        Some(Ok((tracer, guard))) => {
            let ours = tracing_subscriber::filter::Targets::new()
                .with_target("strait", tracing::Level::INFO);
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(ours)
                    .boxed(),
            );
            Some(guard)
        }
        Some(Err(e)) => {
            failure = Some(e);
            None
        }
        None => None,
    };
    tracing_subscriber::registry().with(layers).init();
    if let Some(e) = failure {
        tracing::warn!(error = %e, "traces are off: the collector address is unusable");
    }
    if !matches!(format.as_str(), "" | "plain" | "json") {
        tracing::warn!(
            value = %format,
            "STRAIT_LOG_FORMAT must be `plain` or `json`; logging plain text"
        );
    }
    if let (Some(t), Some(_)) = (traces, &guard) {
        tracing::info!(collector = %t.collector, ratio = t.sample_ratio, "traces on");
    }
    guard
}

/// At most one line per cause per interval; the next line of that cause carries how many were
/// suppressed since (`suppressed=N`).
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    causes: Mutex<BTreeMap<(&'static str, &'static str), Slot>>,
}

#[derive(Debug)]
struct Slot {
    next: Instant,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            causes: Mutex::new(BTreeMap::new()),
        }
    }

    /// `Some(suppressed since the last line)` when a line of `(cause, detail)` may be written
    /// now, `None` when it is to be suppressed (and counted).
    pub fn check(&self, cause: &'static str, detail: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut causes = self.causes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = causes.entry((cause, detail)).or_insert(Slot {
            next: now,
            suppressed: 0,
        });
        if now >= slot.next {
            slot.next = now + self.interval;
            Some(std::mem::take(&mut slot.suppressed))
        } else {
            slot.suppressed += 1;
            None
        }
    }
}

/// The limit [`log_limited!`] uses: one line per cause every 10 s.
pub static LIMIT: RateLimit = RateLimit::new(Duration::from_secs(10));

/// `log_limited!(Level, cause, detail, fields.., "message")`: a `tracing` event at `Level`,
/// written at most once per `(cause, detail)` every 10 s, with `suppressed` = the lines left
/// out since. `cause` and `detail` are `&'static str` (e.g. the call site and an error kind).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $cause:expr, $detail:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::log::LIMIT.check($cause, $detail) {
            $crate::log::tracing::event!($level, suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_per_interval_with_the_count_of_the_rest() {
        let limit = RateLimit::new(Duration::from_millis(200));
        assert_eq!(limit.check("request failed", "connect timeout"), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.check("request failed", "connect timeout"), None);
        }
        // Another cause has its own budget.
        assert_eq!(limit.check("request failed", "no route"), Some(0));
        std::thread::sleep(Duration::from_millis(220));
        assert_eq!(
            limit.check("request failed", "connect timeout"),
            Some(1000),
            "the next line says how many were left out"
        );
        assert_eq!(limit.check("request failed", "connect timeout"), None);
    }
}
