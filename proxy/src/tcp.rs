//! Opaque TCP: a bidirectional copy that keeps half-close (one side's FIN is passed on while the
//! other direction keeps flowing).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::client::connect;
use crate::http::error::ProxyError;

/// Connects to `addr` and splices it with `downstream` until both directions end.
pub async fn forward<I>(
    mut downstream: I,
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<(), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = connect(addr, connect_timeout).await?;
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((up, down)) => tracing::trace!(%addr, up, down, "TCP stream done"),
        Err(e) => tracing::debug!(%addr, error = %e, "TCP stream ended with an error"),
    }
    Ok(())
}
