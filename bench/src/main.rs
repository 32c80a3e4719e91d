//! `strait-bench`: the mesh against a direct connection, measured in the same run.
//!
//! Pods (network namespaces on a private bridge): `dclient` -> `dserver` (direct),
//! `pclient` -> [proxy] -> [proxy] -> `pserver` and `mclient` -> ... -> `mserver` (the mesh),
//! each server an nginx with one worker serving a 1 KiB body. Phases, on every path:
//! - HTTP/1.1 keep-alive max throughput: wrk -t1 -c16
//! - h2c max throughput: h2load -c4 -m10
//! - new client connections per second (wrk, `Connection: close`)
//! - latency at a fixed rate (2000 req/s over 8 connections), open loop
//!
//! The mesh is measured twice: plaintext HTTP/2 between the proxies, and mTLS (TLS 1.3) with
//! certificates from the control plane.
//!
//! with each proxy's CPU per request and RSS. Nothing asserts on time: this prints figures.

mod detection;
mod fixed_rate;
mod scale;
mod soak;
mod tcp_rr;

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use strait_testbed::{Net, Pod, Proc, ServiceDef, SidecarOpts};

#[derive(Debug, Parser)]
#[command(name = "strait-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Length of each phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rate of the fixed-rate latency phase (req/s).
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Proxy runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: u16,
    /// Tracing on in every proxy, sampling this share of requests, sending to a collector in
    /// the bridge namespace (unset: tracing off, the default deployment).
    #[arg(long)]
    trace_sample_ratio: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal: the fixed-rate load, run inside a client pod.
    FixedRate {
        #[arg(long)]
        url: String,
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value_t = 8)]
        conns: u32,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Mixed HTTP/1, h2c, gRPC and TCP load through the mesh for `duration`, printing each
    /// proxy's RSS and open descriptors every `interval` (they must stay flat).
    Soak {
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Holds `connections` idle client connections to one proxy and prints its memory per
    /// connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: u32,
    },
    /// Internal: opaque TCP request/response load, run inside a client pod.
    TcpRr {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value_t = 16)]
        conns: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// What protocol detection costs a new connection: server-speaks-first on an undeclared
    /// port (first and later connections), on an opaque port from an unmeshed client, and a
    /// client-first HTTP request; each against a direct connection.
    Detection {
        #[arg(long, default_value_t = 200)]
        connections: u32,
    },
    /// The control plane at scale: P simulated proxies (each its own connection and streams)
    /// on a generated mesh of S services x E endpoints and one big service; prints a series up
    /// to --proxies.
    ControlPlane {
        #[arg(long, default_value_t = 2000)]
        proxies: u32,
        #[arg(long, default_value_t = 1000)]
        services: u32,
        #[arg(long, default_value_t = 5)]
        endpoints: u32,
        /// Endpoints of the one big service (0: none).
        #[arg(long, default_value_t = 5000)]
        big_endpoints: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A benchmark's network lives as long as its phases (the tests' 120 s deadline would cut
    // it); every load in it is still bounded by its own duration.
    if std::env::var_os("STRAIT_TEST_DEADLINE").is_none() {
        std::env::set_var("STRAIT_TEST_DEADLINE", "2h");
    }
    match &cli.command {
        Some(Cmd::Soak { duration, interval }) => {
            return soak::soak((*duration).min(Duration::from_secs(3600)), *interval)
        }
        Some(Cmd::Idle { connections }) => return soak::idle((*connections).min(50_000)),
        Some(Cmd::Detection { connections }) => return detection::detection(*connections),
        Some(Cmd::ControlPlane {
            proxies,
            services,
            endpoints,
            big_endpoints,
        }) => {
            return scale::control_plane(scale::Args {
                proxies: (*proxies).clamp(1, 10_000),
                services: (*services).clamp(1, 8_000),
                endpoints: (*endpoints).clamp(1, 1_000),
                big_endpoints: (*big_endpoints).min(100_000),
            })
        }
        _ => {}
    }
    if let Some(Cmd::TcpRr {
        addr,
        conns,
        size,
        duration,
    }) = cli.command
    {
        let rt = current_thread()?;
        let o = rt.block_on(tcp_rr::run(
            addr,
            conns.clamp(1, 1024),
            size.clamp(1, 1 << 20),
            duration.min(Duration::from_secs(600)),
        ))?;
        println!("requests={} errors={}", o.requests, o.errors);
        return Ok(());
    }
    if let Some(Cmd::FixedRate {
        url,
        rate,
        conns,
        duration,
    }) = cli.command
    {
        let rt = current_thread()?;
        let r = rt.block_on(fixed_rate::run(&url, rate, conns, duration))?;
        println!(
            "requests={} errors={} p50_us={} p99_us={} p999_us={} max_us={}",
            r.requests,
            r.errors,
            r.percentile(0.5),
            r.percentile(0.99),
            r.percentile(0.999),
            r.latencies_us.last().copied().unwrap_or(0)
        );
        return Ok(());
    }
    bench(&cli)
}

