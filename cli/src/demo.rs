//! `strait demo`: a complete local mesh on this machine.
//!
//! The control plane serves the embedded `demo/mesh.yaml`; web-1, web-2 and api-1 each run in
//! their own network namespace with their sidecar and iptables rules; a client pod sends a
//! steady load; a live table shows each service's golden signals as the client's proxy sees
//! them. Ctrl-C, SIGTERM or `--duration` ends it and removes everything. If the demo itself is
//! killed, a reaper process (in its own session, so Ctrl-C does not reach it) notices its
//! parent is gone and removes the namespaces and the processes in them.

use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use strait_testbed::{netns, MeshConfig, Net, SidecarOpts};

use crate::stats;

const DEMO_CONFIG: &str = include_str!("../demo/mesh.yaml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Requests per second the client sends.
    #[arg(long, default_value_t = 40)]
    pub rps: u32,
    /// How often the table is refreshed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Prefix of the demo's namespace names.
    #[arg(long, default_value = "strait-demo", hide = true)]
    pub name: String,
}

fn need(program: &str, package: &str) -> Result<()> {
    if Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("`{program}` is missing: install the {package} package (scripts/demo.sh installs everything)");
    }
    Ok(())
}

/// Deletes every namespace named `<prefix>-*`, and the processes in them.
pub fn remove_namespaces(prefix: &str) -> usize {
    let mine: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    for ns in &mine {
        netns::delete_namespace(ns);
    }
    mine.len()
}

/// `strait reap`: waits for stdin to close (the demo exited or was killed), then cleans up.
pub fn reap(prefix: &str) -> Result<()> {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    let n = remove_namespaces(prefix);
    if n > 0 {
        eprintln!("strait: removed {n} namespaces left by the demo");
    }
    Ok(())
}

