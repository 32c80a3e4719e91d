//! Who speaks first: protocol detection that never stalls a server-speaks-first protocol.
//!
//! ```text
//!  accept ──► client bytes within `wait` (20 ms)? ──yes──► classify (detect.rs)
//!                 │ no
//!                 ▼
//!      open the upstream speculatively (mesh mTLS to the chosen endpoint, or plain TCP)
//!                 │
//!     ┌───────────┼──────────────────────────────┬───────────────────────────────┐
//!     ▼           ▼                              ▼                               ▼
//!  client     server speaks first:          neither within the          client closes:
//!  speaks:    greeting to the client,       window (1 s): upstream      nothing forwarded,
//!  classify;  opaque TCP at once;           closed; wait for the        no upstream kept
//!  TCP reuses remember "server-first"       client's first bytes
//!  the conn.  (no detection next time)      (remember "client-first")
//! ```
//!
//! A destination remembered as server-first skips detection (opaque TCP at accept); one
//! remembered as client-first is not speculated on again. Entries expire, so a port that
//! changes protocol is learned anew.

use std::collections::HashMap;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::RwLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::detect::{detect_into, Detected, Protocol};
use crate::http::error::ProxyError;

/// Entries a memory holds at most; past it, expired ones are dropped, then the oldest.
const MAX_ENTRIES: usize = 4096;
/// Speculative connections open at once, per direction: a burst of silent clients to a new
/// destination (10,000 pre-opened pool connections) must not become a burst of upstream
/// connections. Beyond it, a silent client is given the detection timeout, then is TCP.
const MAX_SPECULATING: usize = 256;

/// What was learned of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Speaker {
    /// The server sends first (MySQL, SMTP, ...): no detection.
    ServerFirst,
    /// The client sent first while a speculative connection waited: no more speculation.
    ClientFirst,
}

/// A small map whose entries expire: what the proxy learned of destinations or peers.
#[derive(Debug)]
pub struct Memory<K, V> {
    ttl: Duration,
    entries: RwLock<HashMap<K, (V, Instant)>>,
}

impl<K: Hash + Eq + Copy, V: Copy> Memory<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, learned)| learned.elapsed() < self.ttl)
            .map(|(v, _)| *v)
    }

    pub fn remember(&self, key: K, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (_, learned)| learned.elapsed() < ttl);
            if entries.len() >= MAX_ENTRIES {
                if let Some(oldest) = entries.iter().min_by_key(|(_, (_, l))| *l).map(|(k, _)| *k) {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key, (value, Instant::now()));
    }

    pub fn forget(&self, key: &K) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// The live entries, with the time each has left.
    pub fn snapshot(&self) -> Vec<(K, V, Duration)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .filter_map(|(k, (v, learned))| {
                let left = self.ttl.checked_sub(learned.elapsed())?;
                Some((*k, *v, left))
            })
            .collect()
    }
}

/// What the proxy learned of who speaks first, shared by every connection.
#[derive(Debug)]
pub struct Protocols {
    /// Outbound, per original destination (a service's address and port, or an IP's).
    pub outbound: Memory<std::net::SocketAddr, Speaker>,
    /// Inbound, per application port.
    pub inbound: Memory<u16, Speaker>,
    speculating: [std::sync::Arc<tokio::sync::Semaphore>; 2],
}

