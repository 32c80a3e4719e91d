//! Raw TCP workloads: a server-speaks-first banner server, a client-first echo server (both
//! print `accepted <peer>` per connection), and a client that measures the time to the first
//! reply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub async fn banner(listen: SocketAddr, text: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening on {listen}");
    loop {
        let (mut stream, peer) = listener.accept().await?;
        println!("accepted {peer}");
        let text = text.clone();
        tokio::spawn(async move {
            if stream
                .write_all(format!("{text}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

pub async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening on {listen}");
    loop {
        let (mut stream, peer) = listener.accept().await?;
        println!("accepted {peer}");
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Prints `reply=<first line> elapsed_ms=<time from connect to that line>`, then (with `send`)
/// checks that half-closing still returns the rest of the echo.
pub async fn client(addr: SocketAddr, send: Option<String>) -> anyhow::Result<()> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let start = Instant::now();
    let (r, mut w) = stream.into_split();
    if let Some(s) = &send {
        w.write_all(format!("{s}\n").as_bytes()).await?;
    }
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .context("no reply within 5 s")??;
    let elapsed = start.elapsed();
    println!(
        "reply={} elapsed_ms={:.2}",
        line.trim_end(),
        elapsed.as_secs_f64() * 1000.0
    );
    // Half-close: our FIN must reach the server, and its remaining bytes must still reach us.
    w.write_all(b"after\n").await?;
    w.shutdown().await?;
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_to_string(&mut rest))
        .await
        .context("no EOF within 5 s after half-close")??;
    println!("after_half_close={}", rest.trim_end().replace('\n', "|"));
    Ok(())
}
