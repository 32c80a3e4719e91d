//! Opaque TCP request/response load (what redis-benchmark or `pgbench -S` do to the mesh):
//! `conns` connections, each sending a `size`-byte request and waiting for the whole
//! `size`-byte echo before the next, for `duration`. Run inside a client pod against an echo
//! server; prints `requests=<n> errors=<n>`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
}

pub async fn run(addr: SocketAddr, conns: u32, size: usize, duration: Duration) -> Result<Outcome> {
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (requests, errors) = (requests.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let result = async {
                let mut stream = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(addr),
                )
                .await??;
                stream.set_nodelay(true)?;
                let request: Vec<u8> = (0..size).map(|i| (i as u8) ^ (c as u8)).collect();
                let mut reply = vec![0u8; size];
                while Instant::now() < deadline {
                    stream.write_all(&request).await?;
                    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply))
                        .await??;
                    if reply != request {
                        anyhow::bail!("the echo differs from the request");
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            if let Err(e) = result {
                eprintln!("connection {c}: {e:#}");
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(Outcome {
        requests: requests.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    })
}