impl Protocols {
    pub fn new(ttl: Duration) -> Self {
        Self {
            outbound: Memory::new(ttl),
            inbound: Memory::new(ttl),
            speculating: [(); 2]
                .map(|()| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SPECULATING))),
        }
    }

    /// A permit to open a speculative connection (held until the speculation is decided), or
    /// `None` when too many are open in that direction.
    pub fn speculation_permit(
        &self,
        direction: crate::metrics::Direction,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let i = usize::from(direction == crate::metrics::Direction::Inbound);
        self.speculating[i].clone().try_acquire_owned().ok()
    }

    /// JSON for the admin server's `/protocols`.
    pub fn to_json(&self) -> serde_json::Value {
        let entry = |key: String, speaker: Speaker, left: Duration| serde_json::json!({ "destination": key, "speaker": speaker, "expires_in_seconds": left.as_secs() });
        serde_json::json!({
            "outbound": self.outbound.snapshot().into_iter().map(|(k, v, l)| entry(k.to_string(), v, l)).collect::<Vec<_>>(),
            "inbound": self.inbound.snapshot().into_iter().map(|(k, v, l)| entry(format!("port {k}"), v, l)).collect::<Vec<_>>(),
        })
    }

    /// Remembers what a speculation found for `key` in `memory`.
    pub fn learn<K: Hash + Eq + Copy>(memory: &Memory<K, Speaker>, key: K, outcome: Outcome) {
        match outcome {
            Outcome::ServerFirst => memory.remember(key, Speaker::ServerFirst),
            Outcome::ClientFirst | Outcome::Quiet => memory.remember(key, Speaker::ClientFirst),
            Outcome::NotNeeded | Outcome::ConnectFailed => {}
        }
    }
}

/// An upstream connection: plain TCP, or mesh mTLS to a peer proxy.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// Connects to `addr`, over mesh mTLS when `tls` is given.
    pub async fn connect(
        addr: std::net::SocketAddr,
        timeout: Duration,
        tls: Option<&crate::identity::TlsTarget>,
    ) -> Result<Self, ProxyError> {
        Ok(match tls {
            Some(target) => match target.mesh_port {
                // Opaque TCP to a peer: its mesh port, then the application's port in the
                // transport header.
                Some(mesh_port) => {
                    let via = std::net::SocketAddr::new(addr.ip(), mesh_port);
                    let mut tls = crate::http::client::connect_tls(via, timeout, target).await?;
                    let header = crate::transport_header::encode(addr.port());
                    tokio::io::AsyncWriteExt::write_all(&mut tls, &header)
                        .await
                        .map_err(|source| ProxyError::Connect { addr: via, source })?;
                    Upstream::Tls(Box::new(tls))
                }
                None => Upstream::Tls(Box::new(
                    crate::http::client::connect_tls(addr, timeout, target).await?,
                )),
            },
            None => Upstream::Plain(crate::http::client::connect(addr, timeout).await?),
        })
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long each phase may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the client may stay silent before the upstream is opened speculatively.
    pub wait: Duration,
    /// How long a speculative connection waits for the server to speak.
    pub window: Duration,
    /// How long a connection on which nobody spoke is kept.
    pub idle: Duration,
    /// How long a started request line may take (slowloris).
    pub header: Duration,
}

/// How a connection started.
pub enum Start {
    /// The client spoke first; the speculative connection comes along if it was open.
    Client {
        detected: Detected,
        upstream: Option<Upstream>,
    },
    /// The server spoke first: its first bytes, to send to the client before splicing.
    Server { greeting: Bytes, upstream: Upstream },
    /// The client closed without sending a byte.
    Silent,
    /// The client sent nothing and is still there, past the time it was given.
    Idle,
}

/// What speculation found, for metrics and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client spoke within the wait: no speculation.
    NotNeeded,
    ServerFirst,
    ClientFirst,
    /// Neither spoke within the window (or the server closed at once).
    Quiet,
    /// The speculative connection could not be made.
    ConnectFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotNeeded => "not_needed",
            Outcome::ServerFirst => "server_first",
            Outcome::ClientFirst => "client_first",
            Outcome::Quiet => "quiet",
            Outcome::ConnectFailed => "connect_failed",
        }
    }
}

