//! `strait`: the Strait command line.

mod check;
mod demo;
mod identity;
mod inject;
mod install;
mod stat;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "strait", version, about = "Strait service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a complete local mesh with demo services and a live table of their golden signals.
    Demo(demo::DemoArgs),
    /// Certificates: create a trust anchor and issuer, or rotate the issuer.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Print every manifest a Kubernetes cluster needs: `strait install | kubectl apply -f -`.
    Install(Box<install::InstallArgs>),
    /// Check that the mesh is installed and healthy in the current Kubernetes context.
    Check(check::CheckArgs),
    /// Live golden signals per service (requests/s, success rate, p50/p95/p99) from the proxies.
    Stat(stat::StatArgs),
    /// Add the sidecar to YAML manifests offline, as the webhook would (for GitOps).
    Inject(Box<inject::InjectArgs>),
    /// Internal: removes the demo's namespaces once stdin closes.
    #[command(hide = true)]
    Reap {
        #[arg(long)]
        prefix: String,
    },
}

fn main() -> ExitCode {
    strait_admin::log::init("warn");
    let result = match Cli::parse().command {
        Cmd::Demo(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(demo::run(args))),
        Cmd::Reap { prefix } => demo::reap(&prefix),
        Cmd::Identity(cmd) => identity::run(cmd),
        Cmd::Install(args) => install::run(&args),
        Cmd::Inject(args) => inject::run(&args),
        Cmd::Stat(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(stat::run(args))),
        Cmd::Check(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(check::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: {e:#}");
            ExitCode::FAILURE
        }
    }
}