const NGINX_CONF: &str = r#"worker_processes 1;
daemon off;
pid DIR/nginx-NAME.pid;
error_log DIR/nginx-NAME-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server { listen 8080; location / { root DIR/www; } }
  server { listen 8081 http2; http2_max_requests 10000000; location / { root DIR/www; } }
}
"#;

fn start_nginx(net: &Net, pod: &Pod) -> Result<Proc> {
    let dir = net.dir.to_string_lossy().to_string();
    let conf = net.dir.join(format!("nginx-{}.conf", pod.name));
    std::fs::write(
        &conf,
        NGINX_CONF.replace("DIR", &dir).replace("NAME", &pod.name),
    )?;
    let proc = net.spawn(pod, "nginx", &["nginx", "-c", &conf.to_string_lossy()])?;
    for _ in 0..100 {
        if net
            .exec(
                pod,
                &[
                    "curl",
                    "-sf",
                    "-o",
                    "/dev/null",
                    "http://127.0.0.1:8080/index.html",
                ],
            )
            .is_ok()
        {
            return Ok(proc);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nginx did not start: {}", net.logs())
}

/// CPU seconds used by a process so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn wrk(net: &Net, pod: &Pod, url: &str, d: Duration) -> Result<(f64, String)> {
    let out = net.exec(
        pod,
        &["wrk", "-t1", "-c16", &format!("-d{}s", d.as_secs()), url],
    )?;
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let errors = out
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .collect::<Vec<_>>()
        .join("; ");
    Ok((rps, errors))
}

fn h2load(net: &Net, pod: &Pod, url: &str, d: Duration) -> Result<(f64, String)> {
    let out = net.exec(
        pod,
        &["h2load", "-c4", "-m10", "-D", &d.as_secs().to_string(), url],
    )?;
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("no req/s in h2load output:\n{out}"))?;
    let requests = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("")
        .to_string();
    Ok((rps, requests))
}

fn fixed(
    net: &Net,
    pod: &Pod,
    url: &str,
    rate: u32,
    d: Duration,
) -> Result<(f64, f64, u64, String)> {
    let bin = std::env::current_exe()?;
    let out = net.exec(
        pod,
        &[
            &bin.to_string_lossy(),
            "fixed-rate",
            "--url",
            url,
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{}s", d.as_secs()),
        ],
    )?;
    let requests = field(&out, "requests").unwrap_or(0.0) as u64;
    Ok((
        field(&out, "p50_us").unwrap_or(0.0) / 1000.0,
        field(&out, "p99_us").unwrap_or(0.0) / 1000.0,
        requests,
        out.trim().to_string(),
    ))
}

/// The runtime a load command runs on (one thread, as the client of a benchmark).
fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The value of `name=<number>` in a load command's output.
fn field(out: &str, name: &str) -> Option<f64> {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Opaque TCP request/response per second (16 connections, 64-byte messages).
fn tcp_rr(net: &Net, pod: &Pod, addr: &str, d: Duration) -> Result<f64> {
    let bin = std::env::current_exe()?;
    let out = net.exec(
        pod,
        &[
            &bin.to_string_lossy(),
            "tcp-rr",
            "--addr",
            addr,
            "--duration",
            &format!("{}s", d.as_secs()),
        ],
    )?;
    if field(&out, "errors").unwrap_or(1.0) > 0.0 {
        bail!("tcp-rr to {addr} failed: {out}");
    }
    Ok(field(&out, "requests").unwrap_or(0.0) / d.as_secs_f64())
}

fn wrk_close(net: &Net, pod: &Pod, url: &str, d: Duration) -> Result<f64> {
    // Every request on a new client connection: the server side closes after each response.
    let out = net.exec(
        pod,
        &[
            "wrk",
            "-t1",
            "-c16",
            "-H",
            "Connection: close",
            &format!("-d{}s", d.as_secs()),
            url,
        ],
    )?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))
}

