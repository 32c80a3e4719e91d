//! URLRewrite: the path (whole, or the prefix the route matched) and the Host a request is
//! forwarded with. Where it goes is decided already; only what the server sees changes.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Uri};
use strait_api::discovery::{path_modifier, PathModifier, UrlRewrite};
use tower::{Layer, Service};

use super::Req;

/// A path change, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    Full(String),
    /// Replace `matched` (the route's PathPrefix) with `with`.
    Prefix {
        matched: String,
        with: String,
    },
}

/// Why a filter cannot be built; the rule answers 500 and the control plane says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRewrite {
    #[error("hostname {0:?} is not a valid host")]
    Hostname(String),
    #[error("path {0:?} does not start with '/'")]
    Path(String),
}

impl PathChange {
    pub fn compile(m: Option<&PathModifier>, matched: &str) -> Result<Option<Self>, BadRewrite> {
        let change = match m.and_then(|m| m.kind.as_ref()) {
            None => return Ok(None),
            Some(path_modifier::Kind::Full(p)) => PathChange::Full(p.clone()),
            Some(path_modifier::Kind::Prefix(p)) => PathChange::Prefix {
                matched: matched.trim_end_matches('/').to_string(),
                with: p.clone(),
            },
        };
        let path = match &change {
            PathChange::Full(p) | PathChange::Prefix { with: p, .. } => p,
        };
        if !path.starts_with('/') || PathAndQuery::try_from(path.as_str()).is_err() {
            return Err(BadRewrite::Path(path.clone()));
        }
        Ok(Some(change))
    }

    /// The new path of `path`. A replaced prefix keeps what followed it, with one `/` between.
    pub fn apply(&self, path: &str) -> String {
        match self {
            PathChange::Full(p) => p.clone(),
            PathChange::Prefix { matched, with } => {
                let rest = path.strip_prefix(matched.as_str()).unwrap_or(path);
                let mut out = format!("{}{rest}", with.trim_end_matches('/'));
                if !out.starts_with('/') {
                    out.insert(0, '/');
                }
                out
            }
        }
    }
}

/// `path?query` of `uri` with its path changed.
pub fn with_path(uri: &Uri, change: &PathChange) -> Option<PathAndQuery> {
    let path = change.apply(uri.path());
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(pq).ok()
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty() && !h.contains(['/', '@', '?', '#', ' ']) && Authority::try_from(h).is_ok()
}

#[derive(Debug, Clone)]
pub struct RewriteLayer(Arc<Rewrite>);

#[derive(Debug)]
struct Rewrite {
    hostname: Option<(Authority, HeaderValue)>,
    path: Option<PathChange>,
}

impl RewriteLayer {
    /// `Ok(None)` when the filter changes nothing.
    pub fn compile(f: &UrlRewrite) -> Result<Option<Self>, BadRewrite> {
        let path = PathChange::compile(f.path.as_ref(), &f.matched_prefix)?;
        let hostname = if f.hostname.is_empty() {
            None
        } else {
            let bad = || BadRewrite::Hostname(f.hostname.clone());
            if !valid_hostname(&f.hostname) {
                return Err(bad());
            }
            Some((
                Authority::try_from(f.hostname.as_str()).map_err(|_| bad())?,
                HeaderValue::from_str(&f.hostname).map_err(|_| bad())?,
            ))
        };
        Ok((hostname.is_some() || path.is_some())
            .then(|| Self(Arc::new(Rewrite { hostname, path }))))
    }
}

impl Rewrite {
    fn apply(&self, req: &mut Req) {
        let mut parts = req.uri().clone().into_parts();
        if let Some(change) = &self.path {
            let uri = req.uri();
            if let Some(pq) = with_path(uri, change) {
                parts.path_and_query = Some(pq);
            }
        }
        if let Some((authority, host)) = &self.hostname {
            if parts.authority.is_some() {
                parts.authority = Some(authority.clone());
            }
            if req.headers().contains_key(http::header::HOST) || parts.authority.is_none() {
                req.headers_mut().insert(http::header::HOST, host.clone());
            }
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

impl<S> Layer<S> for RewriteLayer {
    type Service = Rewriting<S>;
    fn layer(&self, inner: S) -> Rewriting<S> {
        Rewriting {
            inner,
            rewrite: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rewriting<S> {
    inner: S,
    rewrite: Arc<Rewrite>,
}

impl<S: Service<Req>> Service<Req> for Rewriting<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        self.rewrite.apply(&mut req);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(matched: &str, with: &str) -> PathChange {
        PathChange::Prefix {
            matched: matched.trim_end_matches('/').into(),
            with: with.into(),
        }
    }

    #[test]
    fn prefixes_are_replaced_as_the_gateway_api_examples_say() {
        for (matched, with, path, want) in [
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
            ("/foo", "/", "/foo/bar", "/bar"),
            ("/foo", "/", "/foo", "/"),
            ("/foo", "/xyz", "/foo", "/xyz"),
            ("/foo", "/xyz", "/foo/", "/xyz/"),
            ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/", "/xyz", "/bar", "/xyz/bar"),
        ] {
            assert_eq!(
                prefix(matched, with).apply(path),
                want,
                "{matched} -> {with} on {path}"
            );
        }
        assert_eq!(PathChange::Full("/new".into()).apply("/old/x"), "/new");
    }

    #[test]
    fn the_query_stays_and_host_and_path_change() {
        let Ok(Some(layer)) = RewriteLayer::compile(&UrlRewrite {
            hostname: "api.internal".into(),
            path: Some(PathModifier {
                kind: Some(path_modifier::Kind::Prefix("/v2".into())),
            }),
            matched_prefix: "/v1".into(),
        }) else {
            panic!("valid")
        };
        let mut req = http::Request::builder()
            .uri("/v1/users?id=7")
            .header("host", "web.shop:80")
            .body(crate::http::ReqBody::empty())
            .expect("request");
        layer.0.apply(&mut req);
        assert_eq!(req.uri(), "/v2/users?id=7");
        assert_eq!(req.headers()["host"], "api.internal");
        // HTTP/2: the authority is in the URI.
        let mut req = http::Request::builder()
            .uri("http://web.shop/v1")
            .body(crate::http::ReqBody::empty())
            .expect("request");
        layer.0.apply(&mut req);
        assert_eq!(req.uri(), "http://api.internal/v2");
    }

    #[test]
    fn invalid_rewrites_are_refused() {
        let bad_host = UrlRewrite {
            hostname: "a/b".into(),
            ..Default::default()
        };
        assert!(matches!(
            RewriteLayer::compile(&bad_host),
            Err(BadRewrite::Hostname(_))
        ));
        let bad_path = UrlRewrite {
            path: Some(PathModifier {
                kind: Some(path_modifier::Kind::Full("relative".into())),
            }),
            ..Default::default()
        };
        assert!(matches!(
            RewriteLayer::compile(&bad_path),
            Err(BadRewrite::Path(_))
        ));
        assert!(matches!(
            RewriteLayer::compile(&UrlRewrite::default()),
            Ok(None)
        ));
    }
}