/// How the client's detection ended, as a [`Start`].
fn client(
    detected: std::io::Result<(Protocol, bool)>,
    buf: BytesMut,
    upstream: Option<Upstream>,
) -> std::io::Result<Start> {
    let (protocol, timed_out) = detected?;
    Ok(if buf.is_empty() && timed_out {
        Start::Idle
    } else if buf.is_empty() {
        Start::Silent
    } else {
        Start::Client {
            detected: Detected {
                protocol,
                prefix: buf.freeze(),
                timed_out,
            },
            upstream,
        }
    })
}

/// How the race between the client and a speculative connection ended.
enum Verdict {
    Client(std::io::Result<(Protocol, bool)>, Option<Upstream>),
    Server(Bytes, Upstream),
    Quiet,
    ConnectFailed,
}

/// Reads the client's first bytes; if it is silent for `timing.wait` and `speculate` is given,
/// opens the upstream with it and lets whichever side speaks first decide. `verdict` hears
/// the outcome as soon as it is known (a quiet server is known at the end of the window,
/// whether or not the client ever speaks).
pub async fn start<T, F>(
    io: &mut T,
    timing: Timing,
    speculate: Option<F>,
    verdict: impl FnOnce(Outcome),
) -> std::io::Result<(Start, Outcome)>
where
    T: AsyncRead + Unpin,
    F: std::future::Future<Output = Result<Upstream, ProxyError>>,
{
    let mut buf = BytesMut::with_capacity(1024);
    let first = detect_into(io, &mut buf, timing.wait, timing.header).await;
    if !matches!(first, Ok((_, true))) {
        verdict(Outcome::NotNeeded);
        return Ok((client(first, buf, None)?, Outcome::NotNeeded));
    }
    let Some(connect) = speculate else {
        verdict(Outcome::NotNeeded);
        let d = detect_into(io, &mut buf, timing.idle, timing.header).await;
        return Ok((client(d, buf, None)?, Outcome::NotNeeded));
    };
    // The race, in a scope of its own: whatever it ends on, the speculative connection (made
    // or still being made) and the client's read are dropped with it; the bytes the client
    // sent so far stay in `buf`.
    let decided = {
        let client_speaks = detect_into(io, &mut buf, timing.idle, timing.header);
        tokio::pin!(client_speaks);
        tokio::pin!(connect);
        let window = tokio::time::sleep(timing.window);
        tokio::pin!(window);
        tokio::select! {
            d = &mut client_speaks => Verdict::Client(d, None),
            () = &mut window => Verdict::Quiet,
            c = &mut connect => match c {
                Err(e) => {
                    tracing::debug!(error = %e, "speculative connection failed");
                    Verdict::ConnectFailed
                }
                Ok(mut upstream) => {
                    let mut greeting = BytesMut::with_capacity(4096);
                    tokio::select! {
                        d = &mut client_speaks => Verdict::Client(d, Some(upstream)),
                        () = &mut window => Verdict::Quiet,
                        r = upstream.read_buf(&mut greeting) => match r {
                            Ok(n) if n > 0 => Verdict::Server(greeting.freeze(), upstream),
                            // Closed without a word: nothing to learn.
                            _ => Verdict::Quiet,
                        },
                    }
                }
            },
        }
    };
    match decided {
        Verdict::Client(d, upstream) => {
            verdict(Outcome::ClientFirst);
            Ok((client(d, buf, upstream)?, Outcome::ClientFirst))
        }
        Verdict::Server(greeting, upstream) => {
            verdict(Outcome::ServerFirst);
            Ok((Start::Server { greeting, upstream }, Outcome::ServerFirst))
        }
        Verdict::Quiet => {
            verdict(Outcome::Quiet);
            let d = detect_into(io, &mut buf, timing.idle, timing.header).await;
            Ok((client(d, buf, None)?, Outcome::Quiet))
        }
        Verdict::ConnectFailed => {
            // Nothing to hear from: the client gets the rest of the window to speak (a
            // connection to this destination would fail the same way), then is closed.
            verdict(Outcome::ConnectFailed);
            let left = timing.window.saturating_sub(timing.wait);
            let d = tokio::time::timeout(left, detect_into(io, &mut buf, left, timing.header))
                .await
                .unwrap_or(Ok((Protocol::Opaque, true)));
            Ok((client(d, buf, None)?, Outcome::ConnectFailed))
        }
    }
}

