//! The control plane's side of `strait.discovery.v1.Discovery`, written by hand so that shared
//! answers go out without a copy.
//!
//! tonic's generated server encodes every message of a stream into that stream's own buffer:
//! an answer shared by 200 watchers is copied 200 times, and each stream keeps a buffer as large
//! as the largest answer it ever sent. Here a destination answer or inbound policy is an
//! [`Encoded`] gRPC frame, and a stream's response body hands out that same `Bytes` (reference
//! counted) as its data frame; HTTP/2 queues it as it is. The messages on the wire are the
//! ordinary ones: proxies use the generated client.
//!
//! The service's shape is what tonic would generate: a [`Discovery`] trait and a
//! [`DiscoveryServer`] for `tonic::transport::Server::add_service`. Requests are decoded by
//! tonic (unary messages in a stream, compression refused, a size limit); trust anchors, small
//! and rare, go through tonic's server as generated.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Streaming};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::discovery::{
    DestinationUpdate, InboundPolicy, InboundRequest, TrustAnchors, TrustAnchorsRequest,
    WatchRequest,
};
use crate::encoded::Encoded;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// The largest request accepted (requests name a target or an identity: a few hundred bytes).
const MAX_REQUEST: usize = 16 * 1024;

/// The Discovery service, as the control plane implements it.
#[tonic::async_trait]
pub trait Discovery: Send + Sync + 'static {
    type WatchStream: Stream<Item = Result<Encoded<DestinationUpdate>, Status>> + Send + 'static;
    type WatchInboundStream: Stream<Item = Result<Encoded<InboundPolicy>, Status>> + Send + 'static;
    type WatchTrustAnchorsStream: Stream<Item = Result<TrustAnchors, Status>> + Send + 'static;

    /// A destination's answer, then a whole replacement on each change.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status>;

    /// A workload's inbound policy, then a whole replacement on each change.
    async fn watch_inbound(
        &self,
        request: Request<InboundRequest>,
    ) -> Result<Response<Self::WatchInboundStream>, Status>;

    /// The trust-anchor bundle, then each rotation.
    async fn watch_trust_anchors(
        &self,
        request: Request<TrustAnchorsRequest>,
    ) -> Result<Response<Self::WatchTrustAnchorsStream>, Status>;
}

/// Serves a [`Discovery`] implementation over gRPC.
pub struct DiscoveryServer<T> {
    inner: Arc<T>,
}

impl<T> DiscoveryServer<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for DiscoveryServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> NamedService for DiscoveryServer<T> {
    const NAME: &'static str = "strait.discovery.v1.Discovery";
}

impl<T, B> tonic::codegen::Service<http::Request<B>> for DiscoveryServer<T>
where
    T: Discovery,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            "/strait.discovery.v1.Discovery/Watch" => Box::pin(async move {
                Ok(match request(req).await {
                    Ok(req) => shared_response(inner.watch(req).await),
                    Err(status) => status.into_http(),
                })
            }),
            "/strait.discovery.v1.Discovery/WatchInbound" => Box::pin(async move {
                Ok(match request(req).await {
                    Ok(req) => shared_response(inner.watch_inbound(req).await),
                    Err(status) => status.into_http(),
                })
            }),
            "/strait.discovery.v1.Discovery/WatchTrustAnchors" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                    .max_decoding_message_size(MAX_REQUEST);
                Ok(grpc.server_streaming(Anchors(inner), req).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

/// Decodes a unary request (one message; a compressed one is refused, as tonic does when no
/// compression is enabled).
async fn request<M, B>(req: http::Request<B>) -> Result<Request<M>, Status>
where
    M: Message + Default + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    if let Some(encoding) = req.headers().get("grpc-encoding") {
        if encoding != "identity" {
            return Err(Status::unimplemented(format!(
                "request compressed with {encoding:?}: this server takes uncompressed requests"
            )));
        }
    }
    let (parts, body) = req.into_parts();
    let decoder =
        tonic_prost::ProstCodec::<M, M>::raw_decoder(BufferSettings::new(1024, 32 * 1024));
    let mut stream = Box::pin(Streaming::new_request(
        decoder,
        body,
        None,
        Some(MAX_REQUEST),
    ));
    let message = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))
        .await
        .transpose()?
        .ok_or_else(|| Status::invalid_argument("the request carries no message"))?;
    Ok(Request::from_http(http::Request::from_parts(
        parts, message,
    )))
}

