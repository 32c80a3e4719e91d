//! `strait-proxy`: `run` the sidecar, or `init` a pod's iptables rules.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait_proxy::config::ProxyConfig;
use strait_proxy::init::InitConfig;

#[derive(Debug, Parser)]
#[command(name = "strait-proxy", version, about = "The Strait sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<ProxyConfig>),
    /// Write (or with --cleanup remove) the pod's iptables redirect rules.
    Init(InitConfig),
    /// Wait until the local proxy is ready (the classic sidecar's postStart hook).
    AwaitReady(strait_proxy::await_ready::AwaitConfig),
}

fn main() -> ExitCode {
    strait_admin::log::init("info");
    match Cli::parse().command {
        Command::Init(cfg) => match strait_proxy::init::apply(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strait-proxy init: {e}");
                ExitCode::FAILURE
            }
        },
        Command::AwaitReady(cfg) => match strait_proxy::await_ready::run(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strait-proxy await-ready: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(cfg) => {
            let mut builder = if cfg.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(usize::from(cfg.threads));
                b
            };
            let runtime = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("strait-proxy: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(strait_proxy::run(*cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("strait-proxy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
