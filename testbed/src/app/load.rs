//! A bounded HTTP load: a fixed rate over a list of URLs for a fixed time, then a summary.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Never runs longer than this, whatever `duration` says.
const MAX_DURATION: Duration = Duration::from_secs(3600);

pub async fn run(urls: Vec<String>, rps: u32, duration: Duration) -> anyhow::Result<()> {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uris: Vec<http::Uri> = urls.iter().map(|u| u.parse()).collect::<Result<_, _>>()?;
    let deadline = Instant::now() + duration.min(MAX_DURATION);
    let period = Duration::from_secs_f64(1.0 / f64::from(rps.clamp(1, 10_000)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut sent, ok) = (
        0u64,
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    println!("listening on nothing: load started");
    // Every request is awaited at the end (each is bounded by its own 10 s timeout), so one
    // sent just before the deadline is counted by its answer, not by how fast it came.
    let mut inflight = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        tick.tick().await;
        while inflight.try_join_next().is_some() {}
        let uri = uris[(sent as usize) % uris.len()].clone();
        sent += 1;
        let client = client.clone();
        let ok = ok.clone();
        inflight.spawn(async move {
            let fut = async {
                let resp = client.get(uri).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
            };
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(10), fut).await {
                if status.is_success() {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while inflight.join_next().await.is_some() {}
    println!(
        "sent={sent} ok={}",
        ok.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