/// The HTTP response of a stream of shared answers: gRPC headers, then each answer's frame as
/// it is, then the status in the trailers.
fn shared_response<M, S>(response: Result<Response<S>, Status>) -> http::Response<Body>
where
    M: Send + 'static,
    S: Stream<Item = Result<Encoded<M>, Status>> + Send + 'static,
{
    let response = match response {
        Ok(response) => response,
        Err(status) => return status.into_http(),
    };
    let (metadata, stream, extensions) = response.into_parts();
    let mut http = http::Response::new(Body::new(SharedBody {
        stream: Box::pin(stream),
        done: false,
    }));
    *http.headers_mut() = metadata.into_headers();
    *http.extensions_mut() = extensions;
    http.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    http
}

/// A response body that sends each [`Encoded`] frame without copying it.
struct SharedBody<S> {
    stream: Pin<Box<S>>,
    done: bool,
}

impl<M, S> http_body::Body for SharedBody<S>
where
    S: Stream<Item = Result<Encoded<M>, Status>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.stream.as_mut().poll_next(cx)) {
            Some(Ok(answer)) => return Poll::Ready(Some(Ok(Frame::data(answer.frame().clone())))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = HeaderMap::new();
        if let Err(status) = status.add_header(&mut trailers) {
            // Only a message that cannot be a header value fails; say so instead.
            let _ = Status::internal(status.message().to_string()).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Trust anchors through tonic's generated-style path.
struct Anchors<T>(Arc<T>);

impl<T: Discovery> ServerStreamingService<TrustAnchorsRequest> for Anchors<T> {
    type Response = TrustAnchors;
    type ResponseStream = T::WatchTrustAnchorsStream;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<TrustAnchorsRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.watch_trust_anchors(request).await })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use futures_util::StreamExt as _;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::discovery::discovery_client::DiscoveryClient;
    use crate::discovery::{destination_update::Update, Destination, Endpoint};

    type Answers<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

    fn answer(port: u32) -> DestinationUpdate {
        DestinationUpdate {
            update: Some(Update::Destination(Destination {
                service: "web.shop.svc.cluster.local:80".into(),
                endpoints: vec![Endpoint {
                    ip: "10.0.0.2".into(),
                    port,
                    meshed: true,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }
    }

    /// Two answers, then the status the request's target names (or the end).
    struct Fixed(Encoded<DestinationUpdate>, Encoded<DestinationUpdate>);

    #[tonic::async_trait]
    impl Discovery for Fixed {
        type WatchStream = Answers<Encoded<DestinationUpdate>>;
        type WatchInboundStream = Answers<Encoded<InboundPolicy>>;
        type WatchTrustAnchorsStream = Answers<TrustAnchors>;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let mut items = vec![Ok(self.0.clone()), Ok(self.1.clone())];
            match request.into_inner().target.as_str() {
                "refuse" => return Err(Status::permission_denied("not yours")),
                "fail" => items.push(Err(Status::unavailable("shutting down"))),
                _ => {}
            }
            Ok(Response::new(Box::pin(futures_util::stream::iter(items))))
        }

        async fn watch_inbound(
            &self,
            _: Request<InboundRequest>,
        ) -> Result<Response<Self::WatchInboundStream>, Status> {
            Err(Status::unimplemented("no"))
        }

        async fn watch_trust_anchors(
            &self,
            _: Request<TrustAnchorsRequest>,
        ) -> Result<Response<Self::WatchTrustAnchorsStream>, Status> {
            let pem = TrustAnchors { pem: "PEM".into() };
            Ok(Response::new(Box::pin(futures_util::stream::iter([Ok(
                pem,
            )]))))
        }
    }

    fn fixed() -> Fixed {
        Fixed(Encoded::new(&answer(1)), Encoded::new(&answer(2)))
    }

    #[tokio::test]
    async fn each_answer_is_the_shared_frame_itself_and_the_stream_ends_with_its_status() {
        let service = fixed();
        let first = service.0.frame().clone();
        let response = shared_response(service.watch(Request::new(Default::default())).await);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let mut body = response.into_body();
        let frame = body
            .frame()
            .await
            .expect("a frame")
            .expect("not an error")
            .into_data()
            .expect("data");
        // Not a copy: the very bytes every other watcher of the answer sends.
        assert_eq!(frame.as_ptr(), first.as_ptr());
        assert_eq!(frame.len(), first.len());
        let _second = body.frame().await.expect("a frame").expect("not an error");
        let trailers = body
            .frame()
            .await
            .expect("a frame")
            .expect("not an error")
            .into_trailers()
            .expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert!(http_body::Body::is_end_stream(&body));
        assert!(body.frame().await.is_none());
    }

    async fn serve() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DiscoveryServer::new(fixed()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    async fn client(addr: SocketAddr) -> DiscoveryClient<tonic::transport::Channel> {
        DiscoveryClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
    }

    fn watch(target: &str) -> WatchRequest {
        WatchRequest {
            target: target.into(),
            proxy: "shop/web-0".into(),
        }
    }

    async fn next_answer(stream: &mut tonic::Streaming<DestinationUpdate>) -> DestinationUpdate {
        stream
            .message()
            .await
            .expect("not an error")
            .expect("an answer")
    }

    #[tokio::test]
    async fn the_generated_client_reads_shared_answers_and_statuses() {
        let addr = serve().await;
        let mut client = client(addr).await;

        let mut stream = client
            .watch(watch("web:80"))
            .await
            .expect("a stream")
            .into_inner();
        assert_eq!(next_answer(&mut stream).await, answer(1));
        assert_eq!(next_answer(&mut stream).await, answer(2));
        assert!(stream.next().await.is_none(), "the stream ends with OK");

        let mut stream = client
            .watch(watch("fail"))
            .await
            .expect("a stream")
            .into_inner();
        assert_eq!(next_answer(&mut stream).await, answer(1));
        assert_eq!(next_answer(&mut stream).await, answer(2));
        let status = stream
            .next()
            .await
            .expect("a status")
            .expect_err("an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "shutting down");

        let status = client.watch(watch("refuse")).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "not yours");

        let status = client
            .watch_inbound(InboundRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unimplemented);

        let mut anchors = client
            .watch_trust_anchors(TrustAnchorsRequest::default())
            .await
            .expect("a stream")
            .into_inner();
        assert_eq!(
            anchors
                .next()
                .await
                .expect("anchors")
                .expect("not an error")
                .pem,
            "PEM"
        );
    }

    #[tokio::test]
    async fn a_request_too_large_or_compressed_or_for_no_method_is_refused() {
        let addr = serve().await;
        let mut client = client(addr).await;
        let status = client
            .watch(watch(&"x".repeat(MAX_REQUEST + 1)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

        let compressed = http::Request::builder()
            .uri("/strait.discovery.v1.Discovery/Watch")
            .header("grpc-encoding", "gzip")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let mut server = DiscoveryServer::new(fixed());
        let response = tonic::codegen::Service::call(&mut server, compressed)
            .await
            .expect("infallible");
        assert_eq!(response.headers()["grpc-status"], "12");

        let empty = http::Request::builder()
            .uri("/strait.discovery.v1.Discovery/Watch")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = tonic::codegen::Service::call(&mut server, empty)
            .await
            .expect("infallible");
        assert_eq!(response.headers()["grpc-status"], "3", "no message");

        let other = http::Request::builder()
            .uri("/strait.discovery.v1.Discovery/Other")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = tonic::codegen::Service::call(&mut server, other)
            .await
            .expect("infallible");
        assert_eq!(response.headers()["grpc-status"], "12");
    }
}
