//! RequestMirror: a copy of the request goes to another backend, fire-and-forget. Its response
//! is discarded; it never delays, changes or fails the original (its body is teed, frame by
//! frame, and cut when the mirror falls more than 1 MiB behind, or the proxy's mirrors hold
//! 16 MiB). Mirrors in flight are bounded per proxy ([`MAX_IN_FLIGHT`]); past the bound a
//! request is not mirrored. Counted in `strait_http_mirror_total`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use super::{Req, RouteService};
use crate::http::body::MirrorBuffer;
use crate::metrics::{Label, Metrics};

/// Mirrored requests in flight per proxy, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// A mirrored request's response headers must come within this; else it counts as failed.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// One mirror target, compiled.
#[derive(Debug, Clone)]
pub struct Target {
    /// The mirror backend's stack (its balancer).
    pub to: RouteService,
    pub backend: Label,
    /// Share mirrored: numerator / denominator.
    pub numerator: u32,
    pub denominator: u32,
}

/// Where mirrors count and what bounds them: one per proxy.
#[derive(Debug)]
pub struct Mirrors {
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<Semaphore>,
    /// Body bytes held for mirrors that have not read them yet.
    pub buffer: Arc<MirrorBuffer>,
}

impl Mirrors {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            buffer: Arc::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MirrorLayer {
    targets: Arc<[Target]>,
    mirrors: Arc<Mirrors>,
}

impl MirrorLayer {
    pub fn new(targets: Vec<Target>, mirrors: &Arc<Mirrors>) -> Option<Self> {
        (!targets.is_empty()).then(|| Self {
            targets: targets.into(),
            mirrors: mirrors.clone(),
        })
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;
    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Mirror<S> {
    inner: S,
    layer: MirrorLayer,
}

fn sampled(t: &Target) -> bool {
    let (n, d) = match (t.numerator, t.denominator) {
        (0, 0) => return true,
        (n, 0) => (n, 100),
        (n, d) => (n, d),
    };
    n >= d || fastrand::u32(0..d) < n
}

impl MirrorLayer {
    fn mirror(&self, req: &mut Req) {
        for t in self.targets.iter().filter(|t| sampled(t)) {
            let metrics = self.mirrors.metrics.clone();
            let Ok(permit) = self.mirrors.in_flight.clone().try_acquire_owned() else {
                metrics.mirror(&t.backend, "skipped");
                continue;
            };
            let Some(body) = req.body_mut().mirror(&self.mirrors.buffer) else {
                metrics.mirror(&t.backend, "skipped");
                continue;
            };
            let mut copy = http::Request::new(body);
            *copy.method_mut() = req.method().clone();
            *copy.uri_mut() = req.uri().clone();
            *copy.version_mut() = req.version();
            *copy.headers_mut() = req.headers().clone();
            let (to, backend) = (t.to.clone(), t.backend.clone());
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, to.oneshot(copy)).await {
                    Ok(Ok(resp)) => {
                        drop(resp);
                        "sent"
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%e, backend = backend.as_str(), "mirrored request failed");
                        "failed"
                    }
                    Err(_) => "failed",
                };
                metrics.mirror(&backend, outcome);
                drop(permit);
            });
        }
    }
}

impl<S: Service<Req>> Service<Req> for Mirror<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        self.layer.mirror(&mut req);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ProxyError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backend that counts what it received, and answers after `delay`.
    fn backend(seen: Arc<AtomicUsize>, delay: Duration, fail: bool) -> RouteService {
        RouteService::new(tower::service_fn(move |req: Req| {
            let seen = seen.clone();
            async move {
                use http_body_util::BodyExt;
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| ProxyError::RequestBody(e.to_string()))?;
                seen.fetch_add(body.to_bytes().len().max(1), Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                if fail {
                    return Err(ProxyError::NoEndpoints("mirror".into()));
                }
                Ok(http::Response::new(super::super::empty_body()))
            }
        }))
    }

    fn req(body: &'static str) -> Req {
        http::Request::builder()
            .method("POST")
            .uri("/orders")
            .body(crate::http::ReqBody::Full(http_body_util::Full::new(
                bytes::Bytes::from_static(body.as_bytes()),
            )))
            .expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn the_mirror_gets_a_copy_and_the_original_does_not_wait_for_it() {
        let metrics = Arc::new(Metrics::new());
        let mirrors = Arc::new(Mirrors::new(metrics.clone()));
        let (original, mirrored) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let target = |seen: &Arc<AtomicUsize>, fail| Target {
            to: backend(seen.clone(), Duration::from_secs(5), fail),
            backend: Label::new("mirror.shop:80"),
            numerator: 0,
            denominator: 0,
        };
        let Some(layer) = MirrorLayer::new(
            vec![target(&mirrored, false), target(&mirrored, true)],
            &mirrors,
        ) else {
            panic!("a layer")
        };
        let svc = layer.layer(backend(original.clone(), Duration::ZERO, false));
        let started = tokio::time::Instant::now();
        let r = svc.oneshot(req("hello")).await;
        assert!(r.is_ok(), "the original answered");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "not delayed by the 5 s mirrors"
        );
        assert_eq!(original.load(Ordering::SeqCst), 5);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            mirrored.load(Ordering::SeqCst),
            10,
            "both mirrors got the body"
        );
        let text = metrics.encode();
        assert!(
            text.contains(r#"strait_http_mirror_total{backend="mirror.shop:80",outcome="sent"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"strait_http_mirror_total{backend="mirror.shop:80",outcome="failed"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn fractions_sample_their_share() {
        let t = |numerator, denominator| Target {
            to: RouteService::new(tower::service_fn(|_r: Req| async {
                Ok::<_, ProxyError>(http::Response::new(super::super::empty_body()))
            })),
            backend: Label::empty(),
            numerator,
            denominator,
        };
        let share = |t: &Target| (0..10_000).filter(|_| sampled(t)).count();
        assert_eq!(share(&t(0, 0)), 10_000, "no fraction: everything");
        assert_eq!(share(&t(0, 100)), 0);
        let quarter = share(&t(25, 100));
        assert!((2_200..2_800).contains(&quarter), "{quarter}");
        let tenth = share(&t(10, 0));
        assert!((800..1_200).contains(&tenth), "percent 10: {tenth}");
    }
}
