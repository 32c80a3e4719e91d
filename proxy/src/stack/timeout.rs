//! Timeout layer: bounds the time to the response headers. The route's `timeouts.request`
//! (around every attempt together) honours the client's `grpc-timeout` too, the shortest bound
//! winning; `timeouts.backendRequest` bounds each attempt.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tower::{Layer, Service};

use super::Req;
use crate::http::error::ProxyError;
use crate::router::grpc_timeout;

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Option<Duration>,
    /// Whether the request's `grpc-timeout` bounds it too.
    grpc: bool,
}

impl TimeoutLayer {
    /// The whole request: `after` and the client's `grpc-timeout`, whichever is shorter.
    pub fn request(after: Option<Duration>) -> Self {
        Self { after, grpc: true }
    }

    /// One attempt.
    pub fn attempt(after: Option<Duration>) -> Option<Self> {
        after.map(|after| Self {
            after: Some(after),
            grpc: false,
        })
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            settings: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    settings: TimeoutLayer,
}

impl<S, R> Service<Req> for Timeout<S>
where
    S: Service<Req, Response = R, Error = ProxyError>,
{
    type Response = R;
    type Error = ProxyError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let client = if self.settings.grpc {
            grpc_timeout(&req)
        } else {
            None
        };
        let after = [self.settings.after, client].into_iter().flatten().min();
        TimeoutFuture {
            inner: self.inner.call(req),
            sleep: after.map(tokio::time::sleep),
            after: after.unwrap_or_default(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        after: Duration,
    }
}

impl<F, R> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<R, ProxyError>>,
{
    type Output = Result<R, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => match sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(ProxyError::Timeout { after: *this.after })),
                Poll::Pending => Poll::Pending,
            },
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn slow(
        delay: Duration,
    ) -> impl Service<Req, Response = (), Error = ProxyError, Future = impl Send> + Clone {
        tower::service_fn(move |_req: Req| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, ProxyError>(())
        })
    }

    fn req(grpc_timeout: Option<&'static str>) -> Req {
        let mut b = http::Request::builder();
        if let Some(t) = grpc_timeout {
            b = b
                .header("content-type", "application/grpc")
                .header("grpc-timeout", t);
        }
        b.body(crate::http::ReqBody::empty()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn the_shortest_bound_wins_and_answers_a_timeout() {
        let svc = TimeoutLayer::request(Some(Duration::from_secs(5)))
            .layer(slow(Duration::from_secs(10)));
        let started = tokio::time::Instant::now();
        let r = svc.clone().oneshot(req(None)).await;
        assert!(matches!(r, Err(ProxyError::Timeout { after }) if after == Duration::from_secs(5)));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // The client's grpc-timeout of 1 s is shorter.
        let r = svc.oneshot(req(Some("1S"))).await;
        assert!(matches!(r, Err(ProxyError::Timeout { after }) if after == Duration::from_secs(1)));
        // Per attempt, grpc-timeout is not this layer's business; fast enough passes.
        let Some(attempt) = TimeoutLayer::attempt(Some(Duration::from_secs(2))) else {
            panic!("a layer")
        };
        let ok = attempt
            .layer(slow(Duration::from_secs(1)))
            .oneshot(req(Some("1m")))
            .await;
        assert!(ok.is_ok());
        assert!(TimeoutLayer::attempt(None).is_none());
    }
}
