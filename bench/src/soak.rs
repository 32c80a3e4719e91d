//! Long runs outside the CI test suite: a mixed-load soak that prints each proxy's RSS and open
//! descriptors every interval, and the memory cost of idle client connections.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use strait_e2e::{Mesh, ServiceDef};
use strait_testbed::{Pod, Proc};

use crate::rss_mb;

/// The proxy process of `pod`.
pub fn proxy_of(mesh: &Mesh, pod: &Pod) -> Result<Proc> {
    let pids = strait_testbed::netns::sh("ip", &["netns", "pids", &pod.ns])?;
    for pid in pids.split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "strait-proxy" {
            return Ok(Proc {
                name: format!("{}-proxy", pod.name),
                pid: pid.parse()?,
                log: mesh.net.dir.join(format!("{}-proxy.log", pod.name)),
            });
        }
    }
    bail!("no proxy in {}", pod.name)
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Runs HTTP/1, h2c, gRPC and TCP load through a meshed client and server for `duration`,
/// printing RSS and descriptors of both proxies every `interval`.
pub fn soak(duration: Duration, interval: Duration) -> Result<()> {
    let mesh = Mesh::with_identity("soak", "24h")?;
    let net = &mesh.net;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    net.start_app(
        &server,
        "grpc",
        &["grpc", "--listen", "0.0.0.0:9000", "--name", "soak"],
    )?;
    net.start_app(&server, "echo", &["echo", "--listen", "0.0.0.0:7000"])?;
    mesh.config.service(&ServiceDef::new(
        "grpc",
        "10.96.0.20",
        9000,
        9000,
        &[&server],
    ))?;
    mesh.config.service(&ServiceDef::new(
        "echo",
        "10.96.0.30",
        7000,
        7000,
        &[&server],
    ))?;
    let client = mesh.meshed_pod("client")?;
    let proxies = [proxy_of(&mesh, &client)?, proxy_of(&mesh, &server)?];
    let testapp = strait_testbed::bin("strait-testapp")?;
    let testapp = testapp.to_string_lossy();
    let secs = duration.as_secs().max(1).to_string();
    // A command in a loop for the soak's length; prints `ok=N failed=M` at the end.
    let counts = net.dir.clone();
    let loop_for = |name: &str, cmd: &str| {
        let file = counts.join(format!("{name}.count"));
        let file = file.to_string_lossy();
        format!("timeout {secs} bash -c 'n=0; f=0; while :; do if {cmd} >/dev/null 2>&1; then n=$((n+1)); else f=$((f+1)); fi; echo \"ok=$n failed=$f\" > {file}; done'; cat {file}")
    };
    let loads = [
        net.spawn(
            &client,
            "http1",
            &[
                &testapp,
                "load",
                "--url",
                "http://10.96.0.10/",
                "--rps",
                "200",
                "--duration",
                &format!("{secs}s"),
            ],
        )?,
        net.spawn(
            &client,
            "h2c",
            &[
                "h2load",
                "-c2",
                "-m4",
                "--rps",
                "50",
                "-D",
                &secs,
                "http://10.96.0.10/",
            ],
        )?,
        net.spawn(
            &client,
            "grpc",
            &[
                "bash",
                "-c",
                &loop_for(
                    "grpc",
                    &format!(
                        "{testapp} grpc-client --addr http://10.96.0.20:9000 unary --message soak"
                    ),
                ),
            ],
        )?,
        net.spawn(
            &client,
            "tcp",
            &[
                "bash",
                "-c",
                &loop_for(
                    "tcp",
                    &format!("{testapp} tcp-client --addr 10.96.0.30:7000 --send PING"),
                ),
            ],
        )?,
    ];
    println!(
        "soak: HTTP/1 200 req/s, h2c 100 req/s, gRPC and TCP in loops, for {}",
        humantime::format_duration(duration)
    );
    println!(
        "{:>8}  {:>16}  {:>12}  {:>16}  {:>12}",
        "time", "client RSS MB", "client fds", "server RSS MB", "server fds"
    );
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let row: Vec<(f64, usize)> = proxies
            .iter()
            .map(|p| Ok((rss_mb(p.pid)?, fds(p.pid)?)))
            .collect::<Result<_>>()?;
        println!(
            "{:>7.0}s  {:>16.1}  {:>12}  {:>16.1}  {:>12}",
            start.elapsed().as_secs_f64(),
            row[0].0,
            row[0].1,
            row[1].0,
            row[1].1
        );
        samples.push(row);
        if start.elapsed() >= duration {
            break;
        }
        std::thread::sleep(interval.min(duration.saturating_sub(start.elapsed())));
    }
    for load in &loads {
        net.wait(load, Duration::from_secs(60))?;
        let out = net.output(load);
        let summary = out
            .lines()
            .filter(|l| {
                l.starts_with("sent=") || l.starts_with("ok=") || l.starts_with("requests:")
            })
            .collect::<Vec<_>>()
            .join(" ");
        println!("{}: {summary}", load.name);
    }
    // Flat: the last sample against the first after warm-up (the second sample).
    let base = samples.get(1).unwrap_or(&samples[0]);
    let last = samples.last().context("no samples")?;
    for (i, name) in ["client", "server"].iter().enumerate() {
        println!("soak_{name}_rss_growth_mb {:.1}", last[i].0 - base[i].0);
        println!(
            "soak_{name}_fd_growth {}",
            last[i].1 as i64 - base[i].1 as i64
        );
    }
    Ok(())
}

