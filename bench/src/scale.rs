//! `strait-bench control-plane`: the real control plane (local mode, on loopback) serving a
//! generated mesh of S services x E endpoints (and one service of 5,000 endpoints) to P
//! simulated proxies in this process. Each proxy is its own HTTP/2 connection from its own
//! loopback address, with the streams a proxy opens: `Watch` on 5 services (every tenth proxy
//! also on the big one) and `WatchInbound` for its identity. Discovery is plaintext here
//! (`--plaintext`): the benchmark measures the push path, not TLS.
//!
//! For each P of the series it prints: time until every stream had its first answer; the
//! propagation of a single endpoint change (a small service and the big one) to every stream
//! that watches it (p50/p99/max, from the file write, so including the directory rescan, every
//! 50 ms here); a burst of 100 changes within 1 s until every stream has converged; control
//! plane CPU per change and in steady state; its RSS; the bytes pushed per change. Ends with
//! `<key> <value>` lines for the largest P. Nothing asserts.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use prost::Message as _;
use strait_api::discovery::destination_update::Update;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{InboundRequest, WatchRequest};

const DISCOVERY: &str = "127.0.0.1:18086";
const ADMIN: &str = "127.0.0.1:19990";
const NS: &str = "scale";
const WATCHES: u32 = 5;
const BIG: &str = "big";

#[derive(Debug, Clone, Copy)]
pub struct Args {
    pub proxies: u32,
    pub services: u32,
    pub endpoints: u32,
    pub big_endpoints: u32,
}

/// One stream's view: when it got its first answer, how many answers, the latest one's marker
/// endpoint (the first endpoint's address), and the bytes received.
#[derive(Debug, Default)]
struct StreamState {
    first: Option<Instant>,
    answers: u64,
    marker: String,
    last_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Observed {
    /// Per watched service: its streams.
    by_service: Mutex<HashMap<String, Vec<Arc<Mutex<StreamState>>>>>,
    all: Mutex<Vec<Arc<Mutex<StreamState>>>>,
    bytes: AtomicU64,
    errors: AtomicU64,
}

fn service_name(i: u32) -> String {
    format!("svc-{i}")
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i + 1)
}

fn endpoint_ip(service: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + service * 8192 + j + 1)
}

/// The service's file: Service + EndpointSlice; `marker` replaces the first endpoint's
/// address (a change).
fn service_yaml(name: &str, ip: Ipv4Addr, endpoints: &[Ipv4Addr], sa: &str) -> String {
    let mut eps = String::new();
    for ip in endpoints {
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-slice\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: {name}}}\n  annotations: {{strait.io/service-account: {sa}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n{eps}"
    )
}

fn write_service(dir: &Path, i: u32, endpoints: u32, marker: Option<Ipv4Addr>) -> Result<()> {
    let mut eps: Vec<Ipv4Addr> = (0..endpoints).map(|j| endpoint_ip(i, j)).collect();
    if let (Some(m), Some(first)) = (marker, eps.first_mut()) {
        *first = m;
    }
    let name = service_name(i);
    let text = service_yaml(&name, cluster_ip(i), &eps, &format!("sa-{}", i % 50));
    // Written whole, then renamed: the rescan never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.yaml")))?;
    Ok(())
}