/// One way from a client pod to nginx.
struct Path {
    name: &'static str,
    client: Pod,
    h1: String,
    h2: String,
    /// An echo server's address, opaque TCP.
    tcp: String,
    proxies: Vec<Proc>,
}

#[derive(Default)]
struct Figures {
    h1: f64,
    h2: f64,
    conns: f64,
    tcp: f64,
    p50: f64,
    p99: f64,
    cpu_max: Vec<f64>,
    cpu_fixed: Vec<f64>,
    rss_idle: Vec<f64>,
    rss_load: Vec<f64>,
    errors: String,
}

fn cpu(procs: &[Proc]) -> Result<Vec<f64>> {
    procs.iter().map(|p| cpu_seconds(p.pid)).collect()
}

fn measure(net: &Net, path: &Path, cli: &Cli) -> Result<Figures> {
    let d = cli.duration;
    let mut f = Figures {
        rss_idle: path
            .proxies
            .iter()
            .map(|p| rss_mb(p.pid))
            .collect::<Result<_>>()?,
        ..Default::default()
    };
    eprintln!("[{}] HTTP/1.1 max throughput...", path.name);
    let before = cpu(&path.proxies)?;
    let (h1, h1_err) = wrk(net, &path.client, &path.h1, d)?;
    let after = cpu(&path.proxies)?;
    f.h1 = h1;
    f.cpu_max = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / (h1 * d.as_secs_f64()) * 1e6)
        .collect();
    eprintln!("[{}] h2c max throughput...", path.name);
    let (h2, h2_req) = h2load(net, &path.client, &path.h2, d)?;
    f.h2 = h2;
    eprintln!("[{}] new client connection per request...", path.name);
    f.conns = wrk_close(net, &path.client, &path.h1, d)?;
    eprintln!("[{}] opaque TCP request/response...", path.name);
    f.tcp = tcp_rr(net, &path.client, &path.tcp, d)?;
    eprintln!("[{}] latency at {} req/s...", path.name, cli.rate);
    let before = cpu(&path.proxies)?;
    let (p50, p99, requests, raw) = fixed(net, &path.client, &path.h1, cli.rate, d)?;
    let after = cpu(&path.proxies)?;
    f.p50 = p50;
    f.p99 = p99;
    f.cpu_fixed = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / (requests.max(1) as f64) * 1e6)
        .collect();
    f.rss_load = path
        .proxies
        .iter()
        .map(|p| rss_mb(p.pid))
        .collect::<Result<_>>()?;
    f.errors = format!("wrk [{h1_err}] h2load [{h2_req}] fixed-rate [{raw}]");
    Ok(f)
}

