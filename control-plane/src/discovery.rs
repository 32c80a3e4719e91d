//! The discovery gRPC service: one stream per destination, a full answer first and a whole
//! replacement on every change of that answer.

use std::sync::Arc;

use strait_api::discovery::discovery_server::Discovery;
use strait_api::discovery::{DestinationUpdate, InboundPolicy, InboundRequest, WatchRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::admin::Metrics;
use crate::index::{normalize_target, MeshIndex};

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

    async fn watch_inbound(
        &self,
        request: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status> {
        let slot = self
            .watches
            .acquire(request.remote_addr().map(|a| a.ip()))?;
        let InboundRequest { identity, proxy } = request.into_inner();
        let id: strait_identity::SpiffeId = identity
            .parse()
            .map_err(|e: strait_identity::SpiffeIdError| Status::invalid_argument(e.to_string()))?;
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
                    if tx.send(Ok((*answer).clone())).await.is_err() {
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
        let slot = self
            .watches
            .acquire(request.remote_addr().map(|a| a.ip()))?;
        let WatchRequest { target, proxy } = request.into_inner();
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
                let answer = index.borrow_and_update().lookup(&target);
                if last.as_ref() != Some(&answer) {
                    if tx.send(Ok((*answer).clone())).await.is_err() {
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
