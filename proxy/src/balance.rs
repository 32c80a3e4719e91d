//! Load balancing: power of two choices over peak-EWMA latency (Linkerd's default).
//!
//! Each endpoint keeps a latency estimate that jumps up to any slower observation at once (the
//! "peak") and decays toward faster ones with a time constant (10 s). Its cost is the estimate
//! times the requests in flight plus one, divided by its weight. Picking samples two endpoints
//! at random and chooses between them with probability inversely proportional to their cost:
//! an endpoint 50 times slower (or with 10 times the requests in flight) is almost never
//! chosen, while equal endpoints whose estimates differ only by noise keep sharing the load. (A
//! strict "cheaper wins" starves whichever equal endpoint saw the last noisy peak until its
//! estimate decays, seconds later, when requests arrive one at a time.)
//!
//! The latency recorded is from the moment a connection is ready to the response headers:
//! connection set-up is not charged to the endpoint's latency (its failure is).
//!
//! All state is atomics: the request path never takes a lock. Concurrent updates of an estimate
//! may lose one observation to another; for an estimator that is harmless.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::http::client::H2Conn;
use crate::identity::{Identity, PeerTls};

/// Decay time constant of the estimate.
const DECAY: Duration = Duration::from_secs(10);
/// Estimate of an endpoint never measured: optimistic, so new endpoints get tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// What a failed attempt counts as, so that a broken endpoint is avoided until it decays.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Consecutive failures (connect errors, 5xx) that eject an endpoint (Linkerd's default).
pub const EJECT_AFTER: u32 = 7;
/// First ejection; each further one without a success in between doubles it, up to the max.
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(60);

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What discovery says of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub identity: Arc<str>,
    pub meshed: bool,
}

/// A live endpoint: its spec, its load, and its pooled HTTP/2 connection.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    pub h2: H2Conn,
    /// Set when this proxy has an identity and the endpoint is a meshed peer with one: every
    /// connection to it is mTLS, checked against that identity.
    pub tls: Option<PeerTls>,
    load: PeakEwma,
    breaker: Breaker,
}

/// Circuit breaking by consecutive failures. Ejected endpoints are skipped until their backoff
/// ends; then the next request probes it (half-open): a success restores it, a failure ejects
/// it again for twice as long.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failures that eject; 0: never.
    threshold: u32,
    consecutive: AtomicU32,
    ejections: AtomicU32,
    ejected_until: AtomicU64,
}

impl Breaker {
    fn available(&self, now: u64) -> bool {
        now >= self.ejected_until.load(Ordering::Relaxed)
    }

    fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    /// Records a failure; returns the ejection it caused, if any.
    fn failure(&self) -> Option<Duration> {
        if self.threshold == 0 {
            return None;
        }
        let probing = self.ejections.load(Ordering::Relaxed) > 0;
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if !probing && consecutive < self.threshold {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = EJECT_BASE.saturating_mul(1 << n.min(6)).min(EJECT_MAX);
        self.ejected_until
            .store(now_ns() + backoff.as_nanos() as u64, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        Some(backoff)
    }
}

impl Endpoint {
    pub fn new(
        spec: EndpointSpec,
        connect_timeout: Duration,
        identity: Option<&Identity>,
        eject_after: u32,
    ) -> Self {
        let tls = match identity {
            Some(local) if spec.meshed => match spec.identity.parse() {
                Ok(peer) => match local.peer(&peer) {
                    Ok(tls) => Some(tls),
                    Err(e) => {
                        tracing::error!(addr = %spec.addr, error = %e, "no TLS configuration for the endpoint");
                        None
                    }
                },
                Err(_) => None,
            },
            _ => None,
        };
        Self {
            h2: H2Conn::with_tls(
                spec.addr,
                connect_timeout,
                tls.as_ref().map(|t| t.h2.clone()),
            ),
            tls,
            spec,
            load: PeakEwma::default(),
            breaker: Breaker {
                threshold: eject_after,
                ..Breaker::default()
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.spec.addr
    }

    fn record_failure(&self) {
        if let Some(backoff) = self.breaker.failure() {
            tracing::warn!(addr = %self.spec.addr, ?backoff, "endpoint ejected after consecutive failures");
        }
    }

    /// Marks a request in flight; the guard records its latency when it ends.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.load.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            start: Instant::now(),
            done: false,
        }
    }

    fn cost(&self, now: u64) -> f64 {
        let pending = f64::from(self.load.pending.load(Ordering::Relaxed));
        let weight = f64::from(self.spec.weight.max(1));
        (self.load.estimate(now) + 1.0) * (pending + 1.0) / weight
    }
}

#[derive(Debug)]
struct PeakEwma {
    pending: AtomicU32,
    /// f64 nanoseconds, as bits.
    rtt: AtomicU64,
    stamp: AtomicU64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            pending: AtomicU32::new(0),
            rtt: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(now_ns()),
        }
    }
}

