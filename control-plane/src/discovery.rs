//! The discovery gRPC service: one stream per destination, a full answer first and a whole
//! replacement on every change of that answer.
//!
//! Streams do not compute their answers: each watched answer is computed and encoded once per
//! index version by [`fanout`](crate::fanout), and a stream is woken only when its own
//! answer changed.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt as _;
use strait_api::discovery::{
    DestinationUpdate, InboundPolicy, InboundRequest, TrustAnchors, TrustAnchorsRequest,
    WatchRequest,
};
use strait_api::encoded::Encoded;
use strait_api::shared::Discovery;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status};

use crate::admin::Metrics;
use crate::control_tls::Caller;
use crate::fanout::Fanout;
use crate::index::{normalize_target, MeshIndex};
use strait_identity::SpiffeId;

/// A watched destination: the normalized target and the client's namespace (consumer routes).
type DestinationKey = (String, Option<String>);
/// A watched inbound policy: the workload's namespace and service account.
type InboundKey = (String, String);

type Answers<M> = Pin<Box<dyn futures_util::Stream<Item = Result<Encoded<M>, Status>> + Send>>;

/// Serves [`Discovery`] from the latest [`MeshIndex`].
#[derive(Clone)]
pub struct DiscoveryService {
    index: watch::Receiver<Arc<MeshIndex>>,
    destinations: Arc<Fanout<DestinationKey, DestinationUpdate>>,
    inbound: Arc<Fanout<InboundKey, InboundPolicy>>,
    metrics: Arc<Metrics>,
    /// Open watches by caller address.
    watches: Arc<crate::limits::WatchLimit>,
    /// Turns true on shutdown: every stream ends, so proxies reconnect to another replica and
    /// the server's graceful shutdown is not held open by streams that never end.
    stopping: watch::Receiver<bool>,
    /// Set when discovery is served over mTLS: callers must be mesh identities of this trust
    /// domain, and may watch only their own inbound policy.
    trust_domain: Option<String>,
    /// The trust-anchor bundle (PEM) proxies follow, when identity is on.
    anchors: Option<watch::Receiver<String>>,
}

impl DiscoveryService {
    /// Serves `index`; spawns the task that fans each new index out to the streams (so it must
    /// be called inside a Tokio runtime).
    pub fn new(
        index: watch::Receiver<Arc<MeshIndex>>,
        metrics: Arc<Metrics>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let destinations = Arc::new(Fanout::default());
        let inbound = Arc::new(Fanout::default());
        tokio::spawn(fan_out(
            index.clone(),
            destinations.clone(),
            inbound.clone(),
            stopping.clone(),
        ));
        Self {
            index,
            destinations,
            inbound,
            metrics,
            stopping,
            watches: crate::limits::WatchLimit::new(crate::limits::MAX_WATCHES_PER_CALLER),
            trust_domain: None,
            anchors: None,
        }
    }

    /// The same service, streaming `anchors` (PEM) to proxies that watch them.
    pub fn with_trust_anchors(mut self, anchors: watch::Receiver<String>) -> Self {
        self.anchors = Some(anchors);
        self
    }

    /// The same service, authorizing every call by its caller's SPIFFE ID (served over mTLS).
    pub fn requiring_identity(mut self, trust_domain: &str) -> Self {
        self.trust_domain = Some(trust_domain.to_string());
        self
    }

    /// The caller's identity, when identities are required: a mesh identity of the trust
    /// domain, else the call is refused.
    fn authenticate(&self, caller: &Caller) -> Result<Option<SpiffeId>, Status> {
        let Some(trust_domain) = &self.trust_domain else {
            return Ok(None);
        };
        match &caller.id {
            Some(id) if id.trust_domain() == trust_domain => Ok(Some(id.clone())),
            Some(_) => Err(Status::permission_denied(
                "discovery is served to the mesh's own trust domain only",
            )),
            None => Err(Status::unauthenticated(
                "discovery needs a mesh identity: connect over mTLS with the workload certificate",
            )),
        }
    }

    /// The same service with another cap on watches per caller.
    pub fn with_watch_limit(mut self, max: usize) -> Self {
        self.watches = crate::limits::WatchLimit::new(max);
        self
    }
}

/// Sends every new index to the streams whose answers it changed.
async fn fan_out(
    mut index: watch::Receiver<Arc<MeshIndex>>,
    destinations: Arc<Fanout<DestinationKey, DestinationUpdate>>,
    inbound: Arc<Fanout<InboundKey, InboundPolicy>>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = index.changed() => if changed.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
        }
        let current = index.borrow_and_update().clone();
        let span = tracing::info_span!(
            "discovery fan-out",
            destinations = tracing::field::Empty,
            changed = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        let _entered = span.enter();
        let d = destinations.update(|(target, ns)| current.lookup(target, ns.as_deref()));
        let i = inbound.update(|(ns, sa)| current.inbound(ns, sa));
        span.record("destinations", d.answers + i.answers);
        span.record("changed", d.changed + i.changed);
        span.record("bytes", d.encoded_bytes + i.encoded_bytes);
        tracing::debug!(
            watched = d.answers + i.answers,
            changed = d.changed + i.changed,
            encoded_bytes = d.encoded_bytes + i.encoded_bytes,
            "answers fanned out"
        );
    }
}

