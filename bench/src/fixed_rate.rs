//! An open-loop load at a fixed rate: each connection owns every `conns`-th slot of a fixed
//! schedule and sends sequentially. A request sent late because the previous response was late
//! is measured from its scheduled time (so stalls are charged to the requests queued behind
//! them, as wrk2 and oha do); one sent on time is measured from the send itself.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, Default)]
pub struct Report {
    pub requests: usize,
    pub errors: usize,
    pub latencies_us: Vec<u64>,
}

impl Report {
    pub fn percentile(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let idx = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[idx]
    }
}

pub async fn run(url: &str, rate: u32, conns: u32, duration: Duration) -> anyhow::Result<Report> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().context("url needs host:port")?.clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let total = (duration.as_secs_f64() * f64::from(rate)) as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..u64::from(conns) {
        let (addr, uri, authority) = (addr.clone(), uri.clone(), authority.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut report = Report::default();
            let mut slot = c;
            let mut previous_done = start;
            while slot < total {
                let scheduled = start + interval.mul_f64(slot as f64);
                // Behind schedule because the previous response came late: that wait is part of
                // this request's latency (no coordinated omission). On schedule: sleep, and
                // measure from the real send, so the timer's 1 ms granularity is not charged.
                let measured_from = if previous_done > scheduled {
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled.into()).await;
                    Instant::now()
                };
                let req = http::Request::get(uri.path())
                    .header(http::header::HOST, authority.as_str())
                    .body(Empty::<bytes::Bytes>::new())?;
                let ok = match sender.send_request(req).await {
                    Ok(resp) => {
                        resp.status().is_success() && resp.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                previous_done = Instant::now();
                report.requests += 1;
                if ok {
                    report
                        .latencies_us
                        .push((previous_done - measured_from).as_micros() as u64);
                } else {
                    report.errors += 1;
                }
                slot += u64::from(conns);
            }
            Ok::<_, anyhow::Error>(report)
        }));
    }
    let mut all = Report::default();
    for t in tasks {
        let r = t.await??;
        all.requests += r.requests;
        all.errors += r.errors;
        all.latencies_us.extend(r.latencies_us);
    }
    all.latencies_us.sort_unstable();
    Ok(all)
}
