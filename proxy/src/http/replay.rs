//! A request body that can be sent again: the first attempt streams the client's body as it
//! comes (never waiting to buffer it) while a copy of up to [`crate::retry::MAX_REPLAY_BODY`]
//! bytes is kept; a retry replays the copy, then goes on with whatever of the client's body the
//! first attempt had not read (an attempt that failed before sending anything hands the whole
//! body over). A body larger than the limit can no longer be replayed, and the request is not
//! retried; nor is one whose previous attempt still holds the client's body.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

#[derive(Debug)]
struct Shared {
    /// The client's body, while no attempt is reading it.
    rest: Option<Incoming>,
    /// Data read so far (cleared once over the limit).
    data: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The client's body has been read to its end.
    ended: bool,
    /// More than the limit was read: nothing can be replayed.
    overflowed: bool,
    limit: usize,
    /// The client's body's size, as it said.
    hint: SizeHint,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One attempt's view of the body.
#[derive(Debug)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    /// Buffered chunks this attempt has sent.
    sent: usize,
    trailers_sent: bool,
    /// The client's body, while this attempt reads it.
    rest: Option<Incoming>,
}

impl Replay {
    /// The first attempt's body over `body`, keeping up to `limit` bytes for the others.
    pub fn new(body: Incoming, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                hint: body.size_hint(),
                rest: Some(body),
                data: Vec::new(),
                len: 0,
                trailers: None,
                ended: false,
                overflowed: false,
                limit,
            })),
            sent: 0,
            trailers_sent: false,
            rest: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Another attempt's body: `None` when the body cannot be replayed (over the limit, or
    /// the client's body is still held by an attempt in flight).
    pub fn again(&self) -> Option<Self> {
        let s = self.lock();
        let available = s.ended || s.rest.is_some();
        (!s.overflowed && available).then(|| Self {
            shared: self.shared.clone(),
            sent: 0,
            trailers_sent: false,
            rest: None,
        })
    }

    /// Whether another attempt could be made now.
    pub fn replayable(&self) -> bool {
        let s = self.lock();
        !s.overflowed && (s.ended || s.rest.is_some())
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            self.lock().rest = Some(rest);
        }
    }
}

/// The body of a replay ended in the middle: the client's body was taken by another attempt.
#[derive(Debug, thiserror::Error)]
#[error("the request body is held by another attempt")]
pub struct BodyInUse;

impl Body for Replay {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        {
            let mut s = lock(&this.shared);
            // What earlier attempts read, first.
            if this.sent < s.data.len() {
                let chunk = s.data[this.sent].clone();
                this.sent += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if s.ended {
                return match s.trailers.clone().filter(|_| !this.trailers_sent) {
                    Some(t) => {
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    None => Poll::Ready(None),
                };
            }
            if this.rest.is_none() {
                this.rest = s.rest.take();
            }
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(Some(Err(BodyInUse.into())));
        };
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        let end = rest.is_end_stream();
        let mut s = lock(&this.shared);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    s.len += data.len();
                    if s.len > s.limit {
                        s.overflowed = true;
                        s.data = Vec::new();
                    } else if !s.overflowed {
                        s.data.push(data.clone());
                    }
                    this.sent = s.data.len();
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                s.ended |= end;
            }
            Poll::Ready(None) => s.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        drop(s);
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        let s = self.lock();
        s.ended && self.sent >= s.data.len() && (self.trailers_sent || s.trailers.is_none())
    }

    /// Every attempt sends the whole body: the client's body's size.
    fn size_hint(&self) -> SizeHint {
        self.lock().hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper_util::rt::TokioIo;

    /// A real `Incoming` body carrying `chunks`, received by an in-memory HTTP/1 server.
    async fn incoming(chunks: &[&'static str]) -> Incoming {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(req.into_body());
                }
                async {
                    // Answered only once the test is over: the body stays readable.
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(client_io)).await
        else {
            panic!("handshake")
        };
        tokio::spawn(conn);
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let req = http::Request::post("/").body(body).expect("request");
        tokio::spawn(async move { sender.send_request(req).await });
        rx.await.expect("a body")
    }

    async fn text(body: Replay) -> String {
        let bytes = body.collect().await.expect("a whole body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn a_body_read_whole_is_sent_again_and_again() {
        let first = Replay::new(incoming(&["ab", "cd", "ef"]).await, 1024);
        let second = first.again().expect("replayable before the first attempt");
        assert_eq!(text(first).await, "abcdef");
        assert_eq!(text(second).await, "abcdef", "replayed from the copy");
    }

    #[tokio::test]
    async fn an_attempt_that_sent_nothing_or_part_hands_the_rest_over() {
        let first = Replay::new(incoming(&["ab", "cd", "ef"]).await, 1024);
        let second = first.again().expect("replayable");
        drop(first); // a connect failure: nothing read
        assert_eq!(text(second).await, "abcdef");

        // An attempt that read part of it (its server answered early): the next one replays
        // that part, then reads on.
        let mut first = Replay::new(incoming(&["ab", "cd", "ef"]).await, 1024);
        let second = first.again().expect("replayable");
        let frame = first.frame().await.expect("a frame").expect("ok");
        assert_eq!(frame.data_ref().map(|d| d.as_ref()), Some(&b"ab"[..]));
        assert!(!second.replayable(), "the first attempt holds the body");
        drop(first);
        assert!(second.replayable());
        assert_eq!(text(second).await, "abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayed() {
        let first = Replay::new(incoming(&["abc", "def"]).await, 4);
        let spare = first.again().expect("replayable until read");
        assert_eq!(
            text(first).await,
            "abcdef",
            "the first attempt gets all of it"
        );
        assert!(!spare.replayable());
        assert!(spare.again().is_none());
    }
}