impl PeakEwma {
    /// The estimate decayed to `now` (decays toward zero while idle, so idle endpoints get
    /// retried).
    fn estimate(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        rtt * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate(now);
        let next = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            current * w + rtt * (1.0 - w)
        };
        self.rtt.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }
}

/// A request in flight on an endpoint.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    start: Instant,
    done: bool,
}

impl InFlight {
    /// The connection is ready: latency is measured from now.
    pub fn connected(&mut self) {
        self.start = Instant::now();
    }

    /// The response headers arrived: record the latency. A 5xx counts toward ejection.
    pub fn response(mut self, status: http::StatusCode) {
        self.endpoint.load.observe(self.start.elapsed());
        self.done = true;
        if status.is_server_error() {
            self.endpoint.record_failure();
        } else {
            self.endpoint.breaker.success();
        }
    }

    /// The attempt failed (connect error, reset): penalise the endpoint.
    pub fn failure(mut self) {
        self.endpoint
            .load
            .observe(FAILURE_PENALTY.max(self.start.elapsed()));
        self.done = true;
        self.endpoint.record_failure();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.load.pending.fetch_sub(1, Ordering::Relaxed);
        if !self.done {
            // Cancelled: the client went away. Count the time spent, no penalty.
            self.endpoint.load.observe(self.start.elapsed());
        }
    }
}

/// The endpoints of one destination.
#[derive(Debug)]
pub struct Balancer {
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    connect_timeout: Duration,
    identity: Option<Arc<Identity>>,
    eject_after: u32,
}

impl Balancer {
    pub fn new(connect_timeout: Duration, identity: Option<Arc<Identity>>) -> Self {
        Self {
            endpoints: ArcSwap::from_pointee(Vec::new()),
            connect_timeout,
            identity,
            eject_after: EJECT_AFTER,
        }
    }

    /// Consecutive failures that eject an endpoint (0: never).
    pub fn with_ejection(mut self, eject_after: u32) -> Self {
        self.eject_after = eject_after;
        self
    }

