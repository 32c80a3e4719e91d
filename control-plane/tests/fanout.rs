//! Discovery fan-out over the real transport: every stream gets its answer, a change reaches
//! exactly the streams whose answer it changed, and many streams of one answer get the same
//! bytes.

use std::sync::Arc;
use std::time::Duration;

use strait_api::discovery::destination_update::Update;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{DestinationUpdate, InboundRequest, WatchRequest};
use strait_api::shared::DiscoveryServer;
use strait_control_plane::admin::Metrics;
use strait_control_plane::discovery::DiscoveryService;
use strait_control_plane::index::{MeshIndex, Naming};
use strait_control_plane::local::parse::parse_documents;
use tokio::sync::watch;

fn service(name: &str, ip: &str, endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|e| format!("- addresses: [{e}]\n"))
        .collect();
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\n  annotations: {{strait.io/service-account: {name}}}\nendpoints:\n{eps}ports: [{{name: http, port: 8080}}]\n"
    )
}

fn index(web: &[&str], api: &[&str]) -> Arc<MeshIndex> {
    let text = format!(
        "{}---\n{}",
        service("web", "10.96.0.10", web),
        service("api", "10.96.0.11", api)
    );
    let resources = parse_documents(&text).expect("valid YAML");
    Arc::new(MeshIndex::build(&resources, &Naming::default()))
}

fn endpoints(answer: &DestinationUpdate) -> Vec<String> {
    match &answer.update {
        Some(Update::Destination(d)) => d.endpoints.iter().map(|e| e.ip.clone()).collect(),
        other => panic!("a destination, got {other:?}"),
    }
}

#[tokio::test]
async fn a_change_reaches_only_the_streams_whose_answer_it_changed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = watch::channel(index(&["10.0.0.1"], &["10.0.1.1"]));
    let (_stop_tx, stopping) = watch::channel(false);
    let service = DiscoveryService::new(rx, Arc::new(Metrics::default()), stopping);
    tokio::spawn(
        strait_control_plane::limits::server()
            .add_service(DiscoveryServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = DiscoveryClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let watch = |target: &str| WatchRequest {
        target: target.into(),
        proxy: "shop/client".into(),
    };
    // Three streams of web (two spellings of it), one of api, one inbound policy.
    let mut web = Vec::new();
    for target in [
        "10.96.0.10:80",
        "10.96.0.10:80",
        "web.shop.svc.cluster.local:80",
    ] {
        let mut s = client
            .watch(watch(target))
            .await
            .expect("served")
            .into_inner();
        let first = s.message().await.expect("answer").expect("an answer");
        assert_eq!(endpoints(&first), ["10.0.0.1"]);
        web.push(s);
    }
    let mut api = client
        .watch(watch("10.96.0.11:80"))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(
        endpoints(&api.message().await.expect("answer").expect("an answer")),
        ["10.0.1.1"]
    );
    let mut inbound = client
        .watch_inbound(InboundRequest {
            identity: "spiffe://cluster.local/ns/shop/sa/api".into(),
            proxy: "shop/api".into(),
        })
        .await
        .expect("served")
        .into_inner();
    assert!(inbound.message().await.expect("policy").is_some());

    // web gains an endpoint: every web stream gets it, api's and the inbound stay quiet.
    tx.send_replace(index(&["10.0.0.1", "10.0.0.2"], &["10.0.1.1"]));
    for s in &mut web {
        let next = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("the change arrives")
            .expect("answer")
            .expect("an answer");
        assert_eq!(endpoints(&next), ["10.0.0.1", "10.0.0.2"]);
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), api.message()).await;
    assert!(quiet.is_err(), "api's answer did not change: {quiet:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(100), inbound.message()).await;
    assert!(
        quiet.is_err(),
        "the inbound policy did not change: {quiet:?}"
    );

    // An index rebuilt with equal answers (new Arcs) wakes no one either.
    tx.send_replace(index(&["10.0.0.1", "10.0.0.2"], &["10.0.1.1"]));
    for s in &mut web {
        let quiet = tokio::time::timeout(Duration::from_millis(200), s.message()).await;
        assert!(quiet.is_err(), "web's answer did not change: {quiet:?}");
    }
    // A stream opened now gets the current answer at once.
    let mut late = client
        .watch(watch("web.shop.svc.cluster.local:80"))
        .await
        .expect("served")
        .into_inner();
    assert_eq!(
        endpoints(&late.message().await.expect("answer").expect("an answer")),
        ["10.0.0.1", "10.0.0.2"]
    );
}
