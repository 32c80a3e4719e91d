//! Upstream connections: one pooled, multiplexed HTTP/2 connection per peer ([`H2Conn`]), pooled
//! HTTP/1 keep-alive connections (hyper-util's pool), and one-off connections for upgrades.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::error::ProxyError;
use super::ReqBody;
use crate::identity::TlsTarget;

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast link.
pub const WINDOW: u32 = 2 * 1024 * 1024;
pub const CONN_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 header list accepted from upstreams: above any configurable header limit.
pub const MAX_HEADER_LIST: u32 = 1024 * 1024;

/// Connects with a timeout, `TCP_NODELAY` set.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// Connects and completes a TLS 1.3 handshake as `target` says.
pub async fn connect_tls(
    addr: SocketAddr,
    timeout: Duration,
    target: &TlsTarget,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProxyError> {
    let tcp = connect(addr, timeout).await?;
    let connector = tokio_rustls::TlsConnector::from(target.config.clone());
    match tokio::time::timeout(timeout, connector.connect(target.server_name.clone(), tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(source)) => Err(ProxyError::Tls { addr, source }),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// A lazily established HTTP/2 connection to one address, shared by every request to it and
/// re-established when it closes.
#[derive(Debug)]
pub struct H2Conn {
    addr: SocketAddr,
    connect_timeout: Duration,
    current: ArcSwapOption<Pooled>,
    connecting: tokio::sync::Mutex<()>,
    tls: Option<TlsTarget>,
}

/// The pooled connection, with what it was verified under.
#[derive(Debug)]
struct Pooled {
    sender: http2::SendRequest<ReqBody>,
    /// The anchors' generation at the handshake (mTLS only).
    anchors: u64,
    opened: std::time::Instant,
}

impl H2Conn {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self::with_tls(addr, connect_timeout, None)
    }

    /// A connection that speaks HTTP/2 over mTLS when `tls` is set.
    pub fn with_tls(addr: SocketAddr, connect_timeout: Duration, tls: Option<TlsTarget>) -> Self {
        Self {
            addr,
            connect_timeout,
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            tls,
        }
    }

    pub fn is_open(&self) -> bool {
        self.current.load().as_ref().is_some_and(|p| self.usable(p))
    }

    /// Open, and (for mTLS) verified under the current anchors and younger than the maximum
    /// age: otherwise the next request makes a new connection, whose handshake checks the
    /// peer again. Requests already on the old connection finish there.
    fn usable(&self, p: &Pooled) -> bool {
        !p.sender.is_closed()
            && self.tls.as_ref().is_none_or(|t| {
                p.anchors == t.anchors.generation() && p.opened.elapsed() < t.max_age
            })
    }

    /// Whether a connection attempt is under way (requests to this peer would wait for it).
    pub fn is_connecting(&self) -> bool {
        self.connecting.try_lock().is_err()
    }

    /// Establishes the connection if there is none (so callers can time requests without the
    /// connection set-up).
    pub async fn ready(&self) -> Result<(), ProxyError> {
        self.sender().await.map(drop)
    }

    async fn sender(&self) -> Result<http2::SendRequest<ReqBody>, ProxyError> {
        if let Some(p) = self.current.load().as_ref() {
            if self.usable(p) {
                return Ok(p.sender.clone());
            }
        }
        // Boxed: the connect and handshake futures are kilobytes, and every request's future
        // would carry them (and move them at each spawn) though few requests connect.
        Box::pin(self.open()).await
    }

    /// Opens the connection (one attempt at a time) unless another request just did.
    async fn open(&self) -> Result<http2::SendRequest<ReqBody>, ProxyError> {
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(p) = self.current.load().as_ref() {
            if self.usable(p) {
                return Ok(p.sender.clone());
            }
        }
        let anchors = self.tls.as_ref().map_or(0, |t| t.anchors.generation());
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // Fixed large windows: adaptive (BDP) windows send a PING per burst of data, which
            // costs syscalls on every request at low load.
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            // A peer's response within any allowed header limit passes; the limits
            // themselves are checked where the request entered the mesh.
            .max_header_list_size(MAX_HEADER_LIST);
        let failed = |e| ProxyError::Upstream {
            addr: self.addr,
            source: Box::new(e),
        };
        let sender = match &self.tls {
            Some(target) => {
                let stream = connect_tls(self.addr, self.connect_timeout, target).await?;
                spawn_h2(self.addr, builder, stream).await.map_err(failed)?
            }
            None => {
                let stream = connect(self.addr, self.connect_timeout).await?;
                spawn_h2(self.addr, builder, stream).await.map_err(failed)?
            }
        };
        self.current.store(Some(Arc::new(Pooled {
            sender: sender.clone(),
            anchors,
            opened: std::time::Instant::now(),
        })));
        Ok(sender)
    }

    /// Sends on the shared connection. A request the connection could not take (it was closing)
    /// is sent once more on a fresh connection.
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender().await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    self.current.store(None);
                    let mut sender = self.sender().await?;
                    sender.send_request(req).await.map_err(|e| self.upstream(e))
                }
                None => Err(self.upstream(e.into_error())),
            },
        }
    }

    fn upstream(&self, e: hyper::Error) -> ProxyError {
        ProxyError::Upstream {
            addr: self.addr,
            source: Box::new(e),
        }
    }
}

