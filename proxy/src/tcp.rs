//! Opaque TCP: a bidirectional copy that keeps half-close (one side's FIN is passed on while the
//! other direction keeps flowing).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::first_bytes::Upstream;
use crate::http::error::ProxyError;
use crate::identity::TlsTarget;

/// Connects to `addr` (over mTLS with `tls`) and splices it with `downstream` until both
/// directions end.
pub async fn forward<I>(
    downstream: I,
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&TlsTarget>,
) -> Result<(), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = Upstream::connect(addr, connect_timeout, tls).await?;
    splice(downstream, upstream, &[]).await;
    Ok(())
}

/// Splices an open `upstream` with `downstream` until both directions end; `greeting` (what
/// the server already said) goes to the client first.
pub async fn splice<I>(mut downstream: I, mut upstream: Upstream, greeting: &[u8])
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    if !greeting.is_empty() {
        if let Err(e) = downstream.write_all(greeting).await {
            tracing::debug!(error = %e, "the client left before the server's greeting reached it");
            return;
        }
    }
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((up, down)) => tracing::trace!(up, down, "TCP stream done"),
        Err(e) => tracing::debug!(error = %e, "TCP stream ended with an error"),
    }
}