impl Timing {
    /// The proxy's settings; `wait` as given (it differs by port and peer).
    pub fn new(cfg: &crate::config::ProxyConfig, wait: Duration) -> Self {
        Self {
            wait,
            window: cfg.detect_timeout,
            idle: cfg.detect_idle_timeout,
            header: cfg.header_read_timeout,
        }
    }
}

/// How long a silent client that could not speculate (a burst) waits before it is TCP: past
/// the verdict of every speculation that started before it (`wait` + the window), so that what
/// they learned (its clients speak first) applies to it.
pub fn degraded_wait(cfg: &crate::config::ProxyConfig, wait: Duration) -> Duration {
    wait + cfg.detect_timeout + Duration::from_millis(200)
}

/// The end of a degraded start (no speculation permit, see [`degraded_wait`]): a client still
/// silent is opaque TCP (the old rule), unless meanwhile another connection's speculation
/// found that this destination's clients speak first; then this one waits for its client's
/// first bytes too, up to `idle`. Returns the start and whether a silent client is TCP;
/// `None` when the connection failed.
pub async fn after_degraded<T: AsyncRead + Unpin>(
    io: &mut T,
    start: Start,
    degraded: bool,
    clients_speak_first: bool,
    mut timing: Timing,
    idle: Duration,
) -> Option<(Start, bool)> {
    if !(degraded && matches!(start, Start::Idle)) {
        return Some((start, degraded));
    }
    if !clients_speak_first {
        return Some((start, true));
    }
    timing.idle = idle;
    let no_speculation = None::<std::future::Pending<_>>;
    let (start, _) = self::start(io, timing, no_speculation, |_| {}).await.ok()?;
    Some((start, false))
}

