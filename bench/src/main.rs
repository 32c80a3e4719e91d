//! `strait-bench`: the mesh against a direct connection, measured in the same run.
//!
//! Pods (network namespaces on a private bridge): `dclient` -> `dserver` (direct), and
//! `mclient` -> [proxy] -> [proxy] -> `mserver` (the mesh), each server an nginx with one
//! worker serving a 1 KiB body. Phases, each run direct then meshed:
//! - HTTP/1.1 keep-alive max throughput: wrk -t1 -c16
//! - h2c max throughput: h2load -c4 -m10
//! - latency at a fixed rate (2000 req/s over 8 connections), open loop
//!
//! with each proxy's CPU per request and RSS. Nothing asserts on time: this prints figures.

mod fixed_rate;

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use strait_testbed::{MeshConfig, Net, Pod, Proc, ServiceDef, SidecarOpts};

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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::FixedRate {
        url,
        rate,
        conns,
        duration,
    }) = cli.command
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = rt.block_on(fixed_rate::run(&url, rate, conns, duration))?;
        println!(
            "requests={} errors={} p50_us={} p99_us={} max_us={}",
            r.requests,
            r.errors,
            r.percentile(0.5),
            r.percentile(0.99),
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
    let field = |name: &str| -> Option<f64> {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    let requests = field("requests").unwrap_or(0.0) as u64;
    Ok((
        field("p50_us").unwrap_or(0.0) / 1000.0,
        field("p99_us").unwrap_or(0.0) / 1000.0,
        requests,
        out.trim().to_string(),
    ))
}

struct Proxies<'a>(&'a [Proc]);

impl Proxies<'_> {
    fn cpu(&self) -> Result<Vec<f64>> {
        self.0.iter().map(|p| cpu_seconds(p.pid)).collect()
    }
    fn rss(&self) -> Result<Vec<f64>> {
        self.0.iter().map(|p| rss_mb(p.pid)).collect()
    }
}

fn bench(cli: &Cli) -> Result<()> {
    let d = cli.duration;
    let net = Net::new("bench")?;
    let config = MeshConfig::new(net.dir.join("config"))?;
    std::fs::create_dir_all(net.dir.join("www"))?;
    std::fs::write(net.dir.join("www/index.html"), "x".repeat(1024))?;
    net.start_control_plane(&config.dir)?;

    let dclient = net.pod("dclient")?;
    let dserver = net.pod("dserver")?;
    let mclient = net.pod("mclient")?;
    let mserver = net.pod("mserver")?;
    start_nginx(&net, &dserver)?;
    start_nginx(&net, &mserver)?;
    config.service(&ServiceDef::new(
        "nginx",
        "10.96.0.10",
        80,
        8080,
        &[&mserver],
    ))?;
    config.service(&ServiceDef::new(
        "nginx-h2",
        "10.96.0.11",
        80,
        8081,
        &[&mserver],
    ))?;
    let threads = cli.threads.to_string();
    let opts_ready = SidecarOpts {
        env: vec![("STRAIT_THREADS", threads.as_str())],
        ..Default::default()
    };
    let client_proxy = net.start_sidecar(&mclient, &opts_ready)?;
    let server_proxy = net.start_sidecar(&mserver, &opts_ready)?;
    let procs = [client_proxy, server_proxy];
    let proxies = Proxies(&procs);

    let direct_h1 = format!("http://{}:8080/index.html", dserver.ip);
    let direct_h2 = format!("http://{}:8081/index.html", dserver.ip);
    let mesh_h1 = "http://10.96.0.10/index.html".to_string();
    let mesh_h2 = "http://10.96.0.11/index.html".to_string();
    // Warm up: discovery, pooled connections.
    for url in [&mesh_h1, &mesh_h2] {
        net.exec(
            &mclient,
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
        net.exec(&mclient, &["curl", "-sf", "-o", "/dev/null", url])
            .ok();
    }
    let rss_idle = proxies.rss()?;

    eprintln!("HTTP/1.1 max throughput (wrk -t1 -c16, {d:?})...");
    let (d_h1, d_h1_err) = wrk(&net, &dclient, &direct_h1, d)?;
    let cpu0 = proxies.cpu()?;
    let (m_h1, m_h1_err) = wrk(&net, &mclient, &mesh_h1, d)?;
    let cpu1 = proxies.cpu()?;

    eprintln!("h2c max throughput (h2load -c4 -m10, {d:?})...");
    let (d_h2, d_h2_req) = h2load(&net, &dclient, &direct_h2, d)?;
    let (m_h2, m_h2_req) = h2load(&net, &mclient, &mesh_h2, d)?;

    eprintln!("latency at {} req/s (8 connections, {d:?})...", cli.rate);
    let (d_p50, d_p99, _, d_raw) = fixed(&net, &dclient, &direct_h1, cli.rate, d)?;
    let cpu2 = proxies.cpu()?;
    let (m_p50, m_p99, m_reqs, m_raw) = fixed(&net, &mclient, &mesh_h1, cli.rate, d)?;
    let cpu3 = proxies.cpu()?;
    let rss_load = proxies.rss()?;

    let cpu_per_req_max: Vec<f64> = (0..2)
        .map(|i| (cpu1[i] - cpu0[i]) / (m_h1 * d.as_secs_f64()) * 1e6)
        .collect();
    let cpu_per_req_fixed: Vec<f64> = (0..2)
        .map(|i| (cpu3[i] - cpu2[i]) / (m_reqs.max(1) as f64) * 1e6)
        .collect();

    println!(
        "# Strait benchmark ({} proxy thread(s), {}s phases)\n",
        cli.threads,
        d.as_secs()
    );
    println!("| measure | direct | mesh | mesh / direct |");
    println!("|---|---|---|---|");
    println!(
        "| HTTP/1.1 max req/s (wrk -t1 -c16) | {d_h1:.0} | {m_h1:.0} | {:.3} |",
        m_h1 / d_h1
    );
    println!(
        "| h2c max req/s (h2load -c4 -m10) | {d_h2:.0} | {m_h2:.0} | {:.3} |",
        m_h2 / d_h2
    );
    println!(
        "| p50 at {} req/s (ms) | {d_p50:.3} | {m_p50:.3} | +{:.3} ms |",
        cli.rate,
        m_p50 - d_p50
    );
    println!(
        "| p99 at {} req/s (ms) | {d_p99:.3} | {m_p99:.3} | +{:.3} ms |",
        cli.rate,
        m_p99 - d_p99
    );
    println!();
    println!("| proxy | CPU/request at max (us) | CPU/request at {} req/s (us) | RSS idle (MB) | RSS after load (MB) |", cli.rate);
    println!("|---|---|---|---|---|");
    for (i, name) in ["client-side (outbound)", "server-side (inbound)"]
        .iter()
        .enumerate()
    {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            cpu_per_req_max[i], cpu_per_req_fixed[i], rss_idle[i], rss_load[i]
        );
    }
    println!();
    println!("raw: wrk direct errors [{d_h1_err}] mesh errors [{m_h1_err}]");
    println!("raw: h2load direct [{d_h2_req}] mesh [{m_h2_req}]");
    println!("raw: fixed-rate direct [{d_raw}] mesh [{m_raw}]");
    Ok(())
}