/// Holds `count` idle client connections to a meshed HTTP service through the client's proxy
/// and prints the proxy's memory per connection.
pub fn idle(count: u32) -> Result<()> {
    let mesh = Mesh::with_identity("idle", "24h")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod("client")?;
    // Warm the path (discovery, the pooled connection) so only the idle connections differ.
    mesh.curl(&client, &["http://10.96.0.10/"])?;
    let proxy = proxy_of(&mesh, &client)?;
    std::thread::sleep(Duration::from_secs(1));
    let before = (rss_mb(proxy.pid)?, fds(proxy.pid)?);
    let script = format!(
        "import socket, time, resource\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)\n\
         conns = []\n\
         for i in range({count}):\n\
         \x20   conns.append(socket.create_connection(('10.96.0.10', 80), timeout=10))\n\
         print('open', len(conns), flush=True)\n\
         time.sleep(20)\n"
    );
    let holder = mesh
        .net
        .spawn(&client, "idle", &["python3", "-c", &script])?;
    mesh.net
        .wait_log(&holder, "open", Duration::from_secs(120))
        .context("the idle connections did not open")?;
    // Past the speculation window: what is left is the cost of an idle connection.
    std::thread::sleep(Duration::from_secs(3));
    let held = (rss_mb(proxy.pid)?, fds(proxy.pid)?);
    let server_proxy = proxy_of(&mesh, &server)?;
    let server_fds = fds(server_proxy.pid)?;
    let per_conn_kb = (held.0 - before.0) * 1024.0 / f64::from(count);
    let m = mesh.metrics(&client)?;
    for line in m.lines().filter(|l| {
        l.starts_with("strait_protocol_speculation_total")
            || l.starts_with("strait_protocol_detect_total")
            || l.starts_with("strait_tcp_open_connections")
    }) {
        println!("  {line}");
    }
    println!(
        "{count} idle connections: client proxy RSS {:.1} -> {:.1} MB, fds {} -> {}; server proxy fds {}",
        before.0, held.0, before.1, held.1, server_fds
    );
    println!("idle_connections {count}");
    println!("idle_memory_per_connection_kb {per_conn_kb:.2}");
    println!("idle_upstream_fds_server {server_fds}");
    let _ = mesh.net.kill(&holder, nix::sys::signal::Signal::SIGTERM);
    Ok(())
}