/// HTTP/2 handshake on `io`; the connection runs in its own task.
async fn spawn_h2<I>(
    addr: SocketAddr,
    builder: http2::Builder<TokioExecutor>,
    io: I,
) -> hyper::Result<http2::SendRequest<ReqBody>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Requests sent together leave in one write (see `coalesce`).
    let io = crate::coalesce::Coalesce::new(io);
    let (sender, conn) = builder.handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "HTTP/2 connection closed");
        }
    });
    Ok(sender)
}

/// HTTP/1 handshake on `io` for one upgradable request; the connection runs in its own task.
async fn spawn_h1_upgradable<I>(
    addr: SocketAddr,
    io: I,
) -> hyper::Result<hyper::client::conn::http1::SendRequest<ReqBody>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_headers(super::limits::LIBRARY_MAX_HEADERS)
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upgrade connection ended");
        }
    });
    Ok(sender)
}

/// HTTP/2 connections to addresses that are not balanced endpoints (the local application,
/// passthrough destinations), one per address.
#[derive(Debug)]
pub struct H2Pool {
    conns: Mutex<HashMap<SocketAddr, Arc<H2Conn>>>,
    connect_timeout: Duration,
}

/// Above this many entries, entries without an open connection are dropped.
const H2_POOL_SOFT_CAP: usize = 512;

impl H2Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// Called once per accepted connection, not per request.
    pub fn get(&self, addr: SocketAddr) -> Arc<H2Conn> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() > H2_POOL_SOFT_CAP {
            conns.retain(|_, c| c.is_open() || Arc::strong_count(c) > 1);
        }
        conns
            .entry(addr)
            .or_insert_with(|| Arc::new(H2Conn::new(addr, self.connect_timeout)))
            .clone()
    }
}

/// Pooled HTTP/1.1 keep-alive connections, keyed by the address in the request URI.
pub type H1Client = hyper_util::client::legacy::Client<HttpConnector, ReqBody>;

/// Idle connections are closed after `idle_timeout` (`STRAIT_HTTP1_POOL_IDLE_TIMEOUT`): under
/// the application's own keep-alive timeout, so that a request never goes out on a connection
/// the application is closing, and so that a burst's connections do not outlive it.
pub fn h1_client(connect_timeout: Duration, idle_timeout: Duration) -> H1Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        // As the server side: the client's names as written, Title-Case for those that
        // crossed HTTP/2.
        .http1_preserve_header_case(true)
        .http1_title_case_headers(true)
        .http1_max_headers(super::limits::LIBRARY_MAX_HEADERS)
        .build(connector)
}