/// How long to wait before the next table. A table covers at least half an interval: when a
/// slow scrape has used up the time left, a last table over a few milliseconds would show rates
/// of noise, or of nothing.
fn next_wait(duration: Option<Duration>, elapsed: Duration, interval: Duration) -> Duration {
    match duration {
        Some(d) => d.saturating_sub(elapsed).clamp(interval / 2, interval),
        None => interval,
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if !strait_testbed::is_root() {
        bail!("strait demo creates network namespaces and iptables rules, which needs root: run it as root (e.g. with sudo)");
    }
    if args.interval < Duration::from_millis(200) {
        bail!(
            "--interval must be at least 200ms (got {:?}): each table scrapes the client's proxy",
            args.interval
        );
    }
    if args.rps == 0 {
        bail!("--rps must be at least 1: the demo's tables show live traffic");
    }
    need("ip", "iproute2")?;
    need("iptables", "iptables")?;
    need("curl", "curl")?;
    for bin in ["strait-proxy", "strait-control-plane", "strait-testapp"] {
        strait_testbed::bin(bin)?;
    }
    let stale = remove_namespaces(&args.name);
    if stale > 0 {
        eprintln!("removed {stale} namespaces left by an earlier demo");
    }
    // The reaper holds the read end of a pipe whose write end only this process holds.
    let mut reaper = Command::new(std::env::current_exe()?)
        .args(["reap", "--prefix", &args.name])
        .stdin(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the cleanup process")?;

    let result = run_mesh(&args).await;
    drop(reaper.stdin.take());
    let _ = reaper.wait();
    result
}

async fn run_mesh(args: &DemoArgs) -> Result<()> {
    let net = Net::with_prefix(args.name.clone())?;
    let config = MeshConfig::new(net.dir.join("config"))?;
    config.write("mesh.yaml", DEMO_CONFIG)?;
    println!(
        "starting the control plane (config: {})",
        config.dir.display()
    );
    let cp = net.start_control_plane(&config.dir)?;
    net.wait_log(&cp, "serving identity", Duration::from_secs(10))?;
    println!(
        "the control plane's own CA issues every pod a SPIFFE identity: mTLS between all pods \
         (anchors: {})",
        net.state_dir().join("ca/anchors.pem").display()
    );
    // Each pod's proxy gets its identity from a bootstrap token the control plane minted for
    // its Pod document (mesh.yaml has web-1, web-2 and api-1; the client's is written here).
    let with_identity = |pod: &strait_testbed::Pod, sa: &str, doc: bool| -> Result<()> {
        let env = net.local_identity(doc.then_some(&config), pod, "demo", sa)?;
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        net.start_sidecar(
            pod,
            &SidecarOpts {
                env,
                ..Default::default()
            },
        )?;
        Ok(())
    };
    for (name, sa) in [("web-1", "web"), ("web-2", "web"), ("api-1", "api")] {
        let pod = net.pod(name)?;
        with_identity(&pod, sa, false)?;
        net.start_app(
            &pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", name],
        )?;
        println!(
            "pod {name:<6} {:<11} app + sidecar ready, spiffe://cluster.local/ns/demo/sa/{sa}",
            pod.ip
        );
    }
    let client = net.pod("client")?;
    with_identity(&client, "client", true)?;
    let testapp = strait_testbed::bin("strait-testapp")?;
    let testapp = testapp.to_string_lossy();
    let load_for = format!("{}s", args.duration.map_or(3600, |d| d.as_secs() + 5));
    let rps = args.rps.to_string();
    let mut load = vec![
        testapp.as_ref(),
        "load",
        "--rps",
        &rps,
        "--duration",
        &load_for,
    ];
    // web gets most of the traffic; api is slower, and one call in ten fails.
    for url in [
        "http://10.96.0.10/",
        "http://10.96.0.10/",
        "http://10.96.0.10/",
        "http://10.96.0.10/",
        "http://10.96.0.20/delay/5",
        "http://10.96.0.20/delay/20",
        "http://10.96.0.20/",
        "http://10.96.0.20/",
        "http://10.96.0.20/",
        "http://10.96.0.20/status/500",
    ] {
        load.extend(["--url", url]);
    }
    net.spawn(&client, "load", &load)?;
    println!(
        "pod client {:<11} sending {} req/s to web and api\n",
        client.ip, args.rps
    );
    println!("Live golden signals from the client's proxy (Ctrl-C to stop):");

    let started = Instant::now();
    let mut previous = (stats::Scrape::new(), Instant::now());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let wait = next_wait(args.duration, started.elapsed(), args.interval);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let text = net.exec(
            &client,
            &[
                "curl",
                "-sS",
                "--max-time",
                "2",
                "-H",
                "Accept: application/openmetrics-text; version=1.0.0",
                "http://127.0.0.1:4191/metrics",
            ],
        );
        // A failed or cut scrape keeps the last good one as the base of the next table.
        let at = started.elapsed().as_secs_f64();
        match text {
            Ok(text) if stats::is_complete(&text) => {
                let scrape = stats::parse(&text, "outbound");
                let rows = stats::rows(&previous.0, &scrape, previous.1.elapsed().as_secs_f64());
                previous = (scrape, Instant::now());
                println!("--- {at:>5.0}s ---");
                print!("{}", stats::render(&rows, "SERVICE"));
            }
            Ok(_) => println!("--- {at:>5.0}s --- the client's proxy sent cut-short metrics"),
            Err(e) => println!("--- {at:>5.0}s --- cannot read the client's proxy metrics: {e:#}"),
        }
        std::io::stdout().flush().ok();
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    println!("stopping: removing the demo's namespaces and processes");
    drop(net);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_cover_an_interval_and_the_last_one_at_least_half() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(next_wait(None, s(100), s(2)), s(2));
        assert_eq!(next_wait(Some(s(5)), s(0), s(2)), s(2));
        assert_eq!(next_wait(Some(s(5)), ms(4500), s(2)), s(1));
        assert_eq!(next_wait(Some(s(5)), ms(3500), s(2)), ms(1500));
        // A slow scrape ran past the end: one more table, over half an interval.
        assert_eq!(next_wait(Some(s(5)), ms(5200), s(2)), s(1));
    }
}
