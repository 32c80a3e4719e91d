//! The proxy's discovery client: one watch stream per destination, shared by every connection to
//! it, feeding that destination's [`Balancer`].
//!
//! When the control plane goes away the last answer keeps being served and the stream is
//! reopened with jittered exponential backoff. A destination never answered within
//! `first_answer_timeout` is passed through to its original address (a safe fallback: the
//! platform's own networking still works without the mesh).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_api::discovery::destination_update::Update;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{DestinationUpdate, ProtocolHint, WatchRequest};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

use crate::balance::{Balancer, EndpointSpec};
use crate::metrics::Metrics;
use crate::router::Router;
use arc_swap::ArcSwap;

/// The discovery state of one destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// No answer yet.
    Pending,
    NotInMesh,
    Mesh {
        service: Arc<str>,
        hint: ProtocolHint,
    },
}

/// One destination's live resolution. Connections hold it while they use its balancer.
#[derive(Debug)]
pub struct Resolution {
    state: watch::Receiver<Resolved>,
    pub balancer: Arc<Balancer>,
    /// HTTP routes (HTTPRoute, TrafficSplit); empty: everything goes to `balancer`.
    pub router: Arc<ArcSwap<Router>>,
    /// Caps the retries of requests to this destination.
    pub retry_budget: crate::retry::RetryBudget,
    last_used: AtomicU64,
}

impl Resolution {
    pub fn current(&self) -> Resolved {
        self.state.borrow().clone()
    }

    /// The state once known, or `Pending` after `timeout`.
    async fn ready(&self, timeout: Duration) -> Resolved {
        let mut rx = self.state.clone();
        let known = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| *s != Resolved::Pending)
                .await
                .map(|s| s.clone())
        })
        .await;
        match known {
            Ok(Ok(state)) => state,
            _ => self.current(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "--control-plane-addr / STRAIT_CONTROL_PLANE_ADDR {addr:?} is not a valid address: {source}"
)]
pub struct AddrError {
    addr: String,
    #[source]
    source: tonic::transport::Error,
}

/// Where a new connection goes, decided by discovery.
#[derive(Debug, Clone)]
pub enum Lookup {
    Mesh {
        service: Arc<str>,
        hint: ProtocolHint,
        resolution: Arc<Resolution>,
    },
    Passthrough,
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
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<SocketAddr, Arc<Resolution>>,
    swept: Option<Instant>,
}

/// Resolutions unused this long, and held by no connection, are dropped (their streams end).
const IDLE_EVICTION: Duration = Duration::from_secs(600);

impl Discovery {
    /// A client of the discovery server at `addr`, with the proxy's settings.
    pub fn new(
        addr: &str,
        cfg: &crate::config::ProxyConfig,
        metrics: Arc<Metrics>,
        identity: Option<Arc<crate::identity::Identity>>,
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
                source,
            })?
            .connect_timeout(connect_timeout.max(Duration::from_millis(500)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        Ok(Self {
            client: DiscoveryClient::new(endpoint.connect_lazy()),
            cache: Mutex::new(Cache::default()),
            workload,
            first_answer_timeout,
            connect_timeout,
            metrics,
            identity,
            retry_budget,
            eject_after,
        })
    }

    /// A client of the discovery service (shares the connection).
    pub fn client(&self) -> DiscoveryClient<Channel> {
        self.client.clone()
    }

    /// Looks `target` up, starting its stream on first use.
    pub async fn lookup(&self, target: SocketAddr) -> Lookup {
        let resolution = self.resolution(target);
        match resolution.ready(self.first_answer_timeout).await {
            Resolved::Mesh { service, hint } => Lookup::Mesh {
                service,
                hint,
                resolution,
            },
            Resolved::NotInMesh => Lookup::Passthrough,
            Resolved::Pending => {
                tracing::warn!(%target, "no discovery answer in time; passing through");
                Lookup::Passthrough
            }
        }
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
        let balancer = Arc::new(
            Balancer::new(self.connect_timeout, self.identity.clone())
                .with_ejection(self.eject_after),
        );
        let router = Arc::new(ArcSwap::from_pointee(Router::default()));
        let resolution = Arc::new(Resolution {
            state: rx,
            balancer: balancer.clone(),
            router: router.clone(),
            retry_budget: crate::retry::RetryBudget::new(&self.retry_budget),
            last_used: AtomicU64::new(now),
        });
        cache.entries.insert(target, resolution.clone());
        tokio::spawn(watch_destination(
            self.client.clone(),
            WatchRequest {
                target: target.to_string(),
                proxy: self.workload.clone(),
            },
            tx,
            Targets {
                balancer,
                router,
                backends: HashMap::new(),
                connect_timeout: self.connect_timeout,
                identity: self.identity.clone(),
                eject_after: self.eject_after,
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

async fn watch_destination(
    mut client: DiscoveryClient<Channel>,
    request: WatchRequest,
    tx: watch::Sender<Resolved>,
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
                apply(&request.target, update, &tx, &mut targets);
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
            _ = tx.closed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = tx.closed() => return,
        }
    }
}

/// What one destination's stream keeps up to date.
struct Targets {
    balancer: Arc<Balancer>,
    router: Arc<ArcSwap<Router>>,
    /// Balancers of route backends, by service, kept across updates.
    backends: HashMap<Arc<str>, Arc<Balancer>>,
    connect_timeout: Duration,
    identity: Option<Arc<crate::identity::Identity>>,
    eject_after: u32,
}

fn endpoint_specs(endpoints: &[strait_api::discovery::Endpoint]) -> Vec<EndpointSpec> {
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
    tx: &watch::Sender<Resolved>,
    targets: &mut Targets,
) {
    let balancer = &targets.balancer;
    match update.update {
        Some(Update::Destination(d)) => {
            let specs = endpoint_specs(&d.endpoints);
            let (timeout, identity, eject_after) = (
                targets.connect_timeout,
                targets.identity.clone(),
                targets.eject_after,
            );
            let router = Router::compile(
                &d.routes,
                d.unmatched_to_service,
                &mut targets.backends,
                &|| Balancer::new(timeout, identity.clone()).with_ejection(eject_after),
                &endpoint_specs,
            );
            targets.router.store(Arc::new(router));
            tracing::debug!(%target, service = %d.service, endpoints = specs.len(), "discovery update");
            balancer.update(specs);
            let hint = ProtocolHint::try_from(d.protocol).unwrap_or(ProtocolHint::Unknown);
            tx.send_replace(Resolved::Mesh {
                service: d.service.into(),
                hint,
            });
        }
        Some(Update::NotInMesh(_)) | None => {
            balancer.update(Vec::new());
            tx.send_replace(Resolved::NotInMesh);
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
        let mut targets = Targets {
            balancer: Arc::new(Balancer::new(Duration::from_secs(1), None)),
            router: Arc::new(ArcSwap::from_pointee(Router::default())),
            backends: HashMap::new(),
            connect_timeout: Duration::from_secs(1),
            identity: None,
            eject_after: 7,
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
        apply("t", update, &tx, &mut targets);
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
            &tx,
            &mut targets,
        );
        assert!(balancer.is_empty());
        assert_eq!(*rx.borrow(), Resolved::NotInMesh);
    }
}
