//! Opaque TCP: a bidirectional copy that keeps half-close (one side's FIN is passed on while the
//! other direction keeps flowing).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::client::{connect, connect_tls};
use crate::http::error::ProxyError;
use crate::identity::TlsTarget;

/// Connects to `addr` (over mTLS with `tls`) and splices it with `downstream` until both
/// directions end.
pub async fn forward<I>(
    mut downstream: I,
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&TlsTarget>,
) -> Result<(), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let copied = match tls {
        Some(target) => {
            let mut upstream = connect_tls(addr, connect_timeout, target).await?;
            tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
        }
        None => {
            let mut upstream = connect(addr, connect_timeout).await?;
            tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
        }
    };
    match copied {
        Ok((up, down)) => tracing::trace!(%addr, up, down, "TCP stream done"),
        Err(e) => tracing::debug!(%addr, error = %e, "TCP stream ended with an error"),
    }
    Ok(())
}
