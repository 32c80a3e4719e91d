//! Limits of the control plane's gRPC servers, so that one misbehaving or hostile client cannot
//! exhaust them: HTTP/2 settings on every connection, a cap on the watches one caller may hold
//! open, and a rate limit on certificate requests.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// HTTP/2 streams one connection may have open at once (a proxy multiplexes all its watches
/// on one connection: one per destination it talks to, plus its policy).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams a client may open and reset before the server has accepted them (the "rapid reset"
/// attack, CVE-2023-44487): past this the connection is closed.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Largest header block a request may carry.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Pings on idle connections, and how long a ping may go unanswered before the connection
/// is closed (a dead proxy's streams do not linger).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Watches (destination and policy streams) one caller address may hold open together.
pub const MAX_WATCHES_PER_CALLER: usize = 2048;
/// Certificate requests per caller address: a burst, then this many per second.
pub const CSR_BURST: f64 = 20.0;
pub const CSR_PER_SECOND: f64 = 2.0;

/// A tonic server with the limits above.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .tcp_nodelay(true)
}

/// Open watches by caller address.
#[derive(Debug)]
pub struct WatchLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl WatchLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more watch of `caller`, held until the guard drops; refused with
    /// `RESOURCE_EXHAUSTED` past the limit. Callers without an address are not counted.
    pub fn acquire(self: &Arc<Self>, caller: Option<IpAddr>) -> Result<WatchSlot, tonic::Status> {
        let Some(ip) = caller else {
            return Ok(WatchSlot { limit: None });
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return Err(tonic::Status::resource_exhausted(format!(
                "{ip} holds {} watches, the most one caller may",
                self.max
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            limit: Some((self.clone(), ip)),
        })
    }
}

/// One open watch; frees its slot when dropped.
#[derive(Debug)]
pub struct WatchSlot {
    limit: Option<(Arc<WatchLimit>, IpAddr)>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Some((limit, ip)) = self.limit.take() {
            let mut open = limit.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

/// Token buckets by caller address.
#[derive(Debug)]
pub struct RateLimit {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimit {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `caller`, or says how long until one is there.
    pub fn take(&self, caller: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = caller else { return Ok(()) };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            // Full buckets carry no state: forget them rather than grow without bound.
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_past_its_watch_limit_is_refused_until_one_closes() {
        let limit = WatchLimit::new(3);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let held: Vec<_> = (0..3)
            .map(|_| limit.acquire(Some(a)).expect("slot"))
            .collect();
        let refused = limit.acquire(Some(a)).expect_err("a fourth");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(limit.acquire(Some(b)).is_ok(), "another caller has its own");
        drop(held);
        assert!(limit.acquire(Some(a)).is_ok(), "freed when the watches end");
        assert!(limit
            .open
            .lock()
            .expect("lock")
            .get(&a)
            .is_none_or(|n| *n <= 1));
    }

    #[test]
    fn certificate_requests_are_rate_limited_per_caller() {
        let limit = RateLimit::new(3.0, 1000.0);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let slow = RateLimit::new(2.0, 0.5);
        assert!(slow.take(Some(a)).is_ok() && slow.take(Some(a)).is_ok());
        let wait = slow.take(Some(a)).expect_err("burst spent");
        assert!(
            wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        assert!(slow.take(Some("10.0.0.9".parse().expect("ip"))).is_ok());
        for _ in 0..3 {
            assert!(limit.take(Some(a)).is_ok());
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(limit.take(Some(a)).is_ok(), "refilled at its rate");
    }
}
