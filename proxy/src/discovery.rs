//! The proxy's discovery client: one watch stream per destination, shared by every connection to
//! it, feeding that destination's [`Balancer`].
//!
//! When the control plane goes away the last answer keeps being served and the stream is
//! reopened with jittered exponential backoff. A destination never answered within
//! `first_answer_timeout` is passed through to its original address (a safe fallback: the
//! platform's own networking still works without the mesh).
//!
//! A connection keeps its destination's [`Resolution`] for its whole life, and HTTP requests
//! read its current state one by one ([`Resolution::state_for_request`]): a keep-alive
//! connection accepted while the destination was unknown, or outside the mesh, is routed
//! through the mesh as soon as discovery says so (and the reverse). Opaque TCP is decided
//! once, when the connection is accepted: bytes already spliced cannot change path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_api::discovery::destination_update::Update;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{DestinationUpdate, ProtocolHint, WatchRequest};
use strait_identity::SpiffeId;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

use crate::balance::{Balancer, EndpointSpec};
use crate::metrics::{Direction, HttpMetrics, Metrics};
use crate::router::Router;
use crate::stack::backends::SharedBalancers;
use arc_swap::ArcSwap;

/// The discovery state of one destination.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// No answer yet.
    Pending,
    NotInMesh,
    Mesh {
        service: Arc<str>,
        hint: ProtocolHint,
        /// The request metrics of this service (outbound), shared by every connection to it.
        metrics: Arc<HttpMetrics>,
    },
}

impl Resolved {
    pub fn is_pending(&self) -> bool {
        matches!(self, Resolved::Pending)
    }
}

/// The largest discovery answer accepted.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// One destination's live resolution. Connections hold it while they use its balancer.
#[derive(Debug)]
pub struct Resolution {
    /// Waited on while the first answer is pending; its sender's task ends when every
    /// `Resolution` is gone.
    state: watch::Receiver<Resolved>,
    /// The same state, read without a lock by every request.
    current: Arc<ArcSwap<Resolved>>,
    target: SocketAddr,
    /// Whether a request has already been passed through for want of an answer (logged once).
    warned_pending: AtomicBool,
    pub balancer: Arc<Balancer>,
    /// HTTP routes (HTTPRoute, TrafficSplit); empty: everything goes to `balancer`.
    pub router: Arc<ArcSwap<Router>>,
    /// Caps the retries of requests to this destination.
    pub retry_budget: Arc<crate::retry::RetryBudget>,
    last_used: AtomicU64,
}

impl Resolution {
    /// The state now (lock-free).
    pub fn current(&self) -> Arc<Resolved> {
        self.current.load_full()
    }

    /// The state once known, or `Pending` after `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Arc<Resolved> {
        let now = self.current();
        if !now.is_pending() {
            return now;
        }
        let mut rx = self.state.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| !s.is_pending())).await;
        self.current()
    }

    /// The state a request goes by: the current one, or (while the first answer is pending)
    /// the answer once it comes, waited for up to `timeout`. Still pending then: logged once
    /// per destination; the caller passes the request through.
    pub async fn state_for_request(&self, timeout: Duration) -> Arc<Resolved> {
        let state = self.ready(timeout).await;
        if state.is_pending() && !self.warned_pending.swap(true, Ordering::Relaxed) {
            tracing::warn!(target = %self.target, ?timeout, "no discovery answer in time; passing through");
        }
        state
    }
}

