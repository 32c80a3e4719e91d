//! `strait-injector`: the mutating admission webhook that adds the Strait sidecar to pods.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use strait_identity::tls::Credentials;
use strait_injector::config::InjectConfig;
use strait_injector::server::{self, Metrics, State};

#[derive(Debug, Parser)]
#[command(
    name = "strait-injector",
    version,
    about = "The Strait sidecar injection webhook"
)]
struct Args {
    /// HTTPS address of the webhook.
    #[arg(long, env = "STRAIT_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    webhook_addr: SocketAddr,
    /// Plaintext address of /live, /ready and /metrics.
    #[arg(long, env = "STRAIT_ADMIN_ADDR", default_value = "0.0.0.0:9995")]
    admin_addr: SocketAddr,
    /// Serving certificate chain (PEM), re-read when it changes.
    #[arg(long, env = "STRAIT_TLS_CERT")]
    tls_cert: PathBuf,
    /// Serving key (PEM, PKCS#8).
    #[arg(long, env = "STRAIT_TLS_KEY")]
    tls_key: PathBuf,
    #[command(flatten)]
    inject: InjectConfig,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    // The injector's own spans go where the proxies' do.
    let traces =
        args.inject
            .trace_collector
            .clone()
            .map(|collector| strait_admin::otel::Settings {
                collector,
                service_name: "strait-injector".into(),
                sample_ratio: 1.0,
            });
    let _guard = strait_admin::log::init_traced("info", traces.as_ref());
    if let Err(e) = run(args).await {
        eprintln!("strait-injector: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Fail at start, not at the first pod, when the anchors are unreadable.
    args.inject.read_anchors().map_err(|e| e.to_string())?;
    let creds = Arc::new(Credentials::default());
    server::load_certificate(creds.clone(), args.tls_cert.clone(), args.tls_key.clone()).await?;
    let tls = Arc::new(server::tls_config(creds.clone())?);
    let state = Arc::new(State {
        config: args.inject,
        metrics: Metrics::default(),
    });
    let webhook = strait_admin::listen::listen("--webhook-addr", args.webhook_addr)?;
    let admin = strait_admin::listen::listen("--admin-addr", args.admin_addr)?;
    tracing::info!(webhook = %args.webhook_addr, admin = %args.admin_addr, "serving");
    tokio::spawn(server::serve_admin(admin, state.clone(), creds));
    tokio::select! {
        () = server::serve_webhook(webhook, tls, state) => {}
        () = strait_admin::shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}