fn write_big(dir: &Path, endpoints: u32, marker: Option<Ipv4Addr>) -> Result<()> {
    let mut eps: Vec<Ipv4Addr> = (0..endpoints)
        .map(|j| Ipv4Addr::from(0x0b00_0000 + j + 1))
        .collect();
    if let (Some(m), Some(first)) = (marker, eps.first_mut()) {
        *first = m;
    }
    let text = service_yaml(BIG, Ipv4Addr::new(10, 97, 0, 1), &eps, "sa-big");
    let tmp = dir.join(".big.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("big.yaml"))?;
    Ok(())
}

fn cpu_seconds(pid: u32) -> f64 {
    crate::cpu_seconds(pid).unwrap_or(0.0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Opens one simulated proxy's streams; each stream records into `observed`.
async fn proxy(i: u32, args: Args, observed: Arc<Observed>) -> Result<()> {
    let local = Ipv4Addr::new(127, 1 + (i / 200) as u8, 0, 1 + (i % 200) as u8);
    let server: SocketAddr = DISCOVERY.parse()?;
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:18086")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(tower::service_fn(move |_uri| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((local, 0)))?;
            let stream = socket.connect(server).await?;
            let _ = stream.set_nodelay(true);
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }));
    let client = DiscoveryClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut targets: Vec<String> = (0..WATCHES)
        .map(|k| {
            let s = (i.wrapping_mul(7) + k * 131) % args.services;
            format!("{}.{NS}.svc.cluster.local:80", service_name(s))
        })
        .collect();
    if i.is_multiple_of(10) && args.big_endpoints > 0 {
        targets.push(format!("{BIG}.{NS}.svc.cluster.local:80"));
    }
    let proxy_name = format!("{NS}/proxy-{i}");
    for target in targets {
        let state = Arc::new(Mutex::new(StreamState::default()));
        let service = target.split('.').next().unwrap_or_default().to_string();
        lock(&observed.by_service)
            .entry(service)
            .or_default()
            .push(state.clone());
        lock(&observed.all).push(state.clone());
        let mut client = client.clone();
        let observed = observed.clone();
        let proxy_name = proxy_name.clone();
        tokio::spawn(async move {
            let stream = client
                .watch(WatchRequest {
                    target,
                    proxy: proxy_name,
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    observed.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            while let Ok(Some(answer)) = stream.message().await {
                let now = Instant::now();
                observed
                    .bytes
                    .fetch_add(answer.encoded_len() as u64, Ordering::Relaxed);
                // A change marks one endpoint with an address in 10.250.0.0/15 or 10.252.0.0/16
                // (no generated endpoint has one; services 200-207 have 10.25.x.x ones, so
                // the octet is compared, not a text prefix).
                let marker = match &answer.update {
                    Some(Update::Destination(d)) => d
                        .endpoints
                        .iter()
                        .find(|e| is_marker(&e.ip))
                        .map(|e| e.ip.clone())
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                let mut s = lock(&state);
                s.first.get_or_insert(now);
                s.answers += 1;
                s.marker = marker;
                s.last_at = Some(now);
            }
        });
    }
    let mut client = client.clone();
    let observed_inbound = observed.clone();
    tokio::spawn(async move {
        let identity = format!("spiffe://cluster.local/ns/{NS}/sa/sa-{}", i % 50);
        match client
            .watch_inbound(InboundRequest {
                identity,
                proxy: proxy_name,
            })
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                while let Ok(Some(p)) = s.message().await {
                    observed_inbound
                        .bytes
                        .fetch_add(p.encoded_len() as u64, Ordering::Relaxed);
                }
            }
            Err(_) => {
                observed_inbound.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(())
}

/// A change's marker address: 10.250.x.x to 10.252.x.x.
fn is_marker(ip: &str) -> bool {
    ip.parse::<Ipv4Addr>()
        .is_ok_and(|ip| matches!(ip.octets(), [10, 250..=252, _, _]))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until every stream of `services` shows its service's `marker` (or `timeout`);
/// returns each stream's delay from `t0`.
async fn propagation(
    observed: &Observed,
    markers: &HashMap<String, String>,
    t0: Instant,
    timeout: Duration,
) -> (Vec<f64>, usize) {
    let deadline = Instant::now() + timeout;
    loop {
        let (delays, missing) = {
            let by = lock(&observed.by_service);
            let mut delays = Vec::new();
            let mut missing = 0;
            for (service, marker) in markers {
                for s in by.get(service).map(Vec::as_slice).unwrap_or_default() {
                    let s = lock(s);
                    match (s.marker == *marker, s.last_at) {
                        (true, Some(at)) => delays.push(at.duration_since(t0).as_secs_f64() * 1e3),
                        _ => missing += 1,
                    }
                }
            }
            (delays, missing)
        };
        if missing == 0 || Instant::now() > deadline {
            return (delays, missing);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Run {
    first_answer_ms: f64,
    streams: usize,
    errors: u64,
    small_p50: f64,
    small_p99: f64,
    small_max: f64,
    big_p50: f64,
    big_p99: f64,
    big_max: f64,
    burst_converged_ms: f64,
    burst_missing: usize,
    cpu_steady_cores: f64,
    cpu_per_change_ms: f64,
    cpu_big_change_ms: f64,
    bytes_per_change: f64,
    bytes_big_change: f64,
    rss_mb: f64,
}

fn run_one(bin: &Path, dir: &Path, args: Args) -> Result<Run> {
    let state = dir.join("state");
    let mut cp = std::process::Command::new(bin)
        .args(["--config-dir", &dir.to_string_lossy()])
        .args(["--state-dir", &state.to_string_lossy()])
        .args([
            "--plaintext",
            "--discovery-addr",
            DISCOVERY,
            "--admin-addr",
            ADMIN,
        ])
        .args(["--poll-interval", "50ms"])
        .env("STRAIT_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("control-plane.log"))?)
        .spawn()
        .context("starting strait-control-plane")?;
    let pid = cp.id();
    let result = (|| -> Result<Run> {
        // Two workers, as the machine's cores: a real proxy decodes its answer on its own CPU,
        // so the simulated ones should not all wait for one thread.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(measure(pid, dir, args))
    })();
    let _ = cp.kill();
    let _ = cp.wait();
    result
}

async fn ready() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(ADMIN).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the control plane was not ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn measure(pid: u32, dir: &Path, args: Args) -> Result<Run> {
    ready().await?;
    let observed = Arc::new(Observed::default());
    let start = Instant::now();
    for i in 0..args.proxies {
        proxy(i, args, observed.clone()).await?;
    }
    // Every stream's first answer.
    let streams = lock(&observed.all).len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_answer_ms = loop {
        let firsts: Vec<Instant> = lock(&observed.all)
            .iter()
            .filter_map(|s| lock(s).first)
            .collect();
        if firsts.len() == streams {
            break firsts
                .iter()
                .map(|t| t.duration_since(start).as_secs_f64() * 1e3)
                .fold(0.0, f64::max);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {streams} streams answered in 120 s",
                firsts.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Steady state: nothing changes for 5 s.
    let c0 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu_steady_cores = (cpu_seconds(pid) - c0) / 5.0;

    // Single changes: five watched small services, one at a time.
    let mut small = Vec::new();
    let mut cpu_small = Vec::new();
    let mut bytes_small = Vec::new();
    let mut watched: Vec<u32> = lock(&observed.by_service)
        .keys()
        .filter_map(|k| k.strip_prefix("svc-")?.parse().ok())
        .collect();
    watched.sort_unstable();
    let window = 0.3;
    for k in 0..5u32 {
        let service = watched[(k as usize * 37) % watched.len().max(1)];
        let marker = Ipv4Addr::new(10, 250, 0, 1 + k as u8);
        let (c, b) = (cpu_seconds(pid), observed.bytes.load(Ordering::Relaxed));
        let t0 = Instant::now();
        write_service(dir, service, args.endpoints, Some(marker))?;
        let markers = HashMap::from([(service_name(service), marker.to_string())]);
        let (mut d, _) = propagation(&observed, &markers, t0, Duration::from_secs(10)).await;
        small.append(&mut d);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Above the steady state's share of the window.
        let spent = cpu_seconds(pid) - c - cpu_steady_cores * t0.elapsed().as_secs_f64();
        cpu_small.push(spent.max(0.0) * 1e3);
        bytes_small.push((observed.bytes.load(Ordering::Relaxed) - b) as f64);
    }
    // The big service.
    let mut big = Vec::new();
    let (c, b) = (cpu_seconds(pid), observed.bytes.load(Ordering::Relaxed));
    if args.big_endpoints > 0 {
        let marker = Ipv4Addr::new(10, 251, 0, 1);
        let t0 = Instant::now();
        write_big(dir, args.big_endpoints, Some(marker))?;
        let markers = HashMap::from([(BIG.to_string(), marker.to_string())]);
        big = propagation(&observed, &markers, t0, Duration::from_secs(20))
            .await
            .0;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cpu_big_change_ms =
        ((cpu_seconds(pid) - c - cpu_steady_cores * (window + 0.1)).max(0.0)) * 1e3;
    let bytes_big_change = (observed.bytes.load(Ordering::Relaxed) - b) as f64;

    // A burst: 100 services changed over 1 s.
    let mut markers = HashMap::new();
    let t0 = Instant::now();
    for k in 0..100u32.min(watched.len() as u32) {
        let service = watched[(k as usize * 13 + 1) % watched.len()];
        let marker = Ipv4Addr::new(10, 252, (k / 250) as u8, 1 + (k % 250) as u8);
        write_service(dir, service, args.endpoints, Some(marker))?;
        markers.insert(service_name(service), marker.to_string());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (burst, burst_missing) =
        propagation(&observed, &markers, t0, Duration::from_secs(30)).await;
    let burst_converged_ms = burst.iter().copied().fold(0.0, f64::max);

    let rss_mb = crate::rss_mb(pid).unwrap_or(0.0);
    Ok(Run {
        first_answer_ms,
        streams: streams + args.proxies as usize,
        errors: observed.errors.load(Ordering::Relaxed),
        small_p50: percentile(&mut small.clone(), 0.5),
        small_p99: percentile(&mut small.clone(), 0.99),
        small_max: small.iter().copied().fold(0.0, f64::max),
        big_p50: percentile(&mut big.clone(), 0.5),
        big_p99: percentile(&mut big.clone(), 0.99),
        big_max: big.iter().copied().fold(0.0, f64::max),
        burst_converged_ms,
        burst_missing,
        cpu_steady_cores,
        cpu_per_change_ms: percentile(&mut cpu_small, 0.5),
        cpu_big_change_ms,
        bytes_per_change: percentile(&mut bytes_small, 0.5),
        bytes_big_change,
        rss_mb,
    })
}

pub fn control_plane(args: Args) -> Result<()> {
    // A connection per simulated proxy on both sides: raise the descriptor limit to the hard
    // one (the control plane inherits it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let bin = strait_testbed::bin("strait-control-plane")?;
    let dir: PathBuf = std::env::temp_dir().join(format!("strait-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for i in 0..args.services {
        write_service(&dir, i, args.endpoints, None)?;
    }
    if args.big_endpoints > 0 {
        write_big(&dir, args.big_endpoints, None)?;
    }
    // The series up to --proxies.
    let series: Vec<u32> = [100, 500, 1000, 2000, 5000]
        .into_iter()
        .filter(|p| *p < args.proxies)
        .chain([args.proxies])
        .collect();
    println!(
        "mesh: {} services x {} endpoints + one of {}; per proxy {} Watch streams (+1 on the big service for every tenth) and 1 WatchInbound; rescan every 50 ms",
        args.services, args.endpoints, args.big_endpoints, WATCHES
    );
    println!("| proxies | streams | first answer, all (ms) | change p50 / p99 / max (ms) | big-service change p50 / p99 / max (ms) | burst of 100 converged (ms) | CPU steady (cores) | CPU per change (ms) | CPU big change (ms) | bytes per change | bytes big change | RSS (MB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut last = None;
    let mut rss = Vec::new();
    let first_p = series[0];
    for p in series {
        // Fresh files for each run: every run starts from the same mesh.
        for i in 0..args.services {
            write_service(&dir, i, args.endpoints, None)?;
        }
        if args.big_endpoints > 0 {
            write_big(&dir, args.big_endpoints, None)?;
        }
        let _ = std::fs::remove_dir_all(dir.join("state"));
        let run = run_one(&bin, &dir, Args { proxies: p, ..args })?;
        print_row(&p.to_string(), &run);
        rss.push((p, run.rss_mb));
        last = Some((p, run));
    }
    // Memory against S: the smallest P again, on twice the services.
    let doubled = Args {
        proxies: first_p,
        services: args.services * 2,
        ..args
    };
    for i in 0..doubled.services {
        write_service(&dir, i, args.endpoints, None)?;
    }
    if args.big_endpoints > 0 {
        write_big(&dir, args.big_endpoints, None)?;
    }
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let per_service = if args.services > 0 {
        let run = run_one(&bin, &dir, doubled)?;
        print_row(&format!("{first_p} ({} services)", doubled.services), &run);
        let base = rss.first().map_or(0.0, |(_, mb)| *mb);
        Some((run.rss_mb - base) * 1024.0 / f64::from(args.services))
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    if let Some((p, run)) = last {
        println!();
        println!("proxies {p}");
        println!("first_answer_all_ms {:.0}", run.first_answer_ms);
        let p99 = run.small_p99.max(if run.big_p99.is_nan() {
            0.0
        } else {
            run.big_p99
        });
        println!("propagation_p99_ms {p99:.0}");
        println!("propagation_max_ms {:.0}", run.small_max.max(run.big_max));
        println!("burst_converged_ms {:.0}", run.burst_converged_ms);
        println!("cp_cpu_steady_cores {:.3}", run.cpu_steady_cores);
        println!("cp_cpu_per_change_ms {:.1}", run.cpu_per_change_ms);
        println!("cp_rss_mb {:.1}", run.rss_mb);
        if let (Some(a), Some(b)) = (rss.first(), rss.last()) {
            if b.0 > a.0 {
                println!(
                    "cp_rss_kb_per_proxy {:.1}",
                    (b.1 - a.1) * 1024.0 / f64::from(b.0 - a.0)
                );
            }
        }
        if let Some(kb) = per_service {
            println!("cp_rss_kb_per_service {kb:.1}");
        }
    }
    Ok(())
}

/// One line of the table.
fn print_row(label: &str, run: &Run) {
    println!(
        "| {label} | {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.0}{} | {:.3} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} |",
        run.streams,
        run.first_answer_ms,
        run.small_p50,
        run.small_p99,
        run.small_max,
        run.big_p50,
        run.big_p99,
        run.big_max,
        run.burst_converged_ms,
        if run.burst_missing > 0 {
            format!(" ({} streams not converged)", run.burst_missing)
        } else {
            String::new()
        },
        run.cpu_steady_cores,
        run.cpu_per_change_ms,
        run.cpu_big_change_ms,
        run.bytes_per_change,
        run.bytes_big_change,
        run.rss_mb,
    );
    if run.errors > 0 {
        println!("({} streams were refused)", run.errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_change_markers_are_markers() {
        assert!(is_marker("10.250.0.1"));
        assert!(is_marker("10.252.0.7"));
        // Service 200's generated endpoints: 10.25.0.x.
        assert!(!is_marker(&endpoint_ip(200, 0).to_string()));
        assert!(!is_marker("10.253.0.1"));
        assert!(!is_marker("not-an-ip"));
    }
}
