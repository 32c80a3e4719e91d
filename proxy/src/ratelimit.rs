//! Local rate limits of inbound HTTP requests (policy.strait.io/v1alpha1
//! HTTPLocalRateLimitPolicy, in the spirit of Linkerd's): token buckets holding one second's
//! worth, for every client together (`total`), for each client identity (`identity`, clients
//! without one sharing a bucket) and for named identities (`overrides`). A request over a limit
//! is answered 429 with `Retry-After` (gRPC: RESOURCE_EXHAUSTED) and never reaches the
//! application.
//!
//! Buckets are lock-free (one compare-and-swap per request and bucket); the map of per-identity
//! buckets takes a short lock, only on ports that have an identity limit, and holds at most
//! [`MAX_CLIENTS`] identities (the idlest are dropped past that).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::Request;
use strait_api::discovery::RateLimit;
use strait_identity::SpiffeId;

use crate::router::{compile_match, CompiledMatch};

/// Client identities with a bucket of their own, per limit.
pub const MAX_CLIENTS: usize = 10_000;

/// Microseconds since the first call.
fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A token bucket of `rate` tokens per second holding at most `rate` (one second's worth).
/// State: the time (µs) at which the bucket would be full again, the "theoretical arrival time"
/// of GCRA: one atomic.
#[derive(Debug)]
pub struct Bucket {
    /// Microseconds one request costs.
    cost_us: u64,
    /// How far ahead of now the full time may run: one second's worth of requests.
    burst_us: u64,
    full_at: AtomicU64,
}

impl Bucket {
    pub fn new(rate: u32) -> Self {
        let cost_us = 1_000_000 / u64::from(rate.max(1));
        Self {
            cost_us,
            burst_us: cost_us * u64::from(rate.max(1)),
            full_at: AtomicU64::new(0),
        }
    }

    /// Takes a token at `now_us`; `Err(wait)` when there is none.
    fn take_at(&self, now_us: u64) -> Result<(), Duration> {
        let mut current = self.full_at.load(Ordering::Relaxed);
        loop {
            let start = current.max(now_us);
            let next = start + self.cost_us;
            if next > now_us + self.burst_us {
                return Err(Duration::from_micros(next - now_us - self.burst_us));
            }
            match self.full_at.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(now_us())
    }
}

/// One policy, compiled.
#[derive(Debug)]
struct Limit {
    port: u16,
    policy: String,
    routes: Vec<CompiledMatch>,
    total: Option<Bucket>,
    identity_rps: u32,
    overrides: HashMap<String, u32>,
    clients: Mutex<HashMap<String, Arc<Bucket>>>,
}

/// A request over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub policy: String,
    pub retry_after: Duration,
}

/// Every limit of the workload.
#[derive(Debug, Default)]
pub struct Limits(Vec<Limit>);

impl Limits {
    pub fn compile(limits: &[RateLimit]) -> Self {
        Self(
            limits
                .iter()
                .map(|l| Limit {
                    port: u16::try_from(l.port).unwrap_or(0),
                    policy: l.policy.clone(),
                    routes: l
                        .routes
                        .iter()
                        .map(|m| compile_match(m, &l.policy))
                        .collect(),
                    total: (l.total_rps > 0).then(|| Bucket::new(l.total_rps)),
                    identity_rps: l.identity_rps,
                    overrides: l
                        .overrides
                        .iter()
                        .flat_map(|o| o.identities.iter().map(move |id| (id.clone(), o.rps)))
                        .collect(),
                    clients: Mutex::new(HashMap::new()),
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes a token from every bucket `req` counts against; the first that has none refuses.
    pub fn check<B>(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
        req: &Request<B>,
    ) -> Result<(), Limited> {
        for limit in &self.0 {
            if limit.port != 0 && limit.port != port {
                continue;
            }
            if !limit.routes.is_empty() && !limit.routes.iter().any(|m| m.matches(req)) {
                continue;
            }
            let refused = |retry_after| Limited {
                policy: limit.policy.clone(),
                retry_after,
            };
            if let Some(bucket) = limit.client_bucket(client) {
                bucket.take().map_err(refused)?;
            }
            if let Some(total) = &limit.total {
                total.take().map_err(refused)?;
            }
        }
        Ok(())
    }
}

impl Limit {
    /// The bucket of `client`: its override, else the per-identity limit; `None` without one.
    fn client_bucket(&self, client: Option<&SpiffeId>) -> Option<Arc<Bucket>> {
        let name = client.map_or_else(String::new, ToString::to_string);
        let rate = self
            .overrides
            .get(&name)
            .copied()
            .unwrap_or(self.identity_rps);
        if rate == 0 {
            return None;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = clients.get(&name) {
            return Some(b.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            // Drop the buckets that are full again (idle for a second or more): they hold no
            // state worth keeping.
            let now = now_us();
            clients.retain(|_, b| b.full_at.load(Ordering::Relaxed) > now);
            if clients.len() >= MAX_CLIENTS {
                clients.clear();
            }
        }
        let bucket = Arc::new(Bucket::new(rate));
        clients.insert(name, bucket.clone());
        Some(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::discovery::{path_match, PathMatch, RateLimitOverride, RouteMatch};

    #[test]
    fn a_bucket_allows_its_rate_with_one_second_of_burst() {
        let b = Bucket::new(10);
        let t0 = 5_000_000;
        assert_eq!(
            (0..20).filter(|_| b.take_at(t0).is_ok()).count(),
            10,
            "a second's burst"
        );
        let Err(wait) = b.take_at(t0) else {
            panic!("empty")
        };
        assert_eq!(
            wait,
            Duration::from_millis(100),
            "one token comes every 100 ms"
        );
        // Over 10 s at a steady demand above the rate: 10/s pass.
        let passed = (0..1000)
            .filter(|i| b.take_at(t0 + 1 + i * 10_000).is_ok())
            .count();
        assert!((99..=101).contains(&passed), "{passed} in 10 s");
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).expect("id")
    }

    #[test]
    fn identity_limits_overrides_routes_and_ports() {
        let limits = Limits::compile(&[RateLimit {
            port: 8080,
            policy: "shop/limit".into(),
            routes: vec![RouteMatch {
                path: Some(PathMatch {
                    kind: path_match::Kind::Prefix as i32,
                    value: "/api".into(),
                }),
                ..Default::default()
            }],
            total_rps: 0,
            identity_rps: 2,
            overrides: vec![RateLimitOverride {
                rps: 5,
                identities: vec![id("batch").to_string()],
            }],
        }]);
        let api = Request::get("/api/x").body(()).expect("request");
        let count = |client: Option<&SpiffeId>, port: u16, req: &Request<()>| {
            (0..10)
                .filter(|_| limits.check(port, client, req).is_ok())
                .count()
        };
        assert_eq!(count(Some(&id("web")), 8080, &api), 2);
        assert_eq!(count(Some(&id("other")), 8080, &api), 2, "its own bucket");
        assert_eq!(count(Some(&id("batch")), 8080, &api), 5, "override");
        assert_eq!(
            count(None, 8080, &api),
            2,
            "unauthenticated clients share one"
        );
        let home = Request::get("/home").body(()).expect("request");
        assert_eq!(
            count(Some(&id("web")), 8080, &home),
            10,
            "not a limited route"
        );
        assert_eq!(count(Some(&id("web")), 9090, &api), 10, "another port");
        let Err(limited) = limits.check(8080, Some(&id("web")), &api) else {
            panic!("limited")
        };
        assert_eq!(limited.policy, "shop/limit");
        assert!(limited.retry_after <= Duration::from_millis(500));
    }
}