/// Sends an HTTP/1 request through the pool to `addr`. The URI is rewritten to address `addr`
/// (the pool key); the Host header is kept, so the application sees what the client sent.
/// `connect_timeout` is the pool connector's, named in the error when a connect times out.
pub async fn send_h1(
    client: &H1Client,
    addr: SocketAddr,
    connect_timeout: Duration,
    mut req: Request<ReqBody>,
) -> Result<Response<Incoming>, ProxyError> {
    if !req.headers().contains_key(http::header::HOST) {
        if let Some(a) = req.uri().authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| ProxyError::Upstream {
            addr,
            source: Box::new(e),
        })?;
    *req.uri_mut() = uri;
    // The client's version reaches the application: HTTP/1.0 stays 1.0 (with its keep-alive
    // rules); anything else is sent as HTTP/1.1.
    if req.version() != http::Version::HTTP_10 {
        *req.version_mut() = http::Version::HTTP_11;
    }
    client.request(req).await.map_err(|e| {
        let timed_out = std::error::Error::source(&e)
            .and_then(|s| s.source())
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || format!("{e:?}").contains("TimedOut");
        if e.is_connect() && timed_out {
            ProxyError::ConnectTimeout {
                addr,
                timeout: connect_timeout,
            }
        } else if e.is_connect() {
            ProxyError::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e),
            }
        } else {
            ProxyError::Upstream {
                addr,
                source: Box::new(e),
            }
        }
    })
}

/// Forwards an upgrade (WebSocket, CONNECT) on a dedicated HTTP/1 connection, then splices the
/// two upgraded streams together.
pub async fn send_upgrade(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&TlsTarget>,
    req: Request<ReqBody>,
) -> Result<Response<Incoming>, ProxyError> {
    // Boxed, as the connect in `H2Conn::sender`: callers' futures stay small for the requests
    // that are not upgrades.
    Box::pin(upgrade(addr, connect_timeout, tls, req)).await
}

async fn upgrade(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&TlsTarget>,
    mut req: Request<ReqBody>,
) -> Result<Response<Incoming>, ProxyError> {
    let tunnel = req.method() == http::Method::CONNECT;
    let downstream = hyper::upgrade::on(&mut req);
    let upstream_err = |e: hyper::Error| ProxyError::Upstream {
        addr,
        source: Box::new(e),
    };
    let mut sender = match tls {
        Some(target) => {
            let stream = connect_tls(addr, connect_timeout, target).await?;
            spawn_h1_upgradable(addr, stream)
                .await
                .map_err(upstream_err)?
        }
        None => {
            let stream = connect(addr, connect_timeout).await?;
            spawn_h1_upgradable(addr, stream)
                .await
                .map_err(upstream_err)?
        }
    };
    let mut resp = sender.send_request(req).await.map_err(upstream_err)?;
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        || (tunnel && resp.status().is_success())
    {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!(%addr, error = %e, "upgraded stream ended");
                    }
                }
                Err(e) => tracing::debug!(%addr, error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server answering every request with keep-alive; counts its connections and
    /// reports each one's end (the client closed it) on `closed`.
    async fn keep_alive_server() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                    let _ = tx.send(());
                });
            }
        });
        (addr, accepted, rx)
    }

    async fn get(client: &H1Client, addr: SocketAddr) -> http::StatusCode {
        let req = Request::builder()
            .uri("/")
            .header(http::header::HOST, "app")
            .body(ReqBody::empty())
            .expect("request");
        send_h1(client, addr, Duration::from_secs(1), req)
            .await
            .expect("response")
            .status()
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_reused_then_closed_after_the_pool_timeout() {
        let (addr, accepted, mut closed) = keep_alive_server().await;
        let client = h1_client(Duration::from_secs(1), Duration::from_millis(300));
        assert_eq!(get(&client, addr).await, 200);
        assert_eq!(get(&client, addr).await, 200);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reuses the connection"
        );
        // Idle past the pool's timeout: the proxy closes it (the application never has to).
        tokio::time::timeout(Duration::from_secs(10), closed.recv())
            .await
            .expect("the idle connection is closed by the pool")
            .expect("server task");
        // The next request opens a new one.
        assert_eq!(get(&client, addr).await, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
