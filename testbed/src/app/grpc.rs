//! gRPC Echo server and client (tonic), for unary, server-streaming and bidirectional calls,
//! non-OK statuses and trailer metadata through the mesh.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strait.test.v1");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};

#[derive(Debug)]
struct Server {
    name: String,
    /// Share of unary calls answered UNAVAILABLE (a flaky replica), 0 to 1.
    fail_ratio: f64,
}

fn failure(code: i32) -> Status {
    let mut status = Status::new(Code::from_i32(code), format!("failure {code} requested"));
    status
        .metadata_mut()
        .insert("x-fail-reason", MetadataValue::from_static("requested"));
    status
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Server {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        if req.fail_code != 0 {
            return Err(failure(req.fail_code));
        }
        if self.fail_ratio > 0.0 && super::http::rand_unit() < self.fail_ratio {
            return Err(Status::unavailable(format!("{} is flaky", self.name)));
        }
        Ok(Response::new(EchoReply {
            message: req.message,
            served_by: self.name.clone(),
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        let name = self.name.clone();
        let replies = (0..req.count).map(move |seq| {
            Ok(EchoReply {
                message: format!("reply {seq}"),
                served_by: name.clone(),
                seq,
            })
        });
        let end = (req.fail_code != 0).then(|| Err(failure(req.fail_code)));
        Ok(Response::new(Box::pin(futures_util::stream::iter(
            replies.chain(end),
        ))))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let name = self.name.clone();
        let mut seq = 0;
        let replies = req.into_inner().map(move |m| {
            seq += 1;
            m.map(|m| EchoReply {
                message: m.message,
                served_by: name.clone(),
                seq,
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

pub async fn serve(listen: SocketAddr, name: String, fail_ratio: f64) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening on {listen}");
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Server { name, fail_ratio }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum Call {
    Unary {
        #[arg(long, default_value = "hello")]
        message: String,
        #[arg(long, default_value_t = 0)]
        fail_code: i32,
        /// Calls made one after the other on the channel, a line each.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    Stream {
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        fail_code: i32,
    },
    Chat {
        #[arg(long, default_value_t = 50)]
        count: u32,
    },
}

fn print_status(s: &Status) {
    let reason = s
        .metadata()
        .get("x-fail-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    println!(
        "status code={} message={:?} x-fail-reason={reason}",
        s.code() as i32,
        s.message()
    );
}

/// Runs one call and prints what came back. Exits non-zero only on transport failures.
pub async fn client(addr: String, call: Call) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(addr)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .context("connect")?;
    let mut client = EchoClient::new(channel);
    match call {
        Call::Unary {
            message,
            fail_code,
            repeat,
        } => {
            for _ in 0..repeat.clamp(1, 10_000) {
                let req = EchoRequest {
                    message: message.clone(),
                    fail_code,
                };
                match client.unary(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        println!("ok served_by={} message={}", r.served_by, r.message);
                    }
                    Err(s) => print_status(&s),
                }
            }
        }
        Call::Stream { count, fail_code } => {
            let mut stream = client
                .server_stream(StreamRequest { count, fail_code })
                .await?
                .into_inner();
            let mut received = 0u32;
            let end = loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        if r.seq != received {
                            anyhow::bail!("out of order: got {} expected {received}", r.seq);
                        }
                        received += 1;
                    }
                    Ok(None) => break None,
                    Err(s) => break Some(s),
                }
            };
            println!("received={received}");
            match end {
                Some(s) => print_status(&s),
                None => println!("status code=0"),
            }
        }
        Call::Chat { count } => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut replies = client
                .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            for i in 0..count {
                tx.send(EchoRequest {
                    message: format!("m{i}"),
                    fail_code: 0,
                })
                .await?;
                let r = replies.message().await?.context("stream ended early")?;
                if r.message != format!("m{i}") {
                    anyhow::bail!("chat mismatch at {i}: {}", r.message);
                }
            }
            drop(tx);
            while replies.message().await?.is_some() {}
            println!("chatted={count}");
        }
    }
    Ok(())
}
