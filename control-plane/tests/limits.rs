//! The discovery server's limits over the real transport: a caller past its watch limit is
//! refused, not served, and gets its slots back when its streams end.

use std::sync::Arc;
use std::time::Duration;

use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::WatchRequest;
use strait_api::shared::DiscoveryServer;
use strait_control_plane::admin::Metrics;
use strait_control_plane::discovery::DiscoveryService;
use strait_control_plane::index::MeshIndex;
use tokio::sync::watch;

#[tokio::test]
async fn watches_past_the_per_caller_limit_are_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_tx, rx) = watch::channel(Arc::new(MeshIndex::default()));
    let (_stop_tx, stopping) = watch::channel(false);
    let service =
        DiscoveryService::new(rx, Arc::new(Metrics::default()), stopping).with_watch_limit(3);
    tokio::spawn(
        strait_control_plane::limits::server()
            .add_service(DiscoveryServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let request = |n: usize| WatchRequest {
        target: format!("10.96.0.{n}:80"),
        proxy: "default/greedy".into(),
    };
    let mut open = Vec::new();
    for n in 0..3 {
        let mut stream = client.watch(request(n)).await.expect("served").into_inner();
        // Each is really served: the first answer comes.
        assert!(stream.message().await.expect("answer").is_some());
        open.push(stream);
    }
    let refused = client.watch(request(3)).await.expect_err("a fourth watch");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    // One ends: its slot is free again.
    drop(open.pop());
    let mut again = None;
    for _ in 0..50 {
        if let Ok(s) = client.watch(request(4)).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the freed slot is usable");
}
