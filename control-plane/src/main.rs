//! `strait-control-plane`: serves discovery to Strait proxies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use strait_api::discovery::discovery_server::DiscoveryServer;
use strait_control_plane::discovery::DiscoveryService;
use strait_control_plane::index::{MeshIndex, Naming};
use strait_control_plane::local::LocalSource;
use tokio::sync::watch;

/// The Strait control plane (local mode: state from a directory of Kubernetes-style YAML).
#[derive(Debug, Parser)]
#[command(name = "strait-control-plane", version)]
struct Args {
    /// Directory of YAML documents (Service, EndpointSlice, Pod), rescanned continuously.
    #[arg(long, env = "STRAIT_CONFIG_DIR")]
    config_dir: PathBuf,
    /// Address of the discovery gRPC server.
    #[arg(long, env = "STRAIT_DISCOVERY_ADDR", default_value = "0.0.0.0:8086")]
    discovery_addr: SocketAddr,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "STRAIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// DNS suffix of services.
    #[arg(long, env = "STRAIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// How often the config directory is rescanned (e.g. 250ms, 1s).
    #[arg(long, env = "STRAIT_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRAIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("strait-control-plane: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let naming = Naming {
        trust_domain: args.trust_domain,
        cluster_domain: args.cluster_domain,
    };
    let mut source = LocalSource::new(&args.config_dir);
    source.scan()?; // fail fast on an unreadable directory
    let (tx, rx) = watch::channel(Arc::new(MeshIndex::default()));
    let poll = args.poll_interval;
    let sourcing = tokio::spawn(source.run(naming, poll, tx));

    let listener = tokio::net::TcpListener::bind(args.discovery_addr)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on --discovery-addr {}: {e}",
                args.discovery_addr
            )
        })?;
    tracing::info!(addr = %args.discovery_addr, dir = %args.config_dir.display(), "serving discovery");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(DiscoveryService::new(rx)))
        .serve_with_incoming_shutdown(incoming, shutdown_signal());
    tokio::select! {
        r = server => r?,
        r = sourcing => r??,
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}
