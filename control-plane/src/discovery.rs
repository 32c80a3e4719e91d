//! The discovery gRPC service: one stream per destination, a full answer first and a whole
//! replacement on every change of that answer.

use std::sync::Arc;
use tracing::Instrument as _;

use strait_api::discovery::discovery_server::Discovery;
use strait_api::discovery::{
    DestinationUpdate, InboundPolicy, InboundRequest, TrustAnchors, TrustAnchorsRequest,
    WatchRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::admin::Metrics;
use crate::control_tls::Caller;
use crate::index::{normalize_target, MeshIndex};
use strait_identity::SpiffeId;

/// Serves [`Discovery`] from the latest [`MeshIndex`].
#[derive(Clone)]
pub struct DiscoveryService {
    index: watch::Receiver<Arc<MeshIndex>>,
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
    pub fn new(
        index: watch::Receiver<Arc<MeshIndex>>,
        metrics: Arc<Metrics>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            index,
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

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<DestinationUpdate, Status>>;
    type WatchInboundStream = ReceiverStream<Result<InboundPolicy, Status>>;
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
        let (tx, rx) = mpsc::channel(2);
        let mut index = self.index.clone();
        let mut stopping = self.stopping.clone();
        let metrics = self.metrics.clone();
        let guard = metrics.stream_opened("inbound", &proxy);
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            let mut last: Option<Arc<InboundPolicy>> = None;
            loop {
                let answer = index
                    .borrow_and_update()
                    .inbound(id.namespace(), id.service_account());
                if last.as_ref() != Some(&answer) {
                    let push = tracing::info_span!("discovery push", kind = "inbound", %proxy, identity = %id);
                    let sent = tx.send(Ok((*answer).clone())).instrument(push).await;
                    if sent.is_err() {
                        return;
                    }
                    metrics.pushed("inbound");
                    last = Some(answer);
                }
                tokio::select! {
                    changed = index.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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
        if normalize_target(&target).is_none() {
            return Err(Status::invalid_argument(format!(
                "target {target:?} is not ip:port or host:port"
            )));
        }
        tracing::debug!(%target, %proxy, "watch");
        let (tx, rx) = mpsc::channel(2);
        let mut index = self.index.clone();
        let mut stopping = self.stopping.clone();
        let metrics = self.metrics.clone();
        let guard = metrics.stream_opened("destination", &proxy);
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            let mut last: Option<Arc<DestinationUpdate>> = None;
            loop {
                let answer = index
                    .borrow_and_update()
                    .lookup(&target, client_ns.as_deref());
                // The index shares unchanged answers: the same Arc needs no comparison.
                let unchanged = last
                    .as_ref()
                    .is_some_and(|l| Arc::ptr_eq(l, &answer) || **l == *answer);
                if !unchanged {
                    let push = tracing::info_span!("discovery push", kind = "destination", %proxy, destination = %target);
                    let sent = tx.send(Ok((*answer).clone())).instrument(push).await;
                    if sent.is_err() {
                        return; // the proxy went away
                    }
                    metrics.pushed("destination");
                    last = Some(answer);
                }
                tokio::select! {
                    changed = index.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
