//! Trace context in request headers: W3C `traceparent`/`tracestate` (read with the SDK's
//! propagator) and B3, single (`b3`) and multi-header (`x-b3-*`). A hop's span is written back
//! as `traceparent`, and also in each B3 format the request arrived with, so an application
//! instrumented with either keeps its trace.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// What a request's headers say about its trace.
#[derive(Debug, Clone)]
pub enum Parent {
    /// No trace context: the sampling ratio decides.
    None,
    /// A parent span, sampled or not.
    Span(Context),
    /// A decision without ids (`b3: 0`): not sampled.
    Unsampled,
}

/// The B3 formats a request carried, to answer in kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub b3_single: bool,
    pub b3_multi: bool,
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The request's parent, and the B3 formats it used. A malformed header counts as absent.
pub fn extract(headers: &HeaderMap) -> (Parent, Formats) {
    let formats = Formats {
        b3_single: headers.contains_key("b3"),
        b3_multi: headers.contains_key("x-b3-traceid"),
    };
    if headers.contains_key("traceparent") {
        let cx =
            TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(headers));
        if cx.span().span_context().is_valid() {
            return (Parent::Span(cx), formats);
        }
    }
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = value("b3") {
        match parse_b3_single(single) {
            Some(B3::Span(sc)) => return (Parent::Span(remote(sc)), formats),
            Some(B3::Unsampled) => return (Parent::Unsampled, formats),
            None => {}
        }
    }
    if let (Some(trace), Some(span)) = (value("x-b3-traceid"), value("x-b3-spanid")) {
        let sampled =
            matches!(value("x-b3-sampled"), Some("1" | "true")) || value("x-b3-flags") == Some("1");
        if let Some(sc) = span_context(trace, span, sampled) {
            return (Parent::Span(remote(sc)), formats);
        }
    }
    if matches!(value("x-b3-sampled"), Some("0" | "false")) {
        return (Parent::Unsampled, formats);
    }
    (Parent::None, formats)
}

/// Writes `span` as the request's trace context; `parent`: the span it continues (B3 names it).
pub fn inject(
    headers: &mut HeaderMap,
    span: &SpanContext,
    parent: Option<SpanId>,
    formats: Formats,
) {
    let (trace, id) = (span.trace_id(), span.span_id());
    let flags = span.trace_flags() & TraceFlags::SAMPLED;
    let sampled = if span.is_sampled() { "1" } else { "0" };
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    set(
        "traceparent",
        format!("00-{trace}-{id}-{:02x}", flags.to_u8()),
    );
    if formats.b3_single {
        match parent {
            Some(p) => set("b3", format!("{trace}-{id}-{sampled}-{p}")),
            None => set("b3", format!("{trace}-{id}-{sampled}")),
        }
    }
    if formats.b3_multi {
        set("x-b3-traceid", trace.to_string());
        set("x-b3-spanid", id.to_string());
        set("x-b3-sampled", sampled.to_string());
        match parent {
            Some(p) => set("x-b3-parentspanid", p.to_string()),
            None => {
                headers.remove("x-b3-parentspanid");
            }
        }
        headers.remove("x-b3-flags");
    }
}

enum B3 {
    Span(SpanContext),
    Unsampled,
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`, or a lone decision `0`, `1` or `d`.
fn parse_b3_single(value: &str) -> Option<B3> {
    let mut parts = value.trim().split('-');
    let first = parts.next()?;
    let Some(span) = parts.next() else {
        return (first == "0").then_some(B3::Unsampled);
    };
    let sampled = matches!(parts.next(), Some("1" | "d"));
    span_context(first, span, sampled).map(B3::Span)
}

/// Ids in hex: a 64-bit trace id is widened to 128 bits, as B3 says.
fn span_context(trace: &str, span: &str, sampled: bool) -> Option<SpanContext> {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace, 32) || hex(trace, 16)) || !hex(span, 16) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ))
}

fn remote(sc: SpanContext) -> Context {
    Context::new().with_remote_span_context(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    fn parent_span(p: &Parent) -> SpanContext {
        match p {
            Parent::Span(cx) => cx.span().span_context().clone(),
            other => panic!("no parent span: {other:?}"),
        }
    }

    #[test]
    fn w3c_traceparent_and_tracestate_are_read() {
        let h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
        ]);
        let (p, formats) = extract(&h);
        let sc = parent_span(&p);
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert_eq!(formats, Formats::default());
        // Not sampled, and malformed.
        let (p, _) = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]));
        assert!(!parent_span(&p).is_sampled());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(
                matches!(extract(&headers(&[("traceparent", bad)])).0, Parent::None),
                "{bad}"
            );
        }
    }

    #[test]
    fn b3_single_and_multi_are_read_and_traceparent_wins() {
        let (p, f) = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        let sc = parent_span(&p);
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled() && f.b3_single && !f.b3_multi);
        // A 64-bit trace id is widened; `d` (debug) means sampled.
        let sc =
            parent_span(&extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-d")])).0);
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled());
        assert!(matches!(
            extract(&headers(&[("b3", "0")])).0,
            Parent::Unsampled
        ));
        assert!(matches!(extract(&headers(&[("b3", "1")])).0, Parent::None));

        let (p, f) = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]));
        let sc = parent_span(&p);
        assert_eq!(sc.span_id().to_string(), "a2fb4a1d1a96d312");
        assert!(sc.is_sampled() && f.b3_multi);
        assert!(matches!(
            extract(&headers(&[("x-b3-sampled", "0")])).0,
            Parent::Unsampled
        ));

        let (p, _) = extract(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]));
        assert_eq!(
            parent_span(&p).trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn a_span_is_written_in_every_format_the_request_used() {
        let sc = span_context("4bf92f3577b34da6a3ce929d0e0e4736", "1111111111111111", true)
            .expect("valid");
        let parent = SpanId::from_hex("00f067aa0ba902b7").ok();
        let mut h = headers(&[("b3", "x"), ("x-b3-traceid", "x"), ("x-b3-flags", "1")]);
        inject(
            &mut h,
            &sc,
            parent,
            Formats {
                b3_single: true,
                b3_multi: true,
            },
        );
        let get = |k: &str| h.get(k).map(|v| v.to_str().expect("ascii").to_string());
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")
        );
        assert_eq!(
            get("b3").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-1-00f067aa0ba902b7")
        );
        assert_eq!(get("x-b3-spanid").as_deref(), Some("1111111111111111"));
        assert_eq!(
            get("x-b3-parentspanid").as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(get("x-b3-sampled").as_deref(), Some("1"));
        assert_eq!(get("x-b3-flags"), None);

        let mut h = HeaderMap::new();
        inject(&mut h, &sc, None, Formats::default());
        assert_eq!(h.len(), 1, "only traceparent: {h:?}");
    }
}