#[derive(Debug, thiserror::Error)]
#[error("--control-plane-addr / STRAIT_CONTROL_PLANE_ADDR {addr:?} cannot be used: {source}")]
pub struct AddrError {
    addr: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

#[derive(Debug)]
pub struct Discovery {
    client: DiscoveryClient<Channel>,
    cache: Mutex<Cache>,
    workload: String,
    first_answer_timeout: Duration,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    identity: Option<Arc<crate::identity::Identity>>,
    retry_budget: crate::retry::BudgetSettings,
    eject_after: u32,
    egress: Arc<crate::stack::Egress>,
    /// Route backends' balancers, one per service for every destination.
    backends: Arc<SharedBalancers>,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<SocketAddr, Arc<Resolution>>,
    swept: Option<Instant>,
}

/// The control plane's SPIFFE ID in `proxy`'s trust domain (what `strait install` and local
/// mode give it).
pub fn control_plane_id(proxy: &SpiffeId) -> SpiffeId {
    SpiffeId::new(
        proxy.trust_domain(),
        "strait-system",
        "strait-control-plane",
    )
    .unwrap_or_else(|_| proxy.clone())
}

/// The control channel over mTLS: the proxy presents its workload certificate (waiting for
/// the first one) and accepts only a control plane whose certificate chains to the anchors
/// and carries `expected`. Each new connection uses the current certificate; a renewal does
/// not touch open streams.
fn mtls_channel(
    endpoint: GrpcEndpoint,
    addr: &str,
    identity: Arc<crate::identity::Identity>,
    expected: SpiffeId,
    server_name: &str,
) -> Result<Channel, ControlTlsError> {
    let config = strait_identity::tls::client_config(
        identity.anchors.clone(),
        identity.creds.clone(),
        expected,
        Some(strait_identity::tls::ALPN_H2),
    )
    .map_err(|e| ControlTlsError(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| {
        ControlTlsError(format!(
            "--identity-server-name {server_name:?} is not a DNS name: {e}"
        ))
    })?;
    let host = addr
        .split_once("://")
        .map_or(addr, |(_, rest)| rest)
        .to_string();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let (connector, name, host, identity) = (
                connector.clone(),
                name.clone(),
                host.clone(),
                identity.clone(),
            );
            async move {
                // No certificate, no proof: wait for the first one (the proxy is not ready
                // before it either).
                while !identity.creds.is_ready() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let tcp = tokio::net::TcpStream::connect(&host).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

/// Why the control channel's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ControlTlsError(String);

/// Resolutions unused this long, and held by no connection, are dropped (their streams end).
const IDLE_EVICTION: Duration = Duration::from_secs(600);

impl Discovery {
    /// A client of the discovery server at `addr`, with the proxy's settings.
    pub fn new(
        addr: &str,
        cfg: &crate::config::ProxyConfig,
        metrics: Arc<Metrics>,
        identity: Option<Arc<crate::identity::Identity>>,
        egress: Arc<crate::stack::Egress>,
    ) -> Result<Self, AddrError> {
        let workload = cfg.workload.clone();
        let first_answer_timeout = cfg.discovery_timeout;
        let connect_timeout = cfg.connect_timeout;
        let retry_budget = cfg.retry_budget();
        let eject_after = cfg.eject_after;
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = GrpcEndpoint::from_shared(uri)
            .map_err(|source| AddrError {
                addr: addr.to_string(),
                source: source.into(),
            })?
            .connect_timeout(connect_timeout.max(Duration::from_millis(500)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = match &identity {
            Some(id) => {
                let expected = cfg
                    .control_plane_identity
                    .clone()
                    .unwrap_or_else(|| control_plane_id(&id.id));
                mtls_channel(
                    endpoint,
                    addr,
                    id.clone(),
                    expected,
                    &cfg.identity_server_name,
                )
                .map_err(|e| AddrError {
                    addr: addr.to_string(),
                    source: e.into(),
                })?
            }
            None => endpoint.connect_lazy(),
        };
        Ok(Self {
            // tonic's default 4 MiB caps a destination near 25,000 endpoints; 64 MiB holds
            // 100,000 with room (about 150 bytes each).
            client: DiscoveryClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES),
            cache: Mutex::new(Cache::default()),
            workload,
            first_answer_timeout,
            connect_timeout,
            metrics,
            identity,
            retry_budget,
            eject_after,
            egress,
            backends: Arc::default(),
        })
    }

    /// A client of the discovery service (shares the connection).
    pub fn client(&self) -> DiscoveryClient<Channel> {
        self.client.clone()
    }

    /// How long a connection or request waits for a destination's first answer.
    pub fn first_answer_timeout(&self) -> Duration {
        self.first_answer_timeout
    }

    /// Looks `target` up, starting its stream on first use: its live resolution (held by the
    /// connection for its whole life) and its state once known, or still `Pending` after the
    /// first-answer timeout.
    pub async fn lookup(&self, target: SocketAddr) -> (Arc<Resolution>, Arc<Resolved>) {
        let resolution = self.resolution(target);
        let state = resolution
            .state_for_request(self.first_answer_timeout)
            .await;
        (resolution, state)
    }

    fn resolution(&self, target: SocketAddr) -> Arc<Resolution> {
        let now = now_secs();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache
            .swept
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            cache.swept = Some(Instant::now());
            cache.entries.retain(|_, r| {
                Arc::strong_count(r) > 1
                    || now - r.last_used.load(Ordering::Relaxed) < IDLE_EVICTION.as_secs()
            });
        }
        if let Some(r) = cache.entries.get(&target) {
            r.last_used.store(now, Ordering::Relaxed);
            return r.clone();
        }
        let (tx, rx) = watch::channel(Resolved::Pending);
        let current = Arc::new(ArcSwap::from_pointee(Resolved::Pending));
        let balancer = Arc::new(
            Balancer::new(self.connect_timeout, self.identity.clone())
                .with_ejection(self.eject_after),
        );
        let router = Arc::new(ArcSwap::from_pointee(Router::default()));
        let retry_budget = Arc::new(crate::retry::RetryBudget::new(&self.retry_budget));
        let resolution = Arc::new(Resolution {
            state: rx,
            current: current.clone(),
            target,
            warned_pending: AtomicBool::new(false),
            balancer: balancer.clone(),
            router: router.clone(),
            retry_budget: retry_budget.clone(),
            last_used: AtomicU64::new(now),
        });
        cache.entries.insert(target, resolution.clone());
        tokio::spawn(watch_destination(
            self.client.clone(),
            WatchRequest {
                target: target.to_string(),
                proxy: self.workload.clone(),
            },
            State { tx, current },
            Targets {
                balancer,
                router,
                backends: HashMap::new(),
                shared: self.backends.clone(),
                connect_timeout: self.connect_timeout,
                identity: self.identity.clone(),
                eject_after: self.eject_after,
                egress: self.egress.clone(),
                budget: retry_budget,
            },
            self.metrics.clone(),
        ));
        resolution
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a destination's stream publishes its state: the watch (for waiters) and the
/// lock-free copy (for requests), always together.
struct State {
    tx: watch::Sender<Resolved>,
    current: Arc<ArcSwap<Resolved>>,
}

impl State {
    fn publish(&self, state: Resolved) {
        self.current.store(Arc::new(state.clone()));
        self.tx.send_replace(state);
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

async fn watch_destination(
    mut client: DiscoveryClient<Channel>,
    request: WatchRequest,
    state: State,
    mut targets: Targets,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::default();
    loop {
        let attempt = async {
            tracing::debug!(target = %request.target, "opening discovery stream");
            let mut stream = client.watch(request.clone()).await?.into_inner();
            tracing::debug!(target = %request.target, "discovery stream open");
            metrics.discovery_connected.inc();
            let _connected = scopeguard(|| {
                metrics.discovery_connected.dec();
            });
            while let Some(update) = stream.message().await? {
                metrics.discovery_updates.inc();
                apply(&request.target, update, &state, &mut targets, &metrics);
                backoff.reset();
            }
            Ok::<_, tonic::Status>(())
        };
        tokio::select! {
            result = attempt => match result {
                Ok(()) => tracing::info!(target = %request.target, "discovery stream ended by the control plane; reopening"),
                Err(status) => tracing::warn!(
                    target = %request.target,
                    code = ?status.code(),
                    message = status.message(),
                    "discovery stream failed; serving the last known state"
                ),
            },
            _ = state.closed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = state.closed() => return,
        }
    }
}

/// What one destination's stream keeps up to date.
struct Targets {
    balancer: Arc<Balancer>,
    router: Arc<ArcSwap<Router>>,
    /// Balancers of this destination's route backends, by service, held until the next update.
    backends: HashMap<Arc<str>, Arc<Balancer>>,
    /// Every destination's route backends (one balancer per service).
    shared: Arc<SharedBalancers>,
    connect_timeout: Duration,
    identity: Option<Arc<crate::identity::Identity>>,
    eject_after: u32,
    egress: Arc<crate::stack::Egress>,
    budget: Arc<crate::retry::RetryBudget>,
}

/// The usable endpoints of a discovery answer (bad addresses and ports are skipped).
pub fn endpoint_specs(endpoints: &[strait_api::discovery::Endpoint]) -> Vec<EndpointSpec> {
    endpoints
        .iter()
        .filter_map(|e| {
            let ip = e.ip.parse().ok()?;
            let port = u16::try_from(e.port).ok()?;
            Some(EndpointSpec {
                addr: SocketAddr::new(ip, port),
                weight: e.weight.clamp(1, 65_535),
                identity: e.identity.as_str().into(),
                meshed: e.meshed,
            })
        })
        .collect()
}

fn apply(
    target: &str,
    update: DestinationUpdate,
    state: &State,
    targets: &mut Targets,
    metrics: &Arc<Metrics>,
) {
    let balancer = &targets.balancer;
    match update.update {
        Some(Update::Destination(d)) => {
            let specs = endpoint_specs(&d.endpoints);
            // The same service keeps its metrics handles; a new one gets its own.
            let http = match &**state.current.load() {
                Resolved::Mesh {
                    service, metrics, ..
                } if **service == *d.service => metrics.clone(),
                _ => Arc::new(metrics.http(Direction::Outbound, &d.service, None)),
            };
            let (timeout, identity, eject_after) = (
                targets.connect_timeout,
                targets.identity.clone(),
                targets.eject_after,
            );
            let mut build = crate::stack::Build {
                egress: &targets.egress,
                budget: &targets.budget,
                metrics: &http,
                own: Some((d.service.as_str(), balancer)),
                shared: &targets.shared,
                used: HashMap::new(),
                new_balancer: &|| {
                    Balancer::new(timeout, identity.clone()).with_ejection(eject_after)
                },
                to_specs: &endpoint_specs,
            };
            let router = Router::compile(&d.routes, d.unmatched_to_service, &mut build);
            targets.backends = build.used;
            targets.router.store(Arc::new(router));
            tracing::debug!(%target, service = %d.service, endpoints = specs.len(), "discovery update");
            balancer.update(specs);
            let hint = ProtocolHint::try_from(d.protocol).unwrap_or(ProtocolHint::Unknown);
            state.publish(Resolved::Mesh {
                service: d.service.into(),
                hint,
                metrics: http,
            });
        }
        Some(Update::NotInMesh(_)) | None => {
            balancer.update(Vec::new());
            state.publish(Resolved::NotInMesh);
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Exponential backoff, 100 ms doubling to 5 s, with full jitter on the upper half.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(100).saturating_mul(1 << self.attempt.min(6));
        let capped = base.min(Duration::from_secs(5));
        self.attempt += 1;
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_budget() -> Arc<crate::retry::RetryBudget> {
        Arc::new(crate::retry::RetryBudget::new(
            &crate::retry::BudgetSettings {
                ratio: 0.2,
                min_per_second: 10,
                window: Duration::from_secs(10),
            },
        ))
    }

    fn test_egress() -> Arc<crate::stack::Egress> {
        Arc::new(crate::stack::Egress {
            clients: crate::http::forward::Clients::new(
                Duration::from_secs(1),
                Duration::from_secs(3),
            ),
            workload: None,
            mirrors: Arc::new(crate::stack::mirror::Mirrors::new(Arc::new(Metrics::new()))),
        })
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(5));
        }
        assert!(b.next_delay() >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn updates_feed_the_balancer_and_state() {
        use strait_api::discovery::{Destination, Endpoint, NotInMesh};
        let (tx, rx) = watch::channel(Resolved::Pending);
        let state = State {
            tx,
            current: Arc::new(ArcSwap::from_pointee(Resolved::Pending)),
        };
        let metrics = Arc::new(Metrics::new());
        let mut targets = Targets {
            balancer: Arc::new(Balancer::new(Duration::from_secs(1), None)),
            router: Arc::new(ArcSwap::from_pointee(Router::default())),
            backends: HashMap::new(),
            shared: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            identity: None,
            eject_after: 7,
            egress: test_egress(),
            budget: test_budget(),
        };
        let balancer = targets.balancer.clone();
        let update = DestinationUpdate {
            update: Some(Update::Destination(Destination {
                service: "web.shop.svc.cluster.local:80".into(),
                protocol: ProtocolHint::Opaque as i32,
                endpoints: vec![
                    Endpoint {
                        ip: "10.0.0.2".into(),
                        port: 8080,
                        weight: 0,
                        meshed: true,
                        ..Default::default()
                    },
                    Endpoint {
                        ip: "not-an-ip".into(),
                        port: 8080,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })),
        };
        apply("t", update, &state, &mut targets, &metrics);
        assert_eq!(balancer.len(), 1, "bad addresses skipped");
        assert!(matches!(
            &*rx.borrow(),
            Resolved::Mesh {
                hint: ProtocolHint::Opaque,
                ..
            }
        ));
        apply(
            "t",
            DestinationUpdate {
                update: Some(Update::NotInMesh(NotInMesh {
                    reason: String::new(),
                })),
            },
            &state,
            &mut targets,
            &metrics,
        );
        assert!(balancer.is_empty());
        assert!(matches!(*rx.borrow(), Resolved::NotInMesh));
        assert!(matches!(**state.current.load(), Resolved::NotInMesh));
    }

    fn resolution_and_state() -> (Arc<Resolution>, State) {
        let (tx, rx) = watch::channel(Resolved::Pending);
        let current = Arc::new(ArcSwap::from_pointee(Resolved::Pending));
        let resolution = Arc::new(Resolution {
            state: rx,
            current: current.clone(),
            target: "10.96.0.10:80".parse().expect("addr"),
            warned_pending: AtomicBool::new(false),
            balancer: Arc::new(Balancer::new(Duration::from_secs(1), None)),
            router: Arc::new(ArcSwap::from_pointee(Router::default())),
            retry_budget: test_budget(),
            last_used: AtomicU64::new(0),
        });
        (resolution, State { tx, current })
    }

    fn mesh_update(service: &str) -> DestinationUpdate {
        use strait_api::discovery::Destination;
        DestinationUpdate {
            update: Some(Update::Destination(Destination {
                service: service.into(),
                ..Default::default()
            })),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_pending_answer_and_later_requests_follow_changes() {
        let (resolution, state) = resolution_and_state();
        let metrics = Arc::new(Metrics::new());
        let mut targets = Targets {
            balancer: resolution.balancer.clone(),
            router: resolution.router.clone(),
            backends: HashMap::new(),
            shared: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            identity: None,
            eject_after: 7,
            egress: test_egress(),
            budget: test_budget(),
        };
        // Nothing comes: after the timeout the request goes by "pending" (passed through).
        let s = resolution.state_for_request(Duration::from_secs(1)).await;
        assert!(s.is_pending());
        // An answer that comes while a request waits is the one it goes by.
        let waiting = {
            let r = resolution.clone();
            tokio::spawn(async move { r.state_for_request(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        apply("t", mesh_update("web:80"), &state, &mut targets, &metrics);
        let got = waiting.await.expect("task");
        let Resolved::Mesh { metrics: first, .. } = &*got else {
            panic!("expected the mesh answer, got {got:?}");
        };
        // The next request of the same connection sees a later change at once...
        apply(
            "t",
            DestinationUpdate {
                update: Some(Update::NotInMesh(Default::default())),
            },
            &state,
            &mut targets,
            &metrics,
        );
        assert!(matches!(
            *resolution.state_for_request(Duration::ZERO).await,
            Resolved::NotInMesh
        ));
        // ... and the same service, announced again, keeps its metrics handles.
        apply("t", mesh_update("web:80"), &state, &mut targets, &metrics);
        let again = resolution.current();
        apply("t", mesh_update("web:80"), &state, &mut targets, &metrics);
        let third = resolution.current();
        match (&*again, &*third) {
            (Resolved::Mesh { metrics: a, .. }, Resolved::Mesh { metrics: b, .. }) => {
                assert!(Arc::ptr_eq(a, b), "same service, same handles");
                assert!(
                    !Arc::ptr_eq(a, first),
                    "a new answer after NotInMesh is fresh"
                );
            }
            other => panic!("expected two mesh answers, got {other:?}"),
        }
    }
}
