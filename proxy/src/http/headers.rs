//! Header rules: hop-by-hop headers (RFC 9110 section 7.6.1) and Strait's own headers.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

/// Set by an outbound proxy on an HTTP/1 request it carries over HTTP/2 to a peer proxy; the
/// inbound proxy removes it and sends the request to the application as HTTP/1 again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("strait-orig-proto");
/// Between proxies (mTLS only): the service the request went to, `<name>.<namespace>`, and the
/// client's workload, `<workload>.<namespace>`; the server's proxy labels its metrics with them
/// and removes them before the application.
pub const DST_SERVICE: HeaderName = HeaderName::from_static("strait-dst-service");
pub const SRC_WORKLOAD: HeaderName = HeaderName::from_static("strait-src-workload");
/// Back from the server's proxy on responses to a peer proxy (mTLS only): the workload that
/// answered, `<workload>.<namespace>`, for the client's `dst_workload`; removed before the
/// client application.
pub const DST_WORKLOAD: HeaderName = HeaderName::from_static("strait-dst-workload");
/// Marks a response the proxy itself wrote, and says why.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("strait-proxy-error");

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Removes hop-by-hop headers and those the `Connection` header names. `te: trailers` survives
/// (gRPC needs it), and with `keep_upgrade` so do `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in &HOP_BY_HOP {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// An HTTP/1 request asking to switch protocols (WebSocket and friends), or a CONNECT tunnel.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        return false;
    }
    if req.method() == Method::CONNECT {
        return true;
    }
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The authority the client addressed: the URI's (HTTP/2, absolute-form) or the Host header.
pub fn authority<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse().ok())
}

/// Whether this is a gRPC request (its errors must be gRPC statuses).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        let plain = Request::builder()
            .header(header::UPGRADE, "h2c")
            .body(())
            .expect("request");
        assert!(
            !is_upgrade(&plain),
            "Upgrade without Connection: upgrade is not an upgrade"
        );
    }

    #[test]
    fn authority_prefers_the_uri_then_host() {
        let r = Request::builder()
            .uri("/x")
            .header(header::HOST, "web.shop:80")
            .body(())
            .expect("req");
        assert_eq!(
            authority(&r).map(|a| a.to_string()).as_deref(),
            Some("web.shop:80")
        );
        let r = Request::builder()
            .uri("http://a.b/x")
            .header(header::HOST, "c")
            .body(())
            .expect("req");
        assert_eq!(authority(&r).map(|a| a.to_string()).as_deref(), Some("a.b"));
    }
}