/// A stream of `rx`'s answers (the current one first) that holds `held` (the caller's watch
/// slot and stream metrics) while it lives, ends on shutdown, and counts and traces each push.
fn answers<M: Send + Sync + 'static, H: Send + 'static>(
    rx: watch::Receiver<Encoded<M>>,
    held: H,
    mut stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    push_span: impl Fn() -> tracing::Span + Send + 'static,
    kind: &'static str,
) -> Answers<M> {
    let stream = WatchStream::new(rx)
        .map(move |answer| {
            let _held = &held;
            let _push = push_span().entered();
            metrics.pushed(kind);
            Ok(answer)
        })
        .take_until(async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
    Box::pin(stream)
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = Answers<DestinationUpdate>;
    type WatchInboundStream = Answers<InboundPolicy>;
    type WatchTrustAnchorsStream = ReceiverStream<Result<TrustAnchors, Status>>;

    async fn watch_trust_anchors(
        &self,
        request: Request<TrustAnchorsRequest>,
    ) -> Result<Response<Self::WatchTrustAnchorsStream>, Status> {
        let caller = Caller::of(&request);
        if self.authenticate(&caller)?.is_none() {
            return Err(Status::failed_precondition(
                "this control plane has no identity API: there are no trust anchors to follow",
            ));
        }
        let Some(mut anchors) = self.anchors.clone() else {
            return Err(Status::failed_precondition("no trust anchors configured"));
        };
        let slot = self.watches.acquire(caller.addr.map(|a| a.ip()))?;
        let mut stopping = self.stopping.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _slot = slot;
            loop {
                let pem = anchors.borrow_and_update().clone();
                if tx.send(Ok(TrustAnchors { pem })).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = anchors.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch_inbound(
        &self,
        request: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status> {
        let caller = Caller::of(&request);
        let authenticated = self.authenticate(&caller)?;
        let slot = self.watches.acquire(caller.addr.map(|a| a.ip()))?;
        let InboundRequest { identity, proxy } = request.into_inner();
        let id: SpiffeId = identity
            .parse()
            .map_err(|e: strait_identity::SpiffeIdError| Status::invalid_argument(e.to_string()))?;
        if authenticated.as_ref().is_some_and(|caller| *caller != id) {
            tracing::info!(caller = %authenticated.as_ref().map(ToString::to_string).unwrap_or_default(), asked = %id, "refused a watch of another workload's inbound policy");
            return Err(Status::permission_denied(
                "a proxy may watch only its own inbound policy",
            ));
        }
        tracing::debug!(%id, %proxy, "watch inbound");
        let guard = self.metrics.stream_opened("inbound", &proxy);
        let key = (id.namespace().to_string(), id.service_account().to_string());
        let index = &self.index;
        let rx = self.inbound.subscribe(key, || {
            index.borrow().inbound(id.namespace(), id.service_account())
        });
        let identity = id.to_string();
        Ok(Response::new(answers(
            rx,
            (guard, slot),
            self.stopping.clone(),
            self.metrics.clone(),
            move || tracing::info_span!("discovery push", kind = "inbound", %proxy, identity = %identity),
            "inbound",
        )))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&request);
        let authenticated = self.authenticate(&caller)?;
        let slot = self.watches.acquire(caller.addr.map(|a| a.ip()))?;
        let WatchRequest { target, proxy } = request.into_inner();
        // The client's namespace picks its consumer routes (GAMMA): its certificate's over
        // mTLS, else what the proxy says of itself (`<namespace>/<pod>`).
        let client_ns: Option<String> = match &authenticated {
            Some(id) => Some(id.namespace().to_string()),
            None => proxy
                .split_once('/')
                .map(|(ns, _)| ns.to_string())
                .filter(|ns| !ns.is_empty()),
        };
        let Some(key) = normalize_target(&target) else {
            return Err(Status::invalid_argument(format!(
                "target {target:?} is not ip:port or host:port"
            )));
        };
        tracing::debug!(%target, %proxy, "watch");
        let guard = self.metrics.stream_opened("destination", &proxy);
        let index = &self.index;
        let rx = self
            .destinations
            .subscribe((key.clone(), client_ns.clone()), || {
                index.borrow().lookup(&key, client_ns.as_deref())
            });
        Ok(Response::new(answers(
            rx,
            (guard, slot),
            self.stopping.clone(),
            self.metrics.clone(),
            move || tracing::info_span!("discovery push", kind = "destination", %proxy, destination = %target),
            "destination",
        )))
    }
}