    /// Replaces the endpoint set. Endpoints that stay keep their load and connection.
    pub fn update(&self, specs: Vec<EndpointSpec>) {
        let current = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = specs
            .into_iter()
            .map(|spec| {
                current
                    .iter()
                    .find(|e| e.spec == spec)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint::new(
                            spec,
                            self.connect_timeout,
                            self.identity.as_deref(),
                            self.eject_after,
                        ))
                    })
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    pub fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Power of two choices among endpoints not ejected. `None` when there is none (see
    /// [`Balancer::is_empty`] to tell "no endpoint" from "all ejected").
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        let now = now_ns();
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let a = fastrand::usize(..n);
        let b = if n > 1 {
            let b = fastrand::usize(..n - 1);
            if b >= a {
                b + 1
            } else {
                b
            }
        } else {
            a
        };
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        match (ea.breaker.available(now), eb.breaker.available(now)) {
            (true, true) if a != b => {
                let (ca, cb) = (ea.cost(now), eb.cost(now));
                // P(a) = cb / (ca + cb): the cheaper one is likelier, in proportion.
                let pick_a = fastrand::f64() * (ca + cb) < cb;
                Some(if pick_a { ea.clone() } else { eb.clone() })
            }
            (true, _) => Some(ea.clone()),
            (false, true) => Some(eb.clone()),
            // Both sampled are ejected: any other that is not.
            (false, false) => (0..n)
                .map(|i| &endpoints[(a + i) % n])
                .find(|e| e.breaker.available(now))
                .cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            weight: 1,
            identity: "".into(),
            meshed: false,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_failed_probe_ejects_for_longer() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2)]);
        let bad = b.endpoints.load()[0].clone();
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(bad.breaker.failure(), None);
        }
        assert_eq!(
            bad.breaker.failure(),
            Some(Duration::from_secs(1)),
            "ejected on the 7th"
        );
        for _ in 0..100 {
            assert_eq!(b.pick().expect("the other one").addr().port(), 2);
        }
        // After the backoff the next failure is a failed probe: ejected again, twice as long.
        bad.breaker.ejected_until.store(0, Ordering::Relaxed);
        assert_eq!(bad.breaker.failure(), Some(Duration::from_secs(2)));
        // A success restores it fully.
        bad.breaker.ejected_until.store(0, Ordering::Relaxed);
        bad.breaker.success();
        assert_eq!(bad.breaker.failure(), None);
    }

    #[test]
    fn when_every_endpoint_is_ejected_nothing_is_picked() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2), spec(3)]);
        for e in b.endpoints.load().iter() {
            for _ in 0..EJECT_AFTER {
                e.breaker.failure();
            }
        }
        assert!(b.pick().is_none());
        assert!(!b.is_empty(), "ejected, not gone");
    }

    #[test]
    fn empty_balancer_picks_nothing() {
        assert!(Balancer::new(Duration::from_secs(1), None).pick().is_none());
    }

    #[test]
    fn a_slow_endpoint_gets_less_traffic() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2), spec(3)]);
        let slow = SocketAddr::from(([10, 0, 0, 1], 3));
        let mut counts = std::collections::HashMap::new();
        for _ in 0..3000 {
            let e = b.pick().expect("endpoints");
            *counts.entry(e.addr()).or_insert(0u32) += 1;
            let f = e.start();
            // Simulated latency: the slow one takes 50 ms, others 1 ms.
            let rtt = if e.addr() == slow {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(1)
            };
            e.load.observe(rtt);
            f.success_without_observing();
        }
        let slow_share = f64::from(counts[&slow]) / 3000.0;
        assert!(
            slow_share < 0.15,
            "slow endpoint got {slow_share:.2} of picks: {counts:?}"
        );
    }

    #[test]
    fn in_flight_requests_spread_load() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2)]);
        let first = b.pick().expect("endpoints");
        let _busy: Vec<_> = (0..10).map(|_| first.start()).collect();
        let busy_picks = (0..1000)
            .filter(|_| b.pick().expect("endpoints").addr() == first.addr())
            .count();
        assert!(
            busy_picks < 150,
            "an endpoint with 10 requests in flight got {busy_picks}/1000"
        );
    }

    #[test]
    fn equal_endpoints_with_noisy_latency_share_load() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2), spec(3)]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000u64 {
            let e = b.pick().expect("endpoints");
            *counts.entry(e.addr().port()).or_insert(0u32) += 1;
            // 1 ms, with every 7th response at 1.5 ms: noise, not a slow endpoint.
            let micros = if i % 7 == 0 { 1500 } else { 1000 };
            e.load.observe(Duration::from_micros(micros));
        }
        for (port, n) in &counts {
            assert!(*n > 600, "endpoint {port} got {n}/3000: {counts:?}");
        }
    }

    #[test]
    fn updates_keep_the_state_of_endpoints_that_stay() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2)]);
        let before = b.pick().expect("endpoints");
        b.update(vec![spec(1), spec(2), spec(3)]);
        let after = b.endpoints.load();
        assert!(after.iter().any(|e| Arc::ptr_eq(e, &before)));
        b.update(vec![spec(3)]);
        assert_eq!(b.len(), 1);
        assert_eq!(b.pick().expect("one").addr().port(), 3);
    }

    impl InFlight {
        fn success_without_observing(mut self) {
            self.done = true;
        }
    }
}
