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
/// Consecutive failure events (connect errors, 5xx) that eject an endpoint (Linkerd's default).
pub const EJECT_AFTER: u32 = 7;
/// First ejection; each failed probe after an ejection doubles it, up to the max.
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(60);

/// Nanoseconds since the first call, plus one (0 means "never").
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
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
    pub tls: Option<Arc<PeerTls>>,
    load: PeakEwma,
    breaker: Breaker,
}

/// Circuit breaking by consecutive failure *events*, which cannot cascade:
///
/// - Failures of requests that were in flight together are one event: a failure counts only
///   if its request was sent after the last failure counted (a burst of 40 concurrent 500s is
///   one event, not 40).
/// - `threshold` events in a row eject the endpoint for a backoff (1 s). When it ends the
///   endpoint is half-open: a failure of a request sent after that (a probe) ejects it again
///   for twice as long (up to 60 s); failures of requests sent earlier change nothing. Any
///   success restores it fully.
/// - The balancer never lets ejection take its endpoints below a healthy floor (see
///   [`Balancer::pick`]): a single-endpoint service keeps sending, and recovers with its first
///   success.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failure events that eject; 0: never.
    threshold: u32,
    consecutive: AtomicU32,
    /// When the last failure event was counted (ns since [`now_ns`]'s base).
    last_event: AtomicU64,
    /// Ejections since the last success (the backoff's exponent).
    ejections: AtomicU32,
    ejected_until: AtomicU64,
}

impl Breaker {
    fn available(&self, now: u64) -> bool {
        now >= self.ejected_until.load(Ordering::Relaxed)
    }

    fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Records the failure of a request sent at `sent` (ns); returns the ejection it caused.
    fn failure(&self, sent: u64) -> Option<Duration> {
        if self.threshold == 0 {
            return None;
        }
        // Sent before the last event was counted: in flight together with it, the same event.
        // Of two failures racing here, only the one that moves `last_event` counts.
        let last = self.last_event.load(Ordering::Relaxed);
        if sent <= last
            || self
                .last_event
                .compare_exchange(last, now_ns(), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let ejections = self.ejections.load(Ordering::Relaxed);
        if ejections > 0 {
            // Half-open (or still ejected, reached in panic mode): only a probe sent after the
            // backoff ended grows it.
            if sent < self.ejected_until.load(Ordering::Relaxed) {
                return None;
            }
            return Some(self.eject(ejections));
        }
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        (consecutive >= self.threshold).then(|| self.eject(0))
    }

    fn eject(&self, exponent: u32) -> Duration {
        let backoff = EJECT_BASE
            .saturating_mul(1 << exponent.min(6))
            .min(EJECT_MAX);
        self.ejections.store(exponent + 1, Ordering::Relaxed);
        self.ejected_until
            .store(now_ns() + backoff.as_nanos() as u64, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        backoff
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

    fn record_failure(&self, sent: u64) {
        if let Some(backoff) = self.breaker.failure(sent) {
            strait_admin::log_limited!(tracing::Level::WARN, "endpoint ejected", "", addr = %self.spec.addr, ?backoff, "endpoint ejected after consecutive failures");
        }
    }

    /// Marks a request in flight; the guard records its latency when it ends.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.load.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            sent: now_ns(),
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
    /// When the request was sent (ns, for failure accrual).
    sent: u64,
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
            self.endpoint.record_failure(self.sent);
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
        self.endpoint.record_failure(self.sent);
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

    /// Replaces the endpoint set. Endpoints that stay keep their load and connection. O(n):
    /// the current endpoints are found by address.
    pub fn update(&self, specs: Vec<EndpointSpec>) {
        let current = self.endpoints.load();
        let by_addr: std::collections::HashMap<SocketAddr, &Arc<Endpoint>> =
            current.iter().map(|e| (e.spec.addr, e)).collect();
        let next: Vec<Arc<Endpoint>> = specs
            .into_iter()
            .map(|spec| match by_addr.get(&spec.addr) {
                Some(e) if e.spec == spec => Arc::clone(e),
                _ => Arc::new(Endpoint::new(
                    spec,
                    self.connect_timeout,
                    self.identity.as_deref(),
                    self.eject_after,
                )),
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

    /// Power of two choices among endpoints not ejected; `None` only when there is none at
    /// all.
    ///
    /// Healthy floor (Envoy's panic threshold): while fewer than half of the endpoints are
    /// available, ejection is ignored and every endpoint is a candidate again (the failure
    /// penalty in their cost still steers traffic to the healthier ones). A service whose every
    /// endpoint fails keeps trying them, and recovers with the first success, instead of
    /// failing fast for the whole backoff.
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
        let p2c = || {
            let (ca, cb) = (ea.cost(now), eb.cost(now));
            // P(a) = cb / (ca + cb): the cheaper one is likelier, in proportion.
            let pick_a = fastrand::f64() * (ca + cb) < cb;
            Some(if pick_a { ea.clone() } else { eb.clone() })
        };
        match (ea.breaker.available(now), eb.breaker.available(now)) {
            (true, true) if a != b => p2c(),
            (true, true) => Some(ea.clone()),
            // A sampled endpoint is ejected: only then is the healthy share counted (O(n),
            // while ejections last).
            (avail_a, avail_b) => {
                let available = endpoints
                    .iter()
                    .filter(|e| e.breaker.available(now))
                    .count();
                if available * 2 < n {
                    return p2c(); // panic: below the healthy floor, all are candidates
                }
                match (avail_a, avail_b) {
                    (true, _) => Some(ea.clone()),
                    (false, true) => Some(eb.clone()),
                    (false, false) => (0..n)
                        .map(|i| &endpoints[(a + i) % n])
                        .find(|e| e.breaker.available(now))
                        .cloned(),
                }
            }
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

    /// One failure event: a request sent now, failing now.
    fn fail(e: &Endpoint) -> Option<Duration> {
        e.breaker.failure(now_ns())
    }

    fn eject(e: &Endpoint) {
        for _ in 0..EJECT_AFTER {
            fail(e);
        }
        assert!(!e.breaker.available(now_ns()));
    }

    #[test]
    fn consecutive_failure_events_eject_and_only_a_failed_probe_ejects_for_longer() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2)]);
        let bad = b.endpoints.load()[0].clone();
        for _ in 0..EJECT_AFTER - 1 {
            assert_eq!(fail(&bad), None);
        }
        assert_eq!(fail(&bad), Some(EJECT_BASE), "ejected on the 7th");
        for _ in 0..100 {
            assert_eq!(b.pick().expect("the other one").addr().port(), 2);
        }
        // Failures of requests sent while it was ejected do not grow the backoff.
        let sent_during = now_ns();
        bad.breaker.ejected_until.store(now_ns(), Ordering::Relaxed);
        assert_eq!(bad.breaker.failure(sent_during), None);
        // A probe sent after the backoff ended that fails: ejected again, twice as long.
        assert_eq!(fail(&bad), Some(EJECT_BASE * 2));
        // A success restores it fully, and the count starts over.
        bad.breaker.ejected_until.store(0, Ordering::Relaxed);
        bad.breaker.success();
        assert_eq!(fail(&bad), None);
        assert!(bad.breaker.available(now_ns()));
    }

    #[test]
    fn a_burst_of_concurrent_failures_is_one_event() {
        let b = Balancer::new(Duration::from_secs(1), None);
        b.update(vec![spec(1), spec(2)]);
        let e = b.endpoints.load()[0].clone();
        // 40 requests in flight together (h2load -c4 -m10), all answered 500.
        let burst: Vec<InFlight> = (0..40).map(|_| e.start()).collect();
        for f in burst {
            f.response(http::StatusCode::INTERNAL_SERVER_ERROR);
        }
        assert!(e.breaker.available(now_ns()), "one event, not 40");
        assert_eq!(e.breaker.consecutive.load(Ordering::Relaxed), 1);
        // Six more bursts, each sent after the previous one failed: now it is ejected, once.
        for _ in 0..EJECT_AFTER - 1 {
            let burst: Vec<InFlight> = (0..10).map(|_| e.start()).collect();
            for f in burst {
                f.response(http::StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
        assert!(!e.breaker.available(now_ns()));
        assert_eq!(
            e.breaker.ejections.load(Ordering::Relaxed),
            1,
            "1 s, not 60"
        );
    }

    #[test]
    fn below_the_healthy_floor_every_endpoint_is_a_candidate() {
        // A single endpoint, ejected: still picked, so its first success restores it.
        let one = Balancer::new(Duration::from_secs(1), None);
        one.update(vec![spec(1)]);
        let only = one.endpoints.load()[0].clone();
        eject(&only);
        assert_eq!(one.pick().expect("never fail fast").addr().port(), 1);
        only.start().response(http::StatusCode::OK);
        assert!(
            only.breaker.available(now_ns()),
            "recovered on its first success"
        );

        // Two of three ejected: below half healthy, so all three are candidates.
        let three = Balancer::new(Duration::from_secs(1), None);
        three.update(vec![spec(1), spec(2), spec(3)]);
        for e in three.endpoints.load().iter().take(2) {
            eject(e);
        }
        let picked: std::collections::HashSet<u16> = (0..300)
            .map(|_| three.pick().expect("endpoints").addr().port())
            .collect();
        assert_eq!(picked.len(), 3, "{picked:?}");

        // Two of four ejected: half are healthy, so the ejected ones get nothing.
        let four = Balancer::new(Duration::from_secs(1), None);
        four.update(vec![spec(1), spec(2), spec(3), spec(4)]);
        for e in four.endpoints.load().iter().take(2) {
            eject(e);
        }
        for _ in 0..300 {
            assert!(four.pick().expect("endpoints").addr().port() > 2);
        }
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
