//! `strait stat`: live golden signals (requests/s, success rate, p50/p95/p99) per service,
//! route, backend or identity, read from the proxies' `/metrics`: from the admin addresses
//! given (local mode), or from every meshed pod of the current Kubernetes context through the
//! API server's pod proxy. Rows come from the difference between two reads `--interval` apart.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::stats::{self, Scrape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Services as their callers' proxies see them.
    Outbound,
    /// Requests as the serving proxies see them.
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Target,
    Route,
    Backend,
    #[value(name = "client-id")]
    ClientId,
    #[value(name = "server-id")]
    ServerId,
    #[value(name = "src-workload")]
    SrcWorkload,
    #[value(name = "dst-workload")]
    DstWorkload,
}

impl By {
    /// The title of the table's first column.
    fn title(self) -> &'static str {
        match self {
            By::Target => "SERVICE",
            By::Route => "ROUTE",
            By::Backend => "BACKEND",
            By::ClientId => "CLIENT ID",
            By::ServerId => "SERVER ID",
            By::SrcWorkload => "CLIENT WORKLOAD",
            By::DstWorkload => "SERVER WORKLOAD",
        }
    }

    fn label(self) -> &'static str {
        match self {
            By::Target => "target",
            By::Route => "route",
            By::Backend => "backend",
            By::ClientId => "client_id",
            By::ServerId => "server_id",
            By::SrcWorkload => "src_workload",
            By::DstWorkload => "dst_workload",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatArgs {
    /// A proxy's admin address (`host:port`, repeatable). Without any: the meshed pods of the
    /// current Kubernetes context.
    #[arg(long = "proxy", value_name = "HOST:PORT")]
    proxies: Vec<String>,
    /// Kubernetes namespace of the pods to read (every namespace when unset).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Which proxies' view: `outbound` (callers) or `inbound` (servers).
    #[arg(long, value_enum, default_value_t = Direction::Outbound)]
    direction: Direction,
    /// Rows by: target (the service), route, backend, client-id, server-id, src-workload or
    /// dst-workload (no latency for identities and workloads: the latency histogram is by
    /// target, route and backend).
    #[arg(long, value_enum, default_value_t = By::Target)]
    by: By,
    /// Time between the two reads a table is computed from.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Keep printing a table every interval, until Ctrl-C (or --count tables).
    #[arg(long, short = 'w')]
    watch: bool,
    /// With --watch: stop after this many tables.
    #[arg(long)]
    count: Option<u32>,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Where the metrics come from.
enum Source {
    Direct(Vec<String>),
    Kubernetes {
        client: kube::Client,
        namespace: Option<String>,
    },
}

pub async fn run(args: StatArgs) -> Result<()> {
    if args.interval.is_zero() {
        bail!("--interval must be more than 0");
    }
    let source = if args.proxies.is_empty() {
        let client = kube::Client::try_default().await.context(
            "no --proxy given and no Kubernetes context: pass --proxy HOST:4191 for local mode",
        )?;
        Source::Kubernetes {
            client,
            namespace: args.namespace.clone(),
        }
    } else {
        Source::Direct(args.proxies.clone())
    };
    let direction = match args.direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    };
    // The time of a read is when its requests go out: proxies are read at once, so a slow one
    // delays the table, not the others' counters.
    let mut previous = (Instant::now(), read(&source, direction, args.by).await?);
    let mut printed = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
        let at = Instant::now();
        let now = read(&source, direction, args.by).await?;
        let rows = stats::rows(&previous.1, &now, (at - previous.0).as_secs_f64());
        previous = (at, now);
        match args.output {
            Output::Table => print!("{}", stats::render(&rows, args.by.title())),
            Output::Json => println!("{}", serde_json::to_string(&json_rows(&rows))?),
        }
        printed += 1;
        if !args.watch || args.count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
    }
}

fn json_rows(rows: &[stats::Row]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            serde_json::json!({"name": r.target, "rps": r.rps, "success_rate": r.success_rate,
                               "p50_ms": r.p50_ms, "p95_ms": r.p95_ms, "p99_ms": r.p99_ms})
        })
        .collect()
}

/// One read of every proxy (all at once), added up. Proxies that do not answer are named on
/// stderr; none answering is an error.
async fn read(source: &Source, direction: &str, by: By) -> Result<Scrape> {
    let mut reads = tokio::task::JoinSet::new();
    match source {
        Source::Direct(addrs) => {
            for addr in addrs {
                let addr = addr.clone();
                reads.spawn(async move {
                    let text = fetch(&addr).await;
                    (addr, text)
                });
            }
        }
        Source::Kubernetes { client, namespace } => {
            let pods: Api<Pod> = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let list = pods
                .list(&ListParams::default())
                .await
                .context("cannot list pods")?;
            for pod in list.items.iter().filter(|p| is_meshed(p)) {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                let name = pod.metadata.name.as_deref().unwrap_or("");
                let path = format!("/api/v1/namespaces/{ns}/pods/{name}:4191/proxy/metrics");
                // OpenMetrics: its `# EOF` tells a complete answer from a cut one.
                let request = http::Request::get(path)
                    .header(http::header::ACCEPT, strait_admin::exposition::OPENMETRICS)
                    .body(Vec::new())?;
                let client = client.clone();
                let who = format!("{ns}/{name}");
                reads.spawn(async move {
                    let read = client.request_text(request);
                    let text = match tokio::time::timeout(Duration::from_secs(3), read).await {
                        Ok(text) => text.map_err(anyhow::Error::from),
                        Err(_) => Err(anyhow::anyhow!("no answer within 3s")),
                    };
                    (who, text)
                });
            }
        }
    };
    let texts = reads.join_all().await;
    if texts.is_empty() {
        bail!("no meshed pods found (pods with a running strait-proxy container)");
    }
    let mut total = Scrape::new();
    let mut answered = 0;
    for (who, text) in texts {
        match text {
            Ok(text) if !stats::is_complete(&text) => {
                eprintln!("strait stat: the metrics of {who} were cut short (no `# EOF`)");
            }
            Ok(text) => {
                answered += 1;
                stats::merge(&mut total, stats::parse_by(&text, direction, by.label()));
            }
            Err(e) => eprintln!("strait stat: cannot read the metrics of {who}: {e:#}"),
        }
    }
    if answered == 0 {
        bail!("no proxy answered");
    }
    Ok(total)
}

/// A running pod with the sidecar (a native sidecar is an init container).
fn is_meshed(pod: &Pod) -> bool {
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    let spec = pod.spec.as_ref();
    let has_proxy = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == "strait-proxy")
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == "strait-proxy")
    });
    running && has_proxy
}

/// `GET http://addr/metrics`, with a 3 s limit.
async fn fetch(addr: &str) -> Result<String> {
    let get = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::get("/metrics")
            .header(http::header::HOST, addr)
            .header(http::header::ACCEPT, strait_admin::exposition::OPENMETRICS)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            bail!("{addr}/metrics answered {}", resp.status());
        }
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .with_context(|| format!("{addr} did not answer within 3s"))?
}
