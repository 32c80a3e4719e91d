//! Fault injection (policy.strait.io/v1alpha1 `HTTPFault`, referenced by an HTTPRoute rule's
//! ExtensionRef filter), for resilience testing: delay a share of requests, abort a share with
//! a status of the proxy's own. Off unless a route names one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use strait_api::discovery::Fault;
use tower::{Layer, Service};

use super::{Req, Rsp};
use crate::http::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultLayer {
    delay: Duration,
    delay_permille: u32,
    abort: Option<(http::StatusCode, Option<u8>)>,
    abort_permille: u32,
}

/// Why a fault cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadFault {
    #[error("abort httpStatus {0} is not 200-599")]
    Status(u32),
    #[error("abort grpcStatus {0} is not 1-16")]
    GrpcStatus(u32),
}

impl FaultLayer {
    /// `Ok(None)` for a fault that never fires.
    pub fn compile(f: &Fault) -> Result<Option<Self>, BadFault> {
        let abort = if f.abort_permille > 0 {
            let status = u16::try_from(f.abort_status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .ok_or(BadFault::Status(f.abort_status))?;
            let grpc = match f.abort_grpc_status {
                0 => None,
                code @ 1..=16 => Some(code as u8),
                code => return Err(BadFault::GrpcStatus(code)),
            };
            Some((status, grpc))
        } else {
            None
        };
        let layer = Self {
            delay: Duration::from_millis(f.delay_ms.min(3_600_000)),
            delay_permille: f.delay_permille.min(1000),
            abort,
            abort_permille: f.abort_permille.min(1000),
        };
        let fires = (layer.delay_permille > 0 && !layer.delay.is_zero()) || layer.abort.is_some();
        Ok(fires.then_some(layer))
    }
}

fn hit(permille: u32) -> bool {
    permille >= 1000 || (permille > 0 && fastrand::u32(0..1000) < permille)
}

impl<S> Layer<S> for FaultLayer {
    type Service = Faulty<S>;
    fn layer(&self, inner: S) -> Faulty<S> {
        Faulty {
            inner,
            fault: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Faulty<S> {
    inner: S,
    fault: FaultLayer,
}

impl<S> Service<Req> for Faulty<S>
where
    S: Service<Req, Response = Rsp, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Rsp;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Rsp, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let f = self.fault;
        let delay = hit(f.delay_permille).then_some(f.delay);
        let abort = f.abort.filter(|_| hit(f.abort_permille));
        // The ready service answers this request; a fresh clone waits for the next.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if let Some((status, grpc)) = abort {
                return Err(ProxyError::Fault { status, grpc });
            }
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn ok() -> impl Service<Req, Response = Rsp, Error = ProxyError, Future = impl Send> + Clone {
        tower::service_fn(|_r: Req| async {
            Ok::<_, ProxyError>(http::Response::new(super::super::empty_body()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn shares_of_requests_are_delayed_and_aborted() {
        let Ok(Some(layer)) = FaultLayer::compile(&Fault {
            delay_ms: 100,
            delay_permille: 500,
            abort_status: 503,
            abort_permille: 200,
            ..Default::default()
        }) else {
            panic!("a fault")
        };
        let svc = layer.layer(ok());
        let (mut aborted, mut delayed) = (0, 0);
        for _ in 0..2000 {
            let started = tokio::time::Instant::now();
            let r = svc
                .clone()
                .oneshot(http::Request::new(crate::http::ReqBody::empty()))
                .await;
            if let Err(ProxyError::Fault { status, .. }) = &r {
                assert_eq!(status.as_u16(), 503);
                aborted += 1;
            }
            if started.elapsed() >= Duration::from_millis(100) {
                delayed += 1;
            }
        }
        assert!((320..480).contains(&aborted), "20% aborted: {aborted}");
        assert!((900..1100).contains(&delayed), "50% delayed: {delayed}");
    }

    #[test]
    fn faults_that_never_fire_or_cannot_be_answered() {
        assert_eq!(FaultLayer::compile(&Fault::default()), Ok(None));
        let bad = Fault {
            abort_status: 99,
            abort_permille: 10,
            ..Default::default()
        };
        assert_eq!(FaultLayer::compile(&bad), Err(BadFault::Status(99)));
        let bad_grpc = Fault {
            abort_status: 503,
            abort_grpc_status: 17,
            abort_permille: 10,
            ..Default::default()
        };
        assert_eq!(
            FaultLayer::compile(&bad_grpc),
            Err(BadFault::GrpcStatus(17))
        );
    }
}
