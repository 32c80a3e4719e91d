//! Errors the proxy answers itself. One place maps them to responses: an HTTP status that says
//! what failed (or a gRPC status for gRPC requests) and the `strait-proxy-error` header, so an
//! operator can tell the proxy's answer from the application's.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::headers::PROXY_ERROR;
use super::Body;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no endpoint is available for {0}")]
    NoEndpoints(String),
    #[error("connection to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("request to {addr} failed: {source}")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the request has no authority (Host header)")]
    NoAuthority,
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    #[error("no route of {0} matches the request")]
    NoRoute(String),
    #[error("no backend: {0}")]
    NoBackend(String),
    #[error("no response within the timeout of {after:?}")]
    Timeout { after: Duration },
    /// The route cannot be served as written (an unsupported or invalid filter); the
    /// Gateway API says its requests get 500.
    #[error("route {route} is invalid: {reason}")]
    InvalidRoute { route: String, reason: String },
    /// Over a local rate limit (HTTPLocalRateLimitPolicy): 429 with `Retry-After`.
    #[error("rate limited by {policy}; retry after {retry_after:?}")]
    RateLimited {
        policy: String,
        retry_after: Duration,
    },
    /// A fault injected by the route's HTTPFault (resilience testing).
    #[error("fault injected: {status}")]
    Fault {
        status: StatusCode,
        /// The gRPC status for gRPC requests; `None`: the one the HTTP status maps to.
        grpc: Option<u8>,
    },
    /// Logged in full; the caller only learns that it was refused (see [`ProxyError::public`]).
    #[error("{client} is not authorized: {denied}")]
    Unauthorized {
        client: String,
        denied: crate::policy::Denied,
    },
    /// Discovery has not answered for a destination inside the cluster networks: plaintext
    /// could reach a meshed pod, so nothing is sent.
    #[error("discovery has not answered for {0}, inside the cluster networks; not sending it in plaintext (is the control plane up?)")]
    DiscoveryUnavailable(SocketAddr),
    #[error(
        "mTLS with {addr} failed: {source} (is the peer's identity the one discovery announced?)"
    )]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A request the RFCs say to refuse (the connection is closed after the answer).
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// A header section past a limit: 431 for a request, 502 for an upstream's response.
    #[error("{what}, over {setting} ({limit})")]
    HeadersTooLarge {
        what: String,
        setting: &'static str,
        limit: usize,
        response: bool,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoEndpoints(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::Tls { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoAuthority => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized { .. } => StatusCode::FORBIDDEN,
            ProxyError::DiscoveryUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::InvalidRoute { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Fault { status, .. } => *status,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::HeadersTooLarge {
                response: false, ..
            } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::HeadersTooLarge { response: true, .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the client's connection is closed after this answer (the request was
    /// malformed: what follows it on the connection cannot be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::HeadersTooLarge {
                    response: false,
                    ..
                }
        )
    }

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoEndpoints(_) => "no endpoints",
            ProxyError::Connect { .. } => "connect failed",
            ProxyError::ConnectTimeout { .. } => "connect timeout",
            ProxyError::Upstream { .. } => "upstream failed",
            ProxyError::NoAuthority => "no authority",
            ProxyError::Tls { .. } => "tls failed",
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::DiscoveryUnavailable(_) => "discovery unavailable",
            ProxyError::NoRoute(_) => "no route",
            ProxyError::RequestBody(_) => "request body",
            ProxyError::NoBackend(_) => "no backend",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::InvalidRoute { .. } => "invalid route",
            ProxyError::RateLimited { .. } => "rate limited",
            ProxyError::Fault { .. } => "fault injected",
            ProxyError::BadRequest(_) => "bad request",
            ProxyError::NotImplemented(_) => "not implemented",
            ProxyError::HeadersTooLarge {
                response: false, ..
            } => "request headers too large",
            ProxyError::HeadersTooLarge { response: true, .. } => "response headers too large",
        }
    }

    fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::ConnectTimeout { .. } => 4, // DEADLINE_EXCEEDED
            ProxyError::Unauthorized { .. } => 7,   // PERMISSION_DENIED
            ProxyError::NoRoute(_) => 12,           // UNIMPLEMENTED
            ProxyError::Timeout { .. } => 4,        // DEADLINE_EXCEEDED
            ProxyError::NoAuthority => 13,          // INTERNAL
            ProxyError::BadRequest(_) | ProxyError::NotImplemented(_) => 13, // INTERNAL
            ProxyError::HeadersTooLarge { .. } => 8, // RESOURCE_EXHAUSTED
            ProxyError::RateLimited { .. } => 8,    // RESOURCE_EXHAUSTED
            ProxyError::Fault {
                grpc: Some(code), ..
            } => *code,
            // The gRPC project's mapping of HTTP statuses.
            ProxyError::Fault { status, .. } => match status.as_u16() {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502..=504 => 14,
                _ => 2,
            },
            _ => 14, // UNAVAILABLE
        }
    }

    /// The response for this error; a gRPC request gets a trailers-only gRPC status.
    /// What the caller is told: the error itself, except that a refusal does not name the
    /// policies, identities or addresses behind it (the proxy's log does).
    pub fn public(&self) -> String {
        match self {
            ProxyError::Unauthorized {
                denied: crate::policy::Denied::Pending,
                ..
            } => "refused: the destination has no inbound policy yet".to_string(),
            ProxyError::Unauthorized { .. } => {
                "forbidden by the destination's inbound policy".to_string()
            }
            ProxyError::RateLimited { .. } => {
                "rate limited by the destination's policy; retry later (Retry-After)".to_string()
            }
            other => other.to_string(),
        }
    }

    pub fn to_response(&self, grpc: bool) -> Response<Body> {
        let message = self.public();
        let marker = HeaderValue::from_str(&message)
            .unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        let mut response = if grpc {
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            let headers = r.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(
                "grpc-status",
                HeaderValue::from(i32::from(self.grpc_status())),
            );
            headers.insert("grpc-message", marker.clone());
            r
        } else {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(message + "\n"))));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            r
        };
        response.headers_mut().insert(PROXY_ERROR, marker);
        if let ProxyError::RateLimited { retry_after, .. } = self {
            // Whole seconds, rounded up (RFC 9110): at least 1.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_with_the_marker_header() {
        let e = ProxyError::NoEndpoints("web.shop.svc.cluster.local:80".into());
        let r = e.to_response(false);
        assert_eq!(r.status(), 503);
        assert!(r.headers()[PROXY_ERROR]
            .to_str()
            .expect("ascii")
            .contains("web.shop"));
        let r = e.to_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        let t = ProxyError::ConnectTimeout {
            addr: ([10, 0, 0, 1], 80).into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(t.to_response(false).status(), 504);
        assert_eq!(t.to_response(true).headers()["grpc-status"], "4");
    }

    #[test]
    fn rate_limited_answers_429_with_retry_after_and_grpc_resource_exhausted() {
        let e = ProxyError::RateLimited {
            policy: "shop/limits".into(),
            retry_after: Duration::from_millis(1200),
        };
        let r = e.to_response(false);
        assert_eq!(r.status(), 429);
        assert_eq!(
            r.headers()[http::header::RETRY_AFTER],
            "2",
            "seconds, rounded up"
        );
        assert!(!r.headers()[PROXY_ERROR]
            .to_str()
            .expect("ascii")
            .contains("shop/limits"));
        let g = e.to_response(true);
        assert_eq!(g.headers()["grpc-status"], "8");
        let f = ProxyError::Fault {
            status: StatusCode::SERVICE_UNAVAILABLE,
            grpc: None,
        };
        assert_eq!(f.to_response(true).headers()["grpc-status"], "14");
        assert_eq!(f.to_response(false).status(), 503);
    }
}
