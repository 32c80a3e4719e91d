//! HTTP/1.1 + h2c test server (with WebSocket echo) and the WebSocket client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub async fn serve(
    listen: SocketAddr,
    name: String,
    delay: Duration,
    fail_ratio: f64,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening on {listen}");
    let name: Arc<str> = name.into();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let name = name.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if fail_ratio > 0.0 && rand_unit() < fail_ratio {
                        // Read the body first, as a well-behaved server (nginx's lingering
                        // close) does: closing with unread data makes the kernel send a reset
                        // that can overtake the 503 itself, and the client would see a reset
                        // instead of the answer.
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        let mut r = Response::new(full(format!("failed on purpose by {name}\n")));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(handle(req, &name).await)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // As permissive as common servers: many headers pass to the application.
            builder.http1().max_headers(4096);
            builder.http2().max_header_list_size(1 << 20);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(mut req: Request<Incoming>, name: &str) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut resp = if path == "/ws" && req.headers().contains_key("sec-websocket-key") {
        websocket(&mut req)
    } else if path == "/echo" {
        Response::new(req.into_body().map_err(|e| Box::new(e) as _).boxed())
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        Response::new(pattern_body(n))
    } else if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let mut r = Response::new(full(format!("status {code} from {name}\n")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        r
    } else if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|c| c.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        Response::new(full(format!("delayed {ms} ms by {name}\n")))
    } else if let Some(n) = path
        .strip_prefix("/many-headers/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let mut r = Response::new(full(format!("{n} headers from {name}\n")));
        for i in 0..n.min(10_000) {
            if let Ok(h) = http::HeaderName::from_bytes(format!("x-many-{i}").as_bytes()) {
                r.headers_mut().insert(h, HeaderValue::from_static("v"));
            }
        }
        r
    } else if path == "/headers" {
        let mut text = format!("version: {:?}\n", req.version());
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("<binary>")));
        }
        Response::new(full(text))
    } else {
        Response::new(full(format!("hello from {name}\n")))
    };
    if let Ok(v) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

/// A uniform number in [0, 1), from the std hasher's random seed (no extra dependency).
pub(crate) fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    h.write_u64(nanos);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn pattern_body(n: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunks = (0..n.div_ceil(CHUNK)).map(move |c| {
        let start = c * CHUNK;
        let end = (start + CHUNK).min(n);
        let bytes: Vec<u8> = (start..end).map(super::pattern_byte).collect();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(bytes)))
    });
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)))
}

fn websocket(req: &mut Request<Incoming>) -> Response<Body> {
    let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_text() || msg.is_binary() {
                if tx.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

pub async fn ws_client(url: &str, messages: u32) -> anyhow::Result<()> {
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .context("websocket handshake timed out")??;
    println!("handshake status={}", resp.status().as_u16());
    for i in 0..messages {
        let text = format!("message {i} through the mesh");
        ws.send(Message::text(text.clone())).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .context("no echo within 5 s")?
            .context("connection closed")??;
        if reply.to_text()? != text {
            bail!("echo mismatch: sent {text:?}, got {reply:?}");
        }
    }
    ws.close(None).await.ok();
    println!("echoed {messages} messages");
    Ok(())
}
