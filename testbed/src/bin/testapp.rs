//! `strait-testapp`: the workloads of the e2e tests, benchmarks and demo, servers and clients
//! for HTTP/1.1 + h2c, gRPC, WebSocket and raw TCP. Servers print `listening on <addr>` once
//! bound; clients print one result line per check for the tests to assert on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strait_testbed::app;

#[derive(Debug, Parser)]
#[command(name = "strait-testapp")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// HTTP/1.1 and h2c server: /, /echo, /bytes/N, /status/N, /delay/MS, /headers, /many-headers/N, /ws.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Added to every response (a slow replica).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Share of requests answered 503 (a flaky replica), 0 to 1.
        #[arg(long, default_value_t = 0.0)]
        fail_ratio: f64,
    },
    /// gRPC Echo server.
    Grpc {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
        /// Share of unary calls answered UNAVAILABLE (a flaky replica), 0 to 1.
        #[arg(long, default_value_t = 0.0)]
        fail_ratio: f64,
    },
    /// Server-speaks-first TCP: sends `text` on accept, then echoes.
    Banner {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        text: String,
    },
    /// Client-speaks-first TCP echo.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// gRPC client checks against an Echo server.
    GrpcClient {
        #[arg(long)]
        addr: String,
        #[command(subcommand)]
        call: app::grpc::Call,
    },
    /// WebSocket client: sends `messages` messages and checks each echo.
    WsClient {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10)]
        messages: u32,
    },
    /// TCP client: connects, optionally sends a line, prints the first line read and the time.
    TcpClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        send: Option<String>,
    },
    /// OpenTelemetry collector: prints each span received over OTLP/gRPC as a JSON line.
    OtlpCollector {
        #[arg(long)]
        listen: SocketAddr,
        /// Accept spans without printing them (for benchmarks).
        #[arg(long)]
        quiet: bool,
    },
    /// Bounded HTTP load: `rps` requests per second spread over `urls` for `duration`.
    Load {
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        #[arg(long, default_value_t = 20)]
        rps: u32,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Http {
            listen,
            name,
            delay_ms,
            fail_ratio,
        } => app::http::serve(listen, name, Duration::from_millis(delay_ms), fail_ratio).await,
        Cmd::Grpc {
            listen,
            name,
            fail_ratio,
        } => app::grpc::serve(listen, name, fail_ratio).await,
        Cmd::Banner { listen, text } => app::tcp::banner(listen, text).await,
        Cmd::Echo { listen } => app::tcp::echo(listen).await,
        Cmd::GrpcClient { addr, call } => app::grpc::client(addr, call).await,
        Cmd::WsClient { url, messages } => app::http::ws_client(&url, messages).await,
        Cmd::TcpClient { addr, send } => app::tcp::client(addr, send).await,
        Cmd::OtlpCollector { listen, quiet } => app::otlp::serve(listen, quiet).await,
        Cmd::Load {
            urls,
            rps,
            duration,
        } => app::load::run(urls, rps, duration).await,
    }
}
