//! RequestRedirect: the proxy answers the request itself with a 3xx and a `Location`; nothing
//! is sent upstream.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, StatusCode};
use strait_api::discovery::RequestRedirect;
use tower::Service;

use super::rewrite::{valid_hostname, with_path, BadRewrite, PathChange};
use super::{Req, Rsp};
use crate::http::error::ProxyError;

/// Why a RequestRedirect cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRedirect {
    #[error("statusCode {0} is not a redirect the Gateway API allows (301, 302, 303, 307, 308)")]
    Status(u32),
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error(transparent)]
    Rewrite(#[from] BadRewrite),
}

#[derive(Debug)]
struct Settings {
    scheme: Option<&'static str>,
    hostname: Option<String>,
    path: Option<PathChange>,
    port: Option<u16>,
    status: StatusCode,
}

/// A terminal service: every request gets the redirect.
#[derive(Debug, Clone)]
pub struct Redirect(Arc<Settings>);

impl Redirect {
    pub fn compile(f: &RequestRedirect) -> Result<Self, BadRedirect> {
        let status = match f.status_code {
            0 => StatusCode::FOUND,
            code @ (301 | 302 | 303 | 307 | 308) => {
                StatusCode::from_u16(code as u16).map_err(|_| BadRedirect::Status(code))?
            }
            code => return Err(BadRedirect::Status(code)),
        };
        let scheme = match f.scheme.as_str() {
            "" => None,
            "http" => Some("http"),
            "https" => Some("https"),
            other => return Err(BadRedirect::Scheme(other.to_string())),
        };
        if !f.hostname.is_empty() && !valid_hostname(&f.hostname) {
            return Err(BadRewrite::Hostname(f.hostname.clone()).into());
        }
        Ok(Self(Arc::new(Settings {
            scheme,
            hostname: (!f.hostname.is_empty()).then(|| f.hostname.clone()),
            path: PathChange::compile(f.path.as_ref(), &f.matched_prefix)?,
            port: u16::try_from(f.port).ok().filter(|p| *p != 0),
            status,
        })))
    }

    /// The `Location` for `req`.
    fn location(&self, req: &Req) -> String {
        let s = &self.0;
        let scheme = s
            .scheme
            .or_else(|| req.uri().scheme_str().filter(|s| *s == "https"))
            .unwrap_or("http");
        let authority = crate::http::headers::authority(req);
        let host = s
            .hostname
            .as_deref()
            .or_else(|| authority.as_ref().map(|a| a.host()))
            .unwrap_or("");
        // The port: the filter's; with a scheme of its own, that scheme's (left out); else the
        // one the client used. 80 for http and 443 for https are never written.
        let port = s.port.or_else(|| {
            s.scheme
                .is_none()
                .then(|| authority.as_ref().and_then(|a| a.port_u16()))
                .flatten()
        });
        let port = match (scheme, port) {
            ("http", Some(80)) | ("https", Some(443)) | (_, None) => String::new(),
            (_, Some(p)) => format!(":{p}"),
        };
        let path = match &s.path {
            Some(change) => with_path(req.uri(), change)
                .map(|pq| pq.to_string())
                .unwrap_or_else(|| "/".into()),
            None => req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".into(), |pq| pq.to_string()),
        };
        // An IPv6 literal keeps its brackets.
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        format!("{scheme}://{host}{port}{path}")
    }
}

impl Service<Req> for Redirect {
    type Response = Rsp;
    type Error = ProxyError;
    type Future = std::future::Ready<Result<Rsp, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let location = self.location(&req);
        let mut resp = http::Response::new(super::empty_body());
        *resp.status_mut() = self.0.status;
        match HeaderValue::try_from(location) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Err(_) => {
                return std::future::ready(Err(ProxyError::NoBackend(
                    "the redirect's Location is not a valid header value".into(),
                )))
            }
        }
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        std::future::ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::discovery::{path_modifier, PathModifier};
    use tower::ServiceExt;

    async fn location(f: RequestRedirect, uri: &str, host: Option<&str>) -> (u16, String) {
        let Ok(redirect) = Redirect::compile(&f) else {
            panic!("valid redirect")
        };
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        let req = b.body(crate::http::ReqBody::empty()).expect("request");
        let Ok(resp) = redirect.oneshot(req).await else {
            panic!("a response")
        };
        let loc = resp.headers()[header::LOCATION]
            .to_str()
            .expect("ascii")
            .to_string();
        (resp.status().as_u16(), loc)
    }

    #[tokio::test]
    async fn locations_follow_the_gateway_api_rules() {
        // Nothing set: the same URL, 302.
        assert_eq!(
            location(RequestRedirect::default(), "/a?b=1", Some("web.shop:8080")).await,
            (302, "http://web.shop:8080/a?b=1".into())
        );
        // A scheme of its own: that scheme's port (not written), the client's host.
        let https = RequestRedirect {
            scheme: "https".into(),
            status_code: 301,
            ..Default::default()
        };
        assert_eq!(
            location(https, "/a", Some("web.shop:8080")).await,
            (301, "https://web.shop/a".into())
        );
        // Host, port and a replaced prefix; port 80 over http is left out.
        let moved = RequestRedirect {
            hostname: "new.shop".into(),
            port: 8443,
            path: Some(PathModifier {
                kind: Some(path_modifier::Kind::Prefix("/v2".into())),
            }),
            matched_prefix: "/v1".into(),
            ..Default::default()
        };
        assert_eq!(
            location(moved, "/v1/x?q", Some("web")).await,
            (302, "http://new.shop:8443/v2/x?q".into())
        );
        let full = RequestRedirect {
            path: Some(PathModifier {
                kind: Some(path_modifier::Kind::Full("/login".into())),
            }),
            status_code: 307,
            ..Default::default()
        };
        assert_eq!(
            location(full, "http://web.shop:80/x", None).await,
            (307, "http://web.shop/login".into())
        );
    }

    #[test]
    fn bad_redirects_are_refused() {
        for bad in [
            RequestRedirect {
                status_code: 200,
                ..Default::default()
            },
            RequestRedirect {
                scheme: "ftp".into(),
                ..Default::default()
            },
            RequestRedirect {
                hostname: "a b".into(),
                ..Default::default()
            },
        ] {
            assert!(Redirect::compile(&bad).is_err(), "{bad:?}");
        }
    }
}
