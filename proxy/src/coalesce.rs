//! Fewer writes on a multiplexed connection: [`Coalesce`] holds what HTTP/2 writes until it
//! flushes, and lets the flush wait one turn of the runtime's queue, so that the frames of every
//! stream that became ready in that turn (responses that arrived together, requests sent
//! together) leave in one TLS write instead of one each.
//!
//! Without it, the server proxy of a busy pair made one `writev` per response: each stream's
//! task woke the connection, which flushed that stream's frames alone. The wait is not a timer:
//! the connection's task goes to the back of the run queue, behind the tasks that were already
//! ready, and flushes when it comes round; an idle connection's lone response goes at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes above which a write goes through without waiting for the flush.
const HIGH_WATER: usize = 64 * 1024;
/// A buffer that grew above this is released once empty, so idle connections hold none.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Buffers writes to `inner` until a flush, which is deferred by one turn of the run queue.
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Written to `inner` already (the front of `buf`).
    sent: usize,
    /// The pending flush waited its turn: the next one writes.
    waited: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            waited: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the buffer to `inner` until it is empty (or `inner` is not ready).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    /// Buffers `bufs` whole; what would take the buffer above [`HIGH_WATER`] first drains it,
    /// and a write that large by itself goes straight through (after the buffer, in order).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + total > HIGH_WATER && !this.buf.is_empty() {
            std::task::ready!(this.poll_drain(cx))?;
        }
        if total >= HIGH_WATER {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.len() > this.sent && !this.waited {
            // One turn: the tasks already ready run (their frames are queued on their
            // streams); the connection is polled again after them, buffers those frames before
            // flushing (HTTP/2 queues every ready frame, then flushes), and all leave here.
            this.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // The turn is over once the buffer is out (a drain that waits for the socket does not
        // wait another turn when it resumes).
        std::task::ready!(this.poll_drain(cx))?;
        this.waited = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records each write it is given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().expect("recorder").clone()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().expect("recorder").push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_leave_together_at_the_flush() {
        let rec = Recorder::default();
        let mut io = Coalesce::new(rec.clone());
        io.write_all(b"headers").await.expect("io");
        io.write_all(b"data").await.expect("io");
        assert!(
            rec.writes().is_empty(),
            "nothing is written before the flush"
        );
        io.flush().await.expect("io");
        assert_eq!(rec.writes(), vec![b"headersdata".to_vec()]);
        // Nothing left: a second flush writes nothing.
        io.flush().await.expect("io");
        assert_eq!(rec.writes().len(), 1);
    }

    #[tokio::test]
    async fn frames_queued_while_the_flush_waits_leave_with_it() {
        let rec = Recorder::default();
        let mut io = Coalesce::new(rec.clone());
        io.write_all(b"one").await.expect("io");
        // The flush waits a turn of the runtime...
        assert!(futures_util::FutureExt::now_or_never(io.flush()).is_none());
        assert!(rec.writes().is_empty());
        // ... during which another stream's frames are queued; both leave in one write.
        io.write_all(b"two").await.expect("io");
        io.flush().await.expect("io");
        assert_eq!(rec.writes(), vec![b"onetwo".to_vec()]);
    }

    #[tokio::test]
    async fn large_writes_go_through_and_keep_their_order() {
        let rec = Recorder::default();
        let mut io = Coalesce::new(rec.clone());
        io.write_all(b"small").await.expect("io");
        let big = vec![7u8; HIGH_WATER];
        io.write_all(&big).await.expect("io");
        let writes = rec.writes();
        assert_eq!(
            writes.len(),
            2,
            "the buffer is written before the large write"
        );
        assert_eq!(writes[0], b"small");
        assert_eq!(writes[1].len(), HIGH_WATER);
        io.write_all(b"tail").await.expect("io");
        io.shutdown().await.expect("io");
        assert_eq!(
            rec.writes()[2],
            b"tail",
            "shutdown writes what was buffered"
        );
    }

    #[tokio::test]
    async fn vectored_writes_are_buffered_whole() {
        let rec = Recorder::default();
        let mut io = Coalesce::new(rec.clone());
        let n = io
            .write_vectored(&[io::IoSlice::new(b"a"), io::IoSlice::new(b"bc")])
            .await
            .expect("io");
        assert_eq!(n, 3);
        io.flush().await.expect("io");
        assert_eq!(rec.writes(), vec![b"abc".to_vec()]);
    }
}
