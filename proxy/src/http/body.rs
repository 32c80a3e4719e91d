//! The request body the proxy sends upstream: the client's, streamed; one buffered for
//! retries; or the client's teed to a mirror, and the mirror's copy of it.
//!
//! A mirror never slows the original: the tee hands each frame to the mirror's channel only
//! when there is room (`try_send`); when there is none, the mirror's copy is cut (it ends in an
//! error, so its server sees a reset stream, never a truncated body that looks complete).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::mpsc;

/// Frames a mirror's copy may lag behind the original before it is cut.
pub const MIRROR_FRAMES: usize = 16;

#[derive(Debug)]
pub enum ReqBody {
    /// The client's body, streamed.
    Stream(Incoming),
    /// A buffered body (retries, a mirror of a request without a body).
    Full(Full<Bytes>),
    /// The client's body, streamed, with a copy of each frame offered to a mirror.
    Tee(Tee),
    /// A mirror's copy of a teed body.
    Copy(Copy),
}

impl ReqBody {
    pub fn empty() -> Self {
        ReqBody::Full(Full::new(Bytes::new()))
    }

    /// A copy of the body for a mirror: `None` when the body cannot be copied (a mirror's own
    /// copy; a tee already). The body itself becomes a tee when it streams.
    pub fn mirror(&mut self) -> Option<ReqBody> {
        match self {
            ReqBody::Full(full) => Some(ReqBody::Full(full.clone())),
            ReqBody::Stream(incoming) if incoming.is_end_stream() => Some(ReqBody::empty()),
            ReqBody::Stream(_) => {
                let ReqBody::Stream(incoming) = std::mem::replace(self, ReqBody::empty()) else {
                    unreachable!("matched above")
                };
                let hint = incoming.size_hint();
                let (tx, rx) = mpsc::channel(MIRROR_FRAMES);
                *self = ReqBody::Tee(Tee {
                    inner: incoming,
                    tx: Some(tx),
                });
                Some(ReqBody::Copy(Copy { rx, hint }))
            }
            ReqBody::Tee(_) | ReqBody::Copy(_) => None,
        }
    }
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> Self {
        ReqBody::Stream(b)
    }
}

/// What the tee sends the mirror: a frame, or the end of a body read whole.
#[derive(Debug)]
enum Msg {
    Frame(Frame<Bytes>),
    End,
}

#[derive(Debug)]
pub struct Tee {
    inner: Incoming,
    tx: Option<mpsc::Sender<Msg>>,
}

#[derive(Debug)]
pub struct Copy {
    rx: mpsc::Receiver<Msg>,
    hint: SizeHint,
}

/// The mirror's copy was cut (the mirror fell behind, or the original failed or was dropped).
#[derive(Debug, thiserror::Error)]
#[error("the mirrored request's body was cut")]
pub struct CopyCut;

fn copy_of(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        return Some(Frame::data(data.clone()));
    }
    frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
}

impl Tee {
    fn offer(&mut self, msg: Msg) {
        if let Some(tx) = &self.tx {
            if tx.try_send(msg).is_err() {
                // Full (the mirror is slow) or closed (it is done): the copy ends here.
                self.tx = None;
            }
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReqBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            ReqBody::Tee(tee) => {
                let polled = Pin::new(&mut tee.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(copy) = copy_of(frame) {
                            tee.offer(Msg::Frame(copy));
                        }
                    }
                    Poll::Ready(None) => {
                        tee.offer(Msg::End);
                        tee.tx = None;
                    }
                    // The original failed: the copy is cut with it.
                    Poll::Ready(Some(Err(_))) => tee.tx = None,
                    Poll::Pending => {}
                }
                polled.map_err(Into::into)
            }
            ReqBody::Copy(copy) => match copy.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Frame(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(Some(Msg::End)) => Poll::Ready(None),
                Poll::Ready(None) => Poll::Ready(Some(Err(CopyCut.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Full(b) => b.is_end_stream(),
            ReqBody::Tee(t) => t.inner.is_end_stream(),
            ReqBody::Copy(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Full(b) => b.size_hint(),
            ReqBody::Tee(t) => t.inner.size_hint(),
            ReqBody::Copy(c) => c.hint.clone(),
        }
    }
}
