//! Retries: which requests may be retried, on what, and within which budget.
//!
//! Only safe requests are retried: an idempotent method (RFC 9110) whose body is known to be
//! empty or at most 64 KiB (Content-Length), so it can be replayed; a body of unknown length is
//! never buffered, and never retried. A retry happens on the route's status codes, on gRPC
//! UNAVAILABLE, or when the connection failed before the request was sent; the decision is
//! made on the response headers, before anything streams back to the client.
//!
//! The budget caps retries at a share of requests plus a
//! small per-second minimum, over a window: 20% + 10/s over 10 s by default.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::http::error::ProxyError;

/// Largest request body buffered for a retry.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A route's retry policy, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub codes: Vec<u16>,
    /// gRPC statuses retried (from a trailers-only response); 14 (UNAVAILABLE) by default.
    pub grpc_codes: Vec<u32>,
    pub backoff: Duration,
}

/// Budget settings, validated so the budget never panics.
#[derive(Debug, Clone, Copy)]
pub struct BudgetSettings {
    pub ratio: f32,
    pub min_per_second: u32,
    pub window: Duration,
}

pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether `req` can be replayed: an idempotent method and a body known to fit the buffer.
pub fn is_replayable<B: http_body::Body>(req: &Request<B>) -> bool {
    if !is_idempotent(req.method()) {
        return false;
    }
    if req.body().is_end_stream() {
        return true;
    }
    req.body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= MAX_REPLAY_BODY)
}

/// Whether `result` is worth another attempt under `policy`.
pub fn should_retry<B>(
    result: &Result<Response<B>, ProxyError>,
    policy: &RetryPolicy,
    grpc: bool,
) -> bool {
    match result {
        // Nothing was sent: always safe to try another endpoint.
        Err(
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::Tls { .. },
        ) => true,
        // A `backendRequest` timeout answers 504: retried when the route retries 504s (the
        // request is replayable, or it would not be here).
        Err(ProxyError::Timeout { .. }) => policy.codes.contains(&504),
        Err(_) => false,
        Ok(resp) => {
            let status = resp.status();
            policy.codes.contains(&status.as_u16())
                || (grpc
                    && status == StatusCode::OK
                    && resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|s| s.to_str().ok())
                        .and_then(|s| s.parse::<u32>().ok())
                        .is_some_and(|code| policy.grpc_codes.contains(&code)))
        }
    }
}

/// The retry budget of one destination: over the last `window` (in one-second buckets),
/// retries may number at most `min_per_second x window + ratio x requests`.
///
/// Lock-free: each bucket is three atomics. Two threads racing to reset a bucket for a new
/// second may lose a count between them; a budget tolerates that.
#[derive(Debug)]
pub struct RetryBudget {
    buckets: Vec<Bucket>,
    ratio: f64,
    reserve: f64,
}

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

fn now_second() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RetryBudget {
    pub fn new(settings: &BudgetSettings) -> Self {
        let window = settings.window.as_secs().clamp(1, 60);
        Self {
            buckets: (0..window).map(|_| Bucket::default()).collect(),
            ratio: f64::from(settings.ratio),
            reserve: f64::from(settings.min_per_second) * window as f64,
        }
    }

    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % self.buckets.len() as u64) as usize];
        let seen = b.second.load(Ordering::Relaxed);
        if seen != second
            && b.second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Every original request adds to the budget.
    pub fn deposit(&self) {
        self.deposit_at(now_second());
    }

    /// A retry takes from it; `false` when exhausted.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(now_second())
    }

    fn deposit_at(&self, second: u64) {
        self.bucket(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw_at(&self, second: u64) -> bool {
        let oldest = second.saturating_sub(self.buckets.len() as u64 - 1);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Relaxed);
            if s >= oldest && s <= second {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        if (retries as f64) + 1.0 > self.reserve + self.ratio * requests as f64 {
            return false;
        }
        self.bucket(second).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f32, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(&BudgetSettings {
            ratio,
            min_per_second,
            window: Duration::from_secs(10),
        })
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_plus_a_minimum_per_second() {
        let b = budget(0.2, 0);
        for _ in 0..100 {
            b.deposit_at(1000);
        }
        assert_eq!(
            (0..100).filter(|_| b.withdraw_at(1000)).count(),
            20,
            "20% of 100 requests"
        );
        let floor = budget(0.0, 10);
        assert_eq!(
            (0..1000).filter(|_| floor.withdraw_at(1000)).count(),
            100,
            "10/s over 10 s"
        );
    }

    #[test]
    fn the_window_slides_one_second_at_a_time() {
        let b = budget(0.2, 10);
        // 20 requests/s for 30 s, every one failing and asking for 5 retries.
        let mut retries = 0;
        for second in 1000..1030 {
            for _ in 0..20 {
                b.deposit_at(second);
                retries += (0..5).filter(|_| b.withdraw_at(second)).count();
            }
        }
        // At most reserve (100) + 20% of the window's requests (40) in any 10 s; the first
        // window spends its reserve at once, then 14/s: 140 + 20 x 14 = 420 over 30 s.
        assert!(retries <= 420, "{retries} retries in 30 s");
        assert!(
            retries >= 380,
            "the budget refills as the window slides: {retries}"
        );
        // A quiet minute later, the whole reserve is back.
        assert_eq!((0..200).filter(|_| b.withdraw_at(1100)).count(), 100);
    }

    #[test]
    fn only_idempotent_methods_are_safe() {
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(is_idempotent(&m));
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m));
        }
    }

    #[test]
    fn a_per_attempt_timeout_is_retried_when_the_route_retries_504() {
        let policy = |codes: Vec<u16>| RetryPolicy {
            attempts: 3,
            codes,
            grpc_codes: vec![14],
            backoff: Duration::ZERO,
        };
        let timeout: Result<Response<()>, ProxyError> = Err(ProxyError::Timeout {
            after: Duration::from_secs(1),
        });
        assert!(should_retry(&timeout, &policy(vec![503, 504]), false));
        assert!(!should_retry(&timeout, &policy(vec![503]), false));
    }
}