fn bench(cli: &Cli) -> Result<()> {
    let mesh = strait_e2e::Mesh::with_identity("bench", "24h")?;
    let net = &mesh.net;
    std::fs::create_dir_all(net.dir.join("www"))?;
    std::fs::write(net.dir.join("www/index.html"), "x".repeat(1024))?;
    let threads = cli.threads.to_string();
    let ratio = cli.trace_sample_ratio.map(|r| r.to_string());
    let mut env = vec![("STRAIT_THREADS", threads.as_str())];
    if let Some(ratio) = &ratio {
        let testapp = strait_testbed::bin("strait-testapp")?;
        let collector = net.spawn_in(
            &net.bridge_ns,
            "collector",
            None,
            &[
                &testapp.to_string_lossy(),
                "otlp-collector",
                "--listen",
                "10.88.0.1:4317",
                "--quiet",
            ],
            &[],
        )?;
        net.wait_log(&collector, "listening on", Duration::from_secs(10))?;
        env.extend([
            ("STRAIT_TRACE_COLLECTOR", "http://10.88.0.1:4317"),
            ("STRAIT_TRACE_SAMPLE_RATIO", ratio.as_str()),
        ]);
        println!("tracing on: sampling {ratio} of requests");
    }
    let opts = SidecarOpts {
        env,
        ..Default::default()
    };

    // Direct: no proxies.
    let dclient = net.pod("dclient")?;
    let dserver = net.pod("dserver")?;
    start_nginx(net, &dserver)?;
    // Plaintext mesh: sidecars without an identity (HTTP/2 between proxies, no TLS).
    let pclient = net.pod("pclient")?;
    let pserver = net.pod("pserver")?;
    start_nginx(net, &pserver)?;
    // Without identities this pair cannot use the mTLS control channel: it gets a control
    // plane of its own with no identity API (plaintext discovery), on the same config.
    let cp_bin = strait_testbed::bin("strait-control-plane")?;
    let config_dir = mesh.config.dir.to_string_lossy().to_string();
    let plain_state = net.dir.join("state-plain").to_string_lossy().to_string();
    let plain_cp = net.spawn_in(
        &net.bridge_ns,
        "control-plane-plain",
        None,
        &[
            &cp_bin.to_string_lossy(),
            "--config-dir",
            &config_dir,
            "--plaintext",
            "--state-dir",
            &plain_state,
            "--discovery-addr",
            "10.88.0.1:8087",
            "--admin-addr",
            "10.88.0.1:9991",
            "--poll-interval",
            "100ms",
        ],
        &[],
    )?;
    net.wait_log(&plain_cp, "serving discovery", Duration::from_secs(10))?;
    let mut plain_env = opts.env.clone();
    plain_env.push(("STRAIT_CONTROL_PLANE_ADDR", "10.88.0.1:8087"));
    let popts = SidecarOpts {
        env: plain_env,
        ..Default::default()
    };
    let pproxies = vec![
        net.start_sidecar(&pclient, &popts)?,
        net.start_sidecar(&pserver, &popts)?,
    ];
    // mTLS mesh: sidecars with identities.
    let mserver = mesh.pod_as("mserver", "nginx", &opts)?;
    start_nginx(net, &mserver)?;
    let mclient = mesh.pod_as("mclient", "client", &opts)?;
    let config = &mesh.config;
    config.service(&ServiceDef::new(
        "plain",
        "10.96.0.10",
        80,
        8080,
        &[&pserver],
    ))?;
    config.service(&ServiceDef::new(
        "plain-h2",
        "10.96.0.11",
        80,
        8081,
        &[&pserver],
    ))?;
    // Opaque TCP: an echo server behind each, declared opaque (no detection).
    let testapp = strait_testbed::bin("strait-testapp")?;
    let mut echoes = Vec::new();
    for pod in [&dserver, &pserver, &mserver] {
        let echo = net.spawn(
            pod,
            "echo",
            &[
                &testapp.to_string_lossy(),
                "echo",
                "--listen",
                "0.0.0.0:7000",
            ],
        )?;
        net.wait_log(&echo, "listening on", Duration::from_secs(10))?;
        echoes.push(echo);
    }
    for (name, ip, pod) in [
        ("plain-tcp", "10.96.0.12", &pserver),
        ("mtls-tcp", "10.96.0.22", &mserver),
    ] {
        config.service(&ServiceDef {
            opaque: true,
            ..ServiceDef::new(name, ip, 7000, 7000, &[pod])
        })?;
    }
    config.service(&ServiceDef::new(
        "mtls",
        "10.96.0.20",
        80,
        8080,
        &[&mserver],
    ))?;
    config.service(&ServiceDef::new(
        "mtls-h2",
        "10.96.0.21",
        80,
        8081,
        &[&mserver],
    ))?;
    let mproxies = vec![
        soak::proxy_of(&mesh, &mclient)?,
        soak::proxy_of(&mesh, &mserver)?,
    ];

    let paths = [
        Path {
            name: "direct",
            client: dclient,
            h1: format!("http://{}:8080/index.html", dserver.ip),
            h2: format!("http://{}:8081/index.html", dserver.ip),
            tcp: format!("{}:7000", dserver.ip),
            proxies: Vec::new(),
        },
        Path {
            name: "mesh (plaintext)",
            client: pclient,
            h1: "http://10.96.0.10/index.html".into(),
            h2: "http://10.96.0.11/index.html".into(),
            tcp: "10.96.0.12:7000".into(),
            proxies: pproxies,
        },
        Path {
            name: "mesh (mTLS)",
            client: mclient,
            h1: "http://10.96.0.20/index.html".into(),
            h2: "http://10.96.0.21/index.html".into(),
            tcp: "10.96.0.22:7000".into(),
            proxies: mproxies,
        },
    ];
    for p in &paths[1..] {
        // Warm up: discovery, pooled connections, certificates.
        for url in [&p.h1, &p.h2] {
            net.exec(
                &p.client,
                &[
                    "curl",
                    "-sf",
                    "-o",
                    "/dev/null",
                    "--http2-prior-knowledge",
                    url,
                ],
            )
            .ok();
            net.exec(&p.client, &["curl", "-sf", "-o", "/dev/null", url])
                .ok();
        }
    }
    let figures: Vec<Figures> = paths
        .iter()
        .map(|p| measure(net, p, cli))
        .collect::<Result<_>>()?;
    let d = &figures[0];

    println!(
        "# Strait benchmark ({} proxy thread(s), {}s phases)\n",
        cli.threads,
        cli.duration.as_secs()
    );
    println!("| measure | direct | mesh (plaintext) | / direct | mesh (mTLS) | / direct |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, get: &dyn Fn(&Figures) -> f64| {
        let (a, b, c) = (get(d), get(&figures[1]), get(&figures[2]));
        println!(
            "| {name} | {a:.0} | {b:.0} | {:.3} | {c:.0} | {:.3} |",
            b / a,
            c / a
        );
    };
    row("HTTP/1.1 max req/s (wrk -t1 -c16)", &|f| f.h1);
    row("h2c max req/s (h2load -c4 -m10)", &|f| f.h2);
    row(
        "new client connections/s (wrk -c16, Connection: close)",
        &|f| f.conns,
    );
    row("opaque TCP request/response/s (16 conns, 64 B)", &|f| f.tcp);
    let lat = |name: &str, get: &dyn Fn(&Figures) -> f64| {
        let (a, b, c) = (get(d), get(&figures[1]), get(&figures[2]));
        println!(
            "| {name} | {a:.3} | {b:.3} | +{:.3} ms | {c:.3} | +{:.3} ms |",
            b - a,
            c - a
        );
    };
    lat(&format!("p50 at {} req/s (ms)", cli.rate), &|f| f.p50);
    lat(&format!("p99 at {} req/s (ms)", cli.rate), &|f| f.p99);
    println!();
    println!("| proxy | CPU/request at max (us) | CPU/request at {} req/s (us) | RSS idle (MB) | RSS after load (MB) |", cli.rate);
    println!("|---|---|---|---|---|");
    for (f, path) in figures.iter().zip(&paths).skip(1) {
        for (i, side) in ["client side", "server side"].iter().enumerate() {
            println!(
                "| {} {side} | {:.1} | {:.1} | {:.1} | {:.1} |",
                path.name, f.cpu_max[i], f.cpu_fixed[i], f.rss_idle[i], f.rss_load[i]
            );
        }
    }
    println!();
    for (f, path) in figures.iter().zip(&paths) {
        println!("raw {}: {}", path.name, f.errors);
    }
    println!();
    println!("tcp_rr_direct {:.0}", d.tcp);
    println!("tcp_rr_mtls_vs_direct {:.3}", figures[2].tcp / d.tcp);
    println!("tcp_rr_plaintext_vs_direct {:.3}", figures[1].tcp / d.tcp);
    if cli.trace_sample_ratio.is_some() {
        // Whether export kept up: spans sent and dropped by each proxy of the mTLS path.
        for (pod, name) in [(&paths[2].client, "client"), (&mserver, "server")] {
            let text = net
                .exec(pod, &["curl", "-s", "http://127.0.0.1:4191/metrics"])
                .unwrap_or_default();
            let spans: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("strait_trace_spans"))
                .collect();
            println!("mTLS {name} proxy: {}", spans.join(", "));
        }
    }
    Ok(())
}
