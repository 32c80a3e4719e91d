//! `strait-control-plane`: serves discovery to Strait proxies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use strait_api::identity::identity_server::IdentityServer;
use strait_api::shared::DiscoveryServer;
use strait_control_plane::admin::Metrics;
use strait_control_plane::control_tls::{AnchorSource, MtlsIo};
use strait_control_plane::discovery::DiscoveryService;
use strait_control_plane::identity::{
    install_server_certificate, keep_server_certificate, tls_incoming, IdentityService, Issuer,
};
use strait_control_plane::index::{MeshIndex, Naming, SidecarEvidence};
use strait_control_plane::local::identity::{ensure_ca, BootstrapTokens};
use strait_control_plane::local::LocalSource;
use strait_control_plane::tokens::Authenticator;
use strait_identity::tls::Credentials;
use strait_identity::SpiffeId;
use tokio::sync::watch;

/// The Strait control plane: mesh state from a directory of Kubernetes-style YAML (local mode)
/// or from the Kubernetes API (--kubernetes).
#[derive(Debug, Parser)]
#[command(name = "strait-control-plane", version)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config_dir", "kubernetes"])))]
struct Args {
    /// Local mode: directory of YAML documents (Service, EndpointSlice, Pod, routes,
    /// policies, token Secrets), rescanned continuously.
    #[arg(long, env = "STRAIT_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch the API server (in-cluster config, or KUBECONFIG).
    #[arg(long, env = "STRAIT_KUBERNETES")]
    kubernetes: bool,
    /// Kubernetes mode: the audience workload tokens must be minted for.
    #[arg(
        long,
        env = "STRAIT_TOKEN_AUDIENCE",
        default_value = "identity.strait.io"
    )]
    token_audience: String,
    /// Address of /live, /ready and /metrics.
    #[arg(long, env = "STRAIT_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    admin_addr: SocketAddr,
    /// Address of the discovery gRPC server: mTLS (proxies present their workload
    /// certificates) whenever the identity API is on, plaintext only with --plaintext or
    /// without an issuer.
    #[arg(long, env = "STRAIT_DISCOVERY_ADDR", default_value = "0.0.0.0:8086")]
    discovery_addr: SocketAddr,
    /// PEM bundle of the trust anchors that proxies' certificates chain to (re-read when it
    /// changes): what discovery verifies its callers against. Default: in local mode the
    /// state directory's anchors; otherwise the issuer certificate itself.
    #[arg(long, env = "STRAIT_TRUST_ANCHORS")]
    trust_anchors: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "STRAIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// DNS suffix of services.
    #[arg(long, env = "STRAIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Issuer certificate (PEM). With --issuer-key, enables the identity API.
    #[arg(long, env = "STRAIT_ISSUER_CERT", requires = "issuer_key")]
    issuer_cert: Option<PathBuf>,
    /// Issuer private key (PEM).
    #[arg(long, env = "STRAIT_ISSUER_KEY", requires = "issuer_cert")]
    issuer_key: Option<PathBuf>,
    /// Address of the identity gRPC server (TLS).
    #[arg(long, env = "STRAIT_IDENTITY_ADDR", default_value = "0.0.0.0:8080")]
    identity_addr: SocketAddr,
    /// DNS name in the identity server's certificate (what proxies check).
    #[arg(
        long,
        env = "STRAIT_IDENTITY_SERVER_NAME",
        default_value = "identity.strait-system.svc.cluster.local"
    )]
    identity_server_name: String,
    /// Lifetime of workload certificates (e.g. 24h, 20s); capped by the issuer's NotAfter.
    #[arg(long, env = "STRAIT_LEAF_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    leaf_lifetime: std::time::Duration,
    /// How often the config directory is rescanned (e.g. 250ms, 1s).
    #[arg(long, env = "STRAIT_POLL_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Local mode: where the control plane keeps its own trust anchor and issuer (created on
    /// first start when no --issuer-cert/--issuer-key is given) and the pods' bootstrap tokens.
    #[arg(long, env = "STRAIT_STATE_DIR", default_value = "/var/lib/strait")]
    state_dir: PathBuf,
    /// Local mode: no identity API and no local CA, so proxies cannot get certificates and the
    /// mesh runs in plaintext. Less safe; for debugging only.
    #[arg(long, env = "STRAIT_PLAINTEXT", conflicts_with_all = ["issuer_cert", "kubernetes"])]
    plaintext: bool,
    /// What a port no AuthorizationPolicy selects allows, for namespaces without the
    /// `strait.io/default-inbound-policy` annotation: all-unauthenticated,
    /// all-authenticated, cluster-authenticated or deny.
    #[arg(long, env = "STRAIT_DEFAULT_INBOUND_POLICY", default_value = "all-unauthenticated", value_parser = strait_control_plane::index::parse_default_policy)]
    default_inbound_policy: strait_api::discovery::DefaultPolicy,
    /// On SIGTERM: how long in-flight calls may take to finish before the process exits
    /// (discovery streams are closed at once; proxies reconnect to another replica).
    #[arg(long, env = "STRAIT_SHUTDOWN_GRACE_PERIOD", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace_period: Duration,
    /// OpenTelemetry collector (OTLP/gRPC, `http://host:4317`) for the control plane's own spans:
    /// discovery pushes, certificate issuance and its token check, Kubernetes watch batches.
    /// Unset: no traces, nothing installed.
    #[arg(long, env = "STRAIT_TRACE_COLLECTOR")]
    trace_collector: Option<String>,
    /// Runtime worker threads: discovery, identity and the Kubernetes watchers run on all of
    /// them, so a mesh rebuild or a burst of certificate requests cannot stall the others.
    #[arg(long, env = "STRAIT_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: u16,
    /// Share of the control plane's traces kept (0 to 1).
    #[arg(long, env = "STRAIT_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    trace_sample_ratio: f64,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.worker_threads))
        .thread_name("strait-cp")
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(serve(args)),
        Err(e) => {
            eprintln!("strait-control-plane: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn serve(args: Args) {
    // kube-client logs an ERROR for every failed request of a retrying watch; the watchers log
    // each outage once, with its cause.
    let traces = args
        .trace_collector
        .clone()
        .map(|collector| strait_admin::otel::Settings {
            collector,
            service_name: "strait-control-plane".into(),
            sample_ratio: args.trace_sample_ratio,
        });
    let guard =
        strait_admin::log::init_traced("info,kube_client::client::builder=off", traces.as_ref());
    let result = run(args).await;
    if let Some(guard) = guard {
        guard.flush(Duration::from_secs(2)).await;
    }
    if let Err(e) = result {
        eprintln!("strait-control-plane: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let naming = Naming {
        trust_domain: args.trust_domain.clone(),
        cluster_domain: args.cluster_domain.clone(),
        sidecars: if args.kubernetes {
            SidecarEvidence::InjectedPodsOnly
        } else {
            SidecarEvidence::UnlessOptedOut
        },
        default_inbound_policy: args.default_inbound_policy,
    };
    let (tx, rx) = watch::channel(Arc::new(MeshIndex::default()));
    let (ready_tx, ready) = watch::channel(false);
    // Local mode has identity by default: its own CA in --state-dir unless the operator
    // brings an issuer, and a bootstrap token per Pod document.
    let local_identity = args.config_dir.is_some() && !args.plaintext;
    let mut issuer_files = args.issuer_cert.clone().zip(args.issuer_key.clone());
    let mut anchors_file = args.trust_anchors.clone();
    if local_identity && issuer_files.is_none() {
        let ca = ensure_ca(&args.state_dir, &naming.trust_domain)?;
        anchors_file.get_or_insert(ca.anchors.clone());
        tracing::info!(
            anchors = %ca.anchors.display(),
            fingerprint = %ca.fingerprint,
            "{} the local trust anchor (proxies trust this file)",
            if ca.created { "created" } else { "reusing" }
        );
        issuer_files = Some((ca.issuer_cert, ca.issuer_key));
    }
    if args.plaintext {
        tracing::warn!("--plaintext: no identity API; every proxy runs without mTLS");
    }
    let (sourcing, tokens, source_name) = match &args.config_dir {
        Some(dir) => {
            let mut source = LocalSource::new(dir);
            if local_identity {
                source = source.with_bootstrap_tokens(BootstrapTokens::new(&args.state_dir)?);
            }
            source.scan()?; // fail fast on an unreadable directory
            let poll = args.poll_interval;
            let naming = naming.clone();
            // Subscribed before the source runs, so the first publish cannot be missed (a
            // receiver made later would wait for a second change that may never come).
            let mut first_publish = tx.subscribe();
            let task = tokio::spawn(async move {
                let ready = async {
                    // Ready once the first scan is published.
                    let _ = first_publish.changed().await;
                    ready_tx.send_replace(true);
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    r = source.run(naming, poll, tx.clone()) => r.map_err(|e| e.to_string()),
                    () = ready => Ok(()),
                }
            });
            (
                task,
                Authenticator::Local(rx.clone()),
                dir.display().to_string(),
            )
        }
        None => {
            let config = kube::Config::infer().await.map_err(|e| {
                format!("--kubernetes: cannot find the Kubernetes API: {e} (in a pod: is the ServiceAccount token mounted? elsewhere: set KUBECONFIG)")
            })?;
            let client = strait_control_plane::kubernetes::client(config).map_err(|e| {
                format!("--kubernetes: cannot configure the Kubernetes client: {e} (in a pod: is the ServiceAccount token mounted? elsewhere: set KUBECONFIG)")
            })?;
            let task = tokio::spawn({
                let (client, naming) = (client.clone(), naming.clone());
                async move {
                    strait_control_plane::kubernetes::run(client, naming, tx, ready_tx).await;
                    Ok::<(), String>(())
                }
            });
            let tokens = Authenticator::kubernetes(client, args.token_audience.clone());
            (task, tokens, "kubernetes".to_string())
        }
    };
    let admin = strait_admin::listen::listen("--admin-addr", args.admin_addr)?;
    let metrics = Arc::new(Metrics::default());
    // True from SIGTERM on: not ready, servers stop accepting, discovery streams end.
    let (stop_tx, stopping) = watch::channel(false);
    tokio::spawn(strait_control_plane::admin::serve(
        admin,
        metrics.clone(),
        rx.clone(),
        (ready, stopping.clone()),
    ));

    // With an issuer, the control channel is mTLS: this is its server side.
    let mut control_tls = None;
    let mut anchors_published = None;
    if let Some((cert, key)) = issuer_files {
        let issuer = Arc::new(Issuer::load(cert, key)?);
        let creds = Arc::new(Credentials::default());
        let server_id = SpiffeId::new(
            &naming.trust_domain,
            "strait-system",
            "strait-control-plane",
        )?;
        install_server_certificate(&issuer, &creds, &server_id, &args.identity_server_name)?;
        tokio::spawn(keep_server_certificate(
            issuer.clone(),
            creds.clone(),
            server_id,
            args.identity_server_name.clone(),
        ));
        let anchor_source = match &anchors_file {
            Some(path) => AnchorSource::File(path.clone()),
            None => AnchorSource::Issuer(issuer.clone()),
        };
        let anchors = anchor_source.load()?;
        let (published_tx, published_rx) = watch::channel(anchor_source.current_pem()?);
        anchors_published = Some(published_rx);
        tokio::spawn(anchor_source.watch(anchors.clone(), published_tx));
        control_tls = Some(strait_control_plane::control_tls::server_config(
            anchors,
            creds.clone(),
        )?);
        let service = IdentityService {
            tokens,
            metrics: metrics.clone(),
            issuer,
            trust_domain: naming.trust_domain.clone(),
            leaf_lifetime: args.leaf_lifetime,
            rate: Arc::new(strait_control_plane::limits::RateLimit::new(
                strait_control_plane::limits::CSR_BURST,
                strait_control_plane::limits::CSR_PER_SECOND,
            )),
        };
        let listener = strait_admin::listen::listen("--identity-addr", args.identity_addr)?;
        let config = Arc::new(strait_identity::tls::plain_server_config(creds)?);
        tracing::info!(addr = %args.identity_addr, lifetime = ?args.leaf_lifetime, "serving identity");
        let stopped = stopped(stopping.clone());
        tokio::spawn(async move {
            let server = strait_control_plane::limits::server()
                .add_service(IdentityServer::new(service))
                .serve_with_incoming_shutdown(tls_incoming(listener, config), stopped);
            if let Err(e) = server.await {
                tracing::error!(error = %e, "identity server failed");
            }
        });
    } else {
        tracing::info!("no --issuer-cert/--issuer-key: the identity API is off (plaintext mesh)");
    }

    let listener = strait_admin::listen::listen("--discovery-addr", args.discovery_addr)?;
    let discovery = DiscoveryService::new(rx, metrics.clone(), stopping.clone());
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>>>,
    > = match control_tls {
        Some(config) => {
            tracing::info!(addr = %args.discovery_addr, source = %source_name, "serving discovery over mTLS (callers authorized by SPIFFE ID)");
            let incoming = strait_control_plane::identity::accept_tls(
                listener,
                config,
                "discovery",
                MtlsIo::new,
            );
            Box::pin(
                strait_control_plane::limits::server()
                    .add_service(DiscoveryServer::new({
                        let d = discovery.requiring_identity(&naming.trust_domain);
                        match anchors_published {
                            Some(rx) => d.with_trust_anchors(rx),
                            None => d,
                        }
                    }))
                    .serve_with_incoming_shutdown(incoming, stopped(stopping)),
            )
        }
        None => {
            tracing::warn!(addr = %args.discovery_addr, source = %source_name, "serving discovery in plaintext, unauthenticated (no identity API)");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Box::pin(
                strait_control_plane::limits::server()
                    .add_service(DiscoveryServer::new(discovery))
                    .serve_with_incoming_shutdown(incoming, stopped(stopping)),
            )
        }
    };
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        r = sourcing => r??,
        () = strait_admin::shutdown_signal() => {
            tracing::info!(grace = ?args.shutdown_grace_period, "shutting down: not ready, closing discovery streams");
            stop_tx.send_replace(true);
            match tokio::time::timeout(args.shutdown_grace_period, server).await {
                Ok(r) => r?,
                Err(_) => tracing::warn!("calls still open after the grace period; exiting anyway"),
            }
        }
    }
    Ok(())
}

/// Resolves once `stopping` turns true.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}
