//! Retry layer: tower's `Retry` with the route's policy and the destination's budget. Safe
//! requests (an idempotent method, or gRPC) may be retried: their body streams to the first
//! attempt as it comes and is kept, up to 64 KiB, for the next ones
//! ([`crate::http::replay`]); a body past that is not retried. Any other request passes
//! through and is tried once. The policy itself (what is worth a retry, the budget) is in
//! [`crate::retry`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http_body::Body as _;
use tower::{Layer, Service, ServiceExt};

use super::{Req, Rsp};
use crate::http::error::ProxyError;
use crate::http::headers::{is_grpc, is_upgrade};
use crate::http::replay::Replay;
use crate::http::ReqBody;
use crate::metrics::HttpMetrics;
use crate::retry::{is_idempotent, should_retry, RetryBudget, RetryPolicy, MAX_REPLAY_BODY};

#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    budget: Arc<RetryBudget>,
    metrics: Arc<HttpMetrics>,
}

impl RetryLayer {
    pub fn new(policy: RetryPolicy, budget: &Arc<RetryBudget>, metrics: &Arc<HttpMetrics>) -> Self {
        Self {
            policy: Arc::new(policy),
            budget: budget.clone(),
            metrics: metrics.clone(),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retrying<S>;
    fn layer(&self, inner: S) -> Retrying<S> {
        Retrying {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retrying<S> {
    inner: S,
    layer: RetryLayer,
}

/// One request's retry state: tower's `Retry` keeps a clone of it per request.
#[derive(Debug, Clone)]
pub struct Policy {
    layer: RetryLayer,
    grpc: bool,
    attempts: u32,
}

impl tower::retry::Policy<Req, Rsp, ProxyError> for Policy {
    type Future = Either<std::future::Ready<()>, tokio::time::Sleep>;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<Rsp, ProxyError>,
    ) -> Option<Self::Future> {
        let policy = &self.layer.policy;
        if self.attempts >= policy.attempts || !should_retry(result, policy, self.grpc) {
            return None;
        }
        if !self.layer.budget.withdraw() {
            self.layer.metrics.retries_exhausted.inc();
            return None;
        }
        self.layer.metrics.retries.inc();
        self.attempts += 1;
        if policy.backoff.is_zero() {
            return Some(Either::Left(std::future::ready(())));
        }
        // Jittered: half to all of the backoff.
        let backoff = policy.backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        Some(Either::Right(tokio::time::sleep(backoff)))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let body = match req.body() {
            ReqBody::Full(body) => ReqBody::Full(body.clone()),
            ReqBody::Replay(body) => ReqBody::Replay(body.again()?),
            _ => return None,
        };
        let mut copy = http::Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}

impl<S> Service<Req> for Retrying<S>
where
    S: Service<Req, Response = Rsp, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Rsp;
    type Error = ProxyError;
    type Future = Either<S::Future, tower::util::Oneshot<tower::retry::Retry<Policy, S>, Req>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let grpc = is_grpc(&req);
        // A gRPC request is retried whatever its method: the route names the gRPC statuses
        // safe to retry (UNAVAILABLE by default: the server did not process it).
        let safe = grpc || is_idempotent(req.method());
        let too_large = req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n > MAX_REPLAY_BODY);
        if is_upgrade(&req) || !safe || too_large {
            return Either::Left(self.inner.call(req));
        }
        // The body streams to the first attempt as it comes, kept for the others.
        let (parts, body) = req.into_parts();
        let body = match body {
            ReqBody::Stream(b) if b.is_end_stream() => ReqBody::empty(),
            ReqBody::Stream(b) => ReqBody::Replay(Replay::new(b, MAX_REPLAY_BODY as usize)),
            other => other,
        };
        let policy = Policy {
            layer: self.layer.clone(),
            grpc,
            attempts: 0,
        };
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        Either::Right(
            tower::retry::Retry::new(policy, inner).oneshot(http::Request::from_parts(parts, body)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// Fails the first `failures` requests with 503, then answers 200; counts calls.
    fn flaky(failures: u32, calls: Arc<AtomicU32>) -> super::super::RouteService {
        super::super::RouteService::new(tower::service_fn(move |_r: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut resp = http::Response::new(super::super::empty_body());
                if n < failures {
                    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, ProxyError>(resp)
            }
        }))
    }

    fn layer(attempts: u32) -> RetryLayer {
        let budget = Arc::new(RetryBudget::new(&crate::retry::BudgetSettings {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }));
        let metrics = Arc::new(Arc::new(crate::metrics::Metrics::new()).http(
            crate::metrics::Direction::Outbound,
            "web",
            None,
        ));
        RetryLayer::new(
            RetryPolicy {
                attempts,
                codes: vec![503],
                grpc_codes: vec![14],
                backoff: Duration::ZERO,
            },
            &budget,
            &metrics,
        )
    }

    fn get() -> Req {
        http::Request::builder()
            .uri("/")
            .body(ReqBody::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn safe_requests_are_retried_up_to_the_attempts_and_others_are_not() {
        let calls = Arc::new(AtomicU32::new(0));
        let svc = layer(3).layer(flaky(2, calls.clone()));
        let Ok(resp) = svc.clone().oneshot(get()).await else {
            panic!("a response")
        };
        assert_eq!(resp.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "two retries");

        let calls = Arc::new(AtomicU32::new(0));
        let svc = layer(1).layer(flaky(5, calls.clone()));
        let Ok(resp) = svc.oneshot(get()).await else {
            panic!("a response")
        };
        assert_eq!(resp.status(), 503, "attempts spent");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let calls = Arc::new(AtomicU32::new(0));
        let svc = layer(3).layer(flaky(5, calls.clone()));
        let post = http::Request::builder()
            .method("POST")
            .body(ReqBody::empty())
            .expect("request");
        let Ok(resp) = svc.oneshot(post).await else {
            panic!("a response")
        };
        assert_eq!(resp.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "POST is never retried");
    }
}
