//! RequestHeaderModifier and ResponseHeaderModifier: set, add and remove headers of the request
//! before it goes on, or of the response before it goes back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use strait_api::discovery::HeaderModifier;
use tower::{Layer, Service};

use super::{Req, Rsp};
use crate::http::error::ProxyError;

/// One modifier, compiled: names and values checked once, when the route is built.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// A header the Gateway API forbids a filter to touch? None are, for a mesh; but names and
/// values must be valid HTTP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("header {0:?} is not a valid HTTP header name or value")]
pub struct BadHeader(pub String);

impl Edits {
    pub fn compile(m: &HeaderModifier) -> Result<Self, BadHeader> {
        let pair = |h: &strait_api::discovery::Header| {
            Ok((
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| BadHeader(h.name.clone()))?,
                HeaderValue::from_str(&h.value).map_err(|_| BadHeader(h.name.clone()))?,
            ))
        };
        Ok(Self {
            set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: m
                .remove
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|_| BadHeader(n.clone())))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Several modifiers of one kind, applied in order, as one.
    pub fn merge(mut self, other: Edits) -> Self {
        self.set.extend(other.set);
        self.add.extend(other.add);
        self.remove.extend(other.remove);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Which side a [`HeadersLayer`] edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

#[derive(Debug, Clone)]
pub struct HeadersLayer {
    edits: Arc<Edits>,
    side: Side,
}

impl HeadersLayer {
    /// `None` when there is nothing to edit (no layer at all).
    pub fn new(edits: Edits, side: Side) -> Option<Self> {
        (!edits.is_empty()).then(|| Self {
            edits: Arc::new(edits),
            side,
        })
    }
}

impl<S> Layer<S> for HeadersLayer {
    type Service = Headers<S>;
    fn layer(&self, inner: S) -> Headers<S> {
        Headers {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Headers<S> {
    inner: S,
    layer: HeadersLayer,
}

impl<S> Service<Req> for Headers<S>
where
    S: Service<Req, Response = Rsp, Error = ProxyError>,
{
    type Response = Rsp;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let response = match self.layer.side {
            Side::Request => {
                self.layer.edits.apply(req.headers_mut());
                None
            }
            Side::Response => Some(self.layer.edits.clone()),
        };
        ResponseFuture {
            inner: self.inner.call(req),
            response,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        response: Option<Arc<Edits>>,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Rsp, ProxyError>>,
{
    type Output = Result<Rsp, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(edits)) = (&mut out, this.response.as_ref()) {
            edits.apply(resp.headers_mut());
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::discovery::Header;
    use tower::ServiceExt;

    fn modifier(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderModifier {
        let h = |(n, v): &(&str, &str)| Header {
            name: n.to_string(),
            value: v.to_string(),
        };
        HeaderModifier {
            set: set.iter().map(h).collect(),
            add: add.iter().map(h).collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Echoes the request's headers into the response.
    fn echo() -> impl Service<Req, Response = Rsp, Error = ProxyError, Future = impl Send> + Clone {
        tower::service_fn(|req: Req| async move {
            let mut resp = http::Response::new(super::super::empty_body());
            *resp.headers_mut() = req.headers().clone();
            resp.headers_mut()
                .insert("x-server", HeaderValue::from_static("app"));
            Ok::<_, ProxyError>(resp)
        })
    }

    #[tokio::test]
    async fn request_and_response_headers_are_set_added_and_removed() {
        let Ok(req_edits) = Edits::compile(&modifier(
            &[("x-env", "canary")],
            &[("x-multi", "b")],
            &["x-debug"],
        )) else {
            panic!("valid")
        };
        let Ok(resp_edits) = Edits::compile(&modifier(&[("x-server", "mesh")], &[], &["x-secret"]))
        else {
            panic!("valid")
        };
        let svc = tower::ServiceBuilder::new()
            .option_layer(HeadersLayer::new(resp_edits, Side::Response))
            .option_layer(HeadersLayer::new(req_edits, Side::Request))
            .service(echo());
        let req = http::Request::builder()
            .header("x-env", "prod")
            .header("x-multi", "a")
            .header("x-debug", "1")
            .header("x-secret", "s")
            .body(crate::http::ReqBody::empty())
            .expect("request");
        let Ok(resp) = svc.oneshot(req).await else {
            panic!("a response")
        };
        let h = resp.headers();
        assert_eq!(h["x-env"], "canary");
        let multi: Vec<_> = h.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert!(h.get("x-debug").is_none());
        assert!(h.get("x-secret").is_none(), "removed from the response");
        assert_eq!(h["x-server"], "mesh", "the response's own value replaced");
    }

    #[test]
    fn invalid_names_and_empty_modifiers() {
        assert_eq!(
            Edits::compile(&modifier(&[("bad name", "v")], &[], &[])),
            Err(BadHeader("bad name".into()))
        );
        assert!(Edits::compile(&modifier(&[("x", "line\nbreak")], &[], &[])).is_err());
        let Ok(empty) = Edits::compile(&HeaderModifier::default()) else {
            panic!("valid")
        };
        assert!(HeadersLayer::new(empty, Side::Request).is_none());
    }
}
