//! `strait`: the Strait command line.

mod demo;
mod identity;
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
    /// Internal: removes the demo's namespaces once stdin closes.
    #[command(hide = true)]
    Reap {
        #[arg(long)]
        prefix: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRAIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Cmd::Demo(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(demo::run(args))),
        Cmd::Reap { prefix } => demo::reap(&prefix),
        Cmd::Identity(cmd) => identity::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: {e:#}");
            ExitCode::FAILURE
        }
    }
}
