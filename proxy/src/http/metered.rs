//! A response body that counts its response when the stream ends: the gRPC status of a
//! streaming response only arrives in the trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::ResponseRecorder;
use crate::telemetry::{Observation, Outcome};

/// `B`, counted by `recorder` at its end (or when dropped before it), which also ends the
/// request's span and writes its access log entry, when they are on.
#[derive(Debug)]
pub struct Metered<B: HttpBody> {
    inner: B,
    recorder: ResponseRecorder,
    grpc: bool,
    grpc_status: Option<u16>,
    done: bool,
    observation: Option<Box<Observation>>,
    bytes: u64,
}

/// The `grpc-status` of a header map.
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl<B: HttpBody> Metered<B> {
    /// `grpc_status`: from the response headers (a trailers-only gRPC response).
    pub fn new(inner: B, recorder: ResponseRecorder, grpc: bool, grpc_status: Option<u16>) -> Self {
        Self {
            inner,
            recorder,
            grpc,
            grpc_status,
            done: false,
            observation: None,
            bytes: 0,
        }
    }

    /// Also ends `observation` when the body ends.
    pub fn observed(mut self, observation: Option<Box<Observation>>) -> Self {
        self.observation = observation;
        self
    }

    fn finish(&mut self, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        match self.observation.take() {
            None => {
                let _ = self
                    .recorder
                    .finish(self.grpc_status, self.grpc, complete, self.bytes);
            }
            Some(observation) => {
                let labels = self.recorder.labels().cloned();
                let failed = self
                    .recorder
                    .finish(self.grpc_status, self.grpc, complete, self.bytes)
                    .unwrap_or(!complete);
                observation.finish(Outcome {
                    labels: labels.as_ref(),
                    grpc_status: self.grpc_status,
                    failed,
                    response_bytes: self.bytes,
                });
            }
        }
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    this.grpc_status = grpc_status(trailers).or(this.grpc_status);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: HttpBody> Drop for Metered<B> {
    fn drop(&mut self) {
        // Never polled to its end: complete if nothing was left to send (hyper does not poll
        // an empty body), else the client went away or the stream was reset.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::metrics::{Direction, Metrics};

    fn count(m: &Metrics, needle: &str) -> bool {
        m.encode().lines().any(|l| {
            l.starts_with("strait_response_total") && l.contains(needle) && l.ends_with(" 1")
        })
    }

    #[tokio::test]
    async fn grpc_status_from_trailers_and_unfinished_streams_are_failures() {
        let m = Arc::new(Metrics::new());
        let http = m.http(Direction::Outbound, "svc:80", None);
        // A streaming gRPC response ending with UNAVAILABLE in its trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().expect("value"));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let rec = http.response(
            200,
            None,
            "",
            std::time::Duration::from_millis(1),
            None,
            None,
        );
        let metered = Metered::new(body, rec, true, None);
        metered.collect().await.expect("body");
        assert!(
            count(&m, "grpc_status=\"14\",classification=\"failure\""),
            "{}",
            m.encode()
        );

        // An empty body that is never polled is complete.
        let rec = http.response(
            204,
            None,
            "",
            std::time::Duration::from_millis(1),
            None,
            None,
        );
        drop(Metered::new(Full::new(Bytes::new()), rec, false, None));
        assert!(
            count(
                &m,
                "status_code=\"204\",grpc_status=\"\",classification=\"success\""
            ),
            "{}",
            m.encode()
        );

        // A body dropped half way (client gone) is a failure.
        let rec = http.response(
            206,
            None,
            "",
            std::time::Duration::from_millis(1),
            None,
            None,
        );
        drop(Metered::new(
            Full::new(Bytes::from_static(b"abc")),
            rec,
            false,
            None,
        ));
        assert!(
            count(
                &m,
                "status_code=\"206\",grpc_status=\"\",classification=\"failure\""
            ),
            "{}",
            m.encode()
        );
    }
}