/// [`start`] on a proxied connection: counted in the detection and speculation metrics, and
/// `learn` hears the outcome as soon as it is known. A connection that failed or was cut
/// during detection is logged and gives `None`.
pub async fn start_counted<T, F>(
    io: &mut T,
    ctx: &crate::Context,
    direction: crate::metrics::Direction,
    timing: Timing,
    speculate: Option<F>,
    learn: impl FnOnce(Outcome),
) -> Option<(Start, Outcome)>
where
    T: AsyncRead + Unpin,
    F: std::future::Future<Output = Result<Upstream, ProxyError>>,
{
    let started = std::time::Instant::now();
    let verdict = |outcome| {
        ctx.metrics.speculated(direction, outcome);
        learn(outcome);
    };
    match start(io, timing, speculate, verdict).await {
        Ok((start, outcome)) => {
            let protocol = match &start {
                Start::Client { detected, .. } => Some(detected.protocol),
                Start::Server { .. } => Some(Protocol::Opaque),
                Start::Silent | Start::Idle => None,
            };
            if let Some(protocol) = protocol {
                ctx.metrics
                    .detected(direction, protocol.as_str(), started.elapsed());
            }
            Some((start, outcome))
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection failed during detection");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn timing() -> Timing {
        Timing {
            wait: Duration::from_millis(20),
            window: Duration::from_secs(1),
            idle: Duration::from_secs(5),
            header: Duration::from_secs(10),
        }
    }

    async fn server(greet: Option<&'static [u8]>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                if let Some(g) = greet {
                    let _ = s.write_all(g).await;
                }
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_server_first_greeting_arrives_without_waiting_for_the_client() {
        let addr = server(Some(b"220 ready\r\n")).await;
        let (_client, mut io) = tokio::io::duplex(1024);
        let started = Instant::now();
        let (start, outcome) = super::start(
            &mut io,
            timing(),
            Some(Upstream::connect(addr, Duration::from_secs(1), None)),
            |_| {},
        )
        .await
        .expect("start");
        assert_eq!(outcome, Outcome::ServerFirst);
        let Start::Server { greeting, .. } = start else {
            panic!("server first")
        };
        assert_eq!(&greeting[..], b"220 ready\r\n");
        assert!(started.elapsed() < Duration::from_millis(900));
    }

    #[tokio::test]
    async fn a_client_that_speaks_after_the_wait_keeps_the_speculative_connection() {
        let addr = server(None).await;
        let (mut client_side, mut io) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client_side.write_all(b"PING\r\n").await.expect("write");
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (start, outcome) = super::start(
            &mut io,
            timing(),
            Some(Upstream::connect(addr, Duration::from_secs(1), None)),
            |_| {},
        )
        .await
        .expect("start");
        assert_eq!(outcome, Outcome::ClientFirst);
        let Start::Client { detected, upstream } = start else {
            panic!("client first")
        };
        assert_eq!(detected.protocol, Protocol::Opaque);
        assert!(upstream.is_some(), "the connection is reused for TCP");
    }

    #[tokio::test]
    async fn a_client_that_closes_at_once_costs_no_upstream_connection() {
        let (client_side, mut io) = tokio::io::duplex(1024);
        drop(client_side);
        let connect = async {
            panic!("no connection may be made");
            #[allow(unreachable_code)]
            Err::<Upstream, ProxyError>(ProxyError::NoEndpoints(String::new()))
        };
        let (start, outcome) = super::start(&mut io, timing(), Some(connect), |_| {})
            .await
            .expect("start");
        assert!(matches!(start, Start::Silent));
        assert_eq!(outcome, Outcome::NotNeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_server_lets_a_slow_http_client_stay_http() {
        let (mut client_side, mut io) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client_side
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        // A connection that never completes: the window ends the speculation.
        let connect = std::future::pending::<Result<Upstream, ProxyError>>();
        let (start, outcome) = super::start(&mut io, timing(), Some(connect), |_| {})
            .await
            .expect("start");
        assert_eq!(outcome, Outcome::Quiet);
        let Start::Client { detected, upstream } = start else {
            panic!("client")
        };
        assert_eq!(detected.protocol, Protocol::Http1);
        assert!(upstream.is_none());
    }

    #[test]
    fn speculation_is_bounded_per_direction() {
        use crate::metrics::Direction;
        let p = Protocols::new(Duration::from_secs(60));
        let held: Vec<_> = (0..MAX_SPECULATING)
            .map(|_| p.speculation_permit(Direction::Outbound).expect("permit"))
            .collect();
        assert!(p.speculation_permit(Direction::Outbound).is_none());
        assert!(p.speculation_permit(Direction::Inbound).is_some());
        drop(held);
        assert!(p.speculation_permit(Direction::Outbound).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn without_speculation_a_silent_client_is_idle_after_its_time() {
        let (_client, mut io) = tokio::io::duplex(1024);
        let mut t = timing();
        t.idle = Duration::from_secs(1);
        let (start, _) = super::start(&mut io, t, None::<std::future::Pending<_>>, |_| {})
            .await
            .expect("start");
        assert!(matches!(start, Start::Idle));
    }

    #[test]
    fn memory_expires_and_stays_bounded() {
        let m: Memory<u32, Speaker> = Memory::new(Duration::from_secs(60));
        m.remember(1, Speaker::ServerFirst);
        assert_eq!(m.get(&1), Some(Speaker::ServerFirst));
        for k in 0..(MAX_ENTRIES as u32 + 10) {
            m.remember(k, Speaker::ClientFirst);
        }
        assert!(m.snapshot().len() <= MAX_ENTRIES);
        let short: Memory<u32, Speaker> = Memory::new(Duration::ZERO);
        short.remember(1, Speaker::ServerFirst);
        assert_eq!(short.get(&1), None);
    }
}
