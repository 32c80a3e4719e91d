//! The two ways a request leaves the proxy: to a peer proxy over the pooled HTTP/2 connection,
//! or straight to an address in the client's own protocol.

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;

use super::client::{send_h1, send_upgrade, H1Client, H2Conn};
use super::error::ProxyError;
use super::headers::{self, ORIG_PROTO};
use super::ReqBody;

/// Connections shared by every request of the proxy.
#[derive(Debug)]
pub struct Clients {
    pub h1: H1Client,
    pub h2: super::client::H2Pool,
    pub connect_timeout: Duration,
}

impl Clients {
    pub fn new(connect_timeout: Duration, h1_idle_timeout: Duration) -> Self {
        Self {
            h1: super::client::h1_client(connect_timeout, h1_idle_timeout),
            h2: super::client::H2Pool::new(connect_timeout),
            connect_timeout,
        }
    }
}

/// Sends `req` to a peer proxy over its HTTP/2 connection. An HTTP/1 request travels as HTTP/2
/// with [`ORIG_PROTO`] set, so the peer restores it; its response comes back as HTTP/1.
pub async fn to_peer(
    conn: &H2Conn,
    mut req: Request<ReqBody>,
) -> Result<Response<Incoming>, ProxyError> {
    let version = req.version();
    if version != Version::HTTP_2 {
        let authority = headers::authority(&req).ok_or(ProxyError::NoAuthority)?;
        let path = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query =
            Some(path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::NoAuthority)?;
        req.headers_mut().remove(header::HOST);
        let orig = if version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static(orig));
        *req.version_mut() = Version::HTTP_2;
    }
    let mut resp = conn.send(req).await?;
    *resp.version_mut() = version;
    Ok(resp)
}

/// Restores a request that a peer proxy carried over HTTP/2 (it has [`ORIG_PROTO`]) to HTTP/1.
/// Returns whether it was one.
pub fn restore_orig_proto<B>(req: &mut Request<B>) -> bool {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return false;
    };
    *req.version_mut() = if orig == "HTTP/1.0" {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    if let Some(a) = req.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    true
}

/// Sends `req` to `addr` in the client's protocol: an upgrade on its own connection, HTTP/2 on
/// `h2` (the connection to `addr`), HTTP/1 through the keep-alive pool.
pub async fn direct(
    clients: &Clients,
    addr: SocketAddr,
    h2: &H2Conn,
    req: Request<ReqBody>,
) -> Result<Response<Incoming>, ProxyError> {
    if headers::is_upgrade(&req) {
        return send_upgrade(addr, clients.connect_timeout, None, req).await;
    }
    match req.version() {
        Version::HTTP_2 => h2.send(req).await,
        _ => send_h1(&clients.h1, addr, clients.connect_timeout, req).await,
    }
}
