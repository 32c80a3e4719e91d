//! The request body the proxy sends upstream: the client's, streamed; one buffered for
//! retries; or the client's teed to a mirror, and the mirror's copy of it.
//!
//! A mirror never slows the original: the tee hands each frame to the mirror's queue only while
//! the mirror's backlog is within bounds ([`MIRROR_LAG`] for one mirror, the proxy's
//! [`MirrorBuffer`] for all of them); past a bound, the mirror's copy is cut (it ends in an
//! error, so its server sees a reset stream, never a truncated body that looks complete).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::mpsc;

/// Bytes a mirror's copy may lag behind the original before it is cut.
pub const MIRROR_LAG: usize = 1 << 20;
/// Bytes every mirror of the proxy may hold together.
pub const MIRROR_BUFFER: usize = 16 << 20;

/// The bytes teed bodies hold for their mirrors, proxy-wide.
#[derive(Debug, Default)]
pub struct MirrorBuffer(AtomicUsize);

impl MirrorBuffer {
    pub fn held(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

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
    /// The client's body, streamed and kept (up to a limit) so that a retry can send it again.
    Replay(super::replay::Replay),
}

impl ReqBody {
    pub fn empty() -> Self {
        ReqBody::Full(Full::new(Bytes::new()))
    }

    /// A copy of the body for a mirror: `None` when the body cannot be copied (a mirror's own
    /// copy; a tee already). The body itself becomes a tee when it streams; what the mirror
    /// has not read yet counts against `buffer`.
    pub fn mirror(&mut self, buffer: &Arc<MirrorBuffer>) -> Option<ReqBody> {
        match self {
            ReqBody::Full(full) => Some(ReqBody::Full(full.clone())),
            ReqBody::Stream(incoming) if incoming.is_end_stream() => Some(ReqBody::empty()),
            ReqBody::Stream(_) => {
                let ReqBody::Stream(incoming) = std::mem::replace(self, ReqBody::empty()) else {
                    unreachable!("matched above")
                };
                let hint = incoming.size_hint();
                let (tx, rx) = mpsc::unbounded_channel();
                let lag = Arc::new(AtomicUsize::new(0));
                *self = ReqBody::Tee(Tee {
                    inner: incoming,
                    tx: Some(tx),
                    lag: lag.clone(),
                    buffer: buffer.clone(),
                });
                Some(ReqBody::Copy(Copy {
                    rx,
                    hint,
                    lag,
                    buffer: buffer.clone(),
                }))
            }
            ReqBody::Tee(_) | ReqBody::Copy(_) | ReqBody::Replay(_) => None,
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
    tx: Option<mpsc::UnboundedSender<Msg>>,
    /// Bytes queued for this mirror and not read yet.
    lag: Arc<AtomicUsize>,
    buffer: Arc<MirrorBuffer>,
}

#[derive(Debug)]
pub struct Copy {
    rx: mpsc::UnboundedReceiver<Msg>,
    hint: SizeHint,
    lag: Arc<AtomicUsize>,
    buffer: Arc<MirrorBuffer>,
}

impl Msg {
    fn len(&self) -> usize {
        match self {
            Msg::Frame(f) => f.data_ref().map_or(0, |d| d.len()),
            Msg::End => 0,
        }
    }
}

impl Copy {
    fn release(&self, n: usize) {
        self.lag.fetch_sub(n, Ordering::Relaxed);
        self.buffer.0.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Copy {
    /// What the mirror never read is no longer held.
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            self.release(msg.len());
        }
    }
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
        let Some(tx) = &self.tx else {
            return;
        };
        let n = msg.len();
        let lagging = self.lag.load(Ordering::Relaxed) + n > MIRROR_LAG;
        if lagging || self.buffer.0.fetch_add(n, Ordering::Relaxed) + n > MIRROR_BUFFER {
            if !lagging {
                self.buffer.0.fetch_sub(n, Ordering::Relaxed);
            }
            // The mirror is too far behind (or the proxy holds too much for mirrors): its copy
            // ends here.
            self.tx = None;
            return;
        }
        self.lag.fetch_add(n, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(msg)) = tx.send(msg) {
            // The mirror is done (failed, or timed out).
            self.lag.fetch_sub(n, Ordering::Relaxed);
            self.buffer.0.fetch_sub(msg.len(), Ordering::Relaxed);
            self.tx = None;
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
                        // Whoever reads the original may stop at the last frame, without
                        // polling for the end: the mirror is told here.
                        if tee.inner.is_end_stream() {
                            tee.offer(Msg::End);
                            tee.tx = None;
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
            ReqBody::Replay(r) => Pin::new(r).poll_frame(cx),
            ReqBody::Copy(copy) => match copy.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Frame(f))) => {
                    copy.release(f.data_ref().map_or(0, |d| d.len()));
                    Poll::Ready(Some(Ok(f)))
                }
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
            ReqBody::Replay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Full(b) => b.size_hint(),
            ReqBody::Tee(t) => t.inner.size_hint(),
            ReqBody::Copy(c) => c.hint,
            ReqBody::Replay(r) => r.size_hint(),
        }
    }
}
