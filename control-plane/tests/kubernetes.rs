//! The Kubernetes mode against a fake API server that answers with JSON captured from a real
//! one (testdata/k8s): lists, watch streams (with a 410 that forces a relist), and TokenReview.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use strait_api::discovery::destination_update::Update;
use strait_api::identity::identity_server::Identity;
use strait_api::identity::CertifyRequest;
use strait_control_plane::identity::{IdentityService, Issuer};
use strait_control_plane::index::{MeshIndex, Naming};
use strait_control_plane::local::LocalSource;
use strait_control_plane::tokens::Authenticator;
use strait_identity::SpiffeId;
use tokio::sync::{mpsc, watch};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn testdata(path: &str) -> String {
    let path = format!("{}/../testdata/k8s/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn service(name: &str, ip: &str, ports: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "resourceVersion": "200", "managedFields": [{"manager": "kubectl"}]},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, "type": "ClusterIP",
                    "sessionAffinity": "None"},
           "status": {"loadBalancer": {}}})
}

fn services() -> Vec<Value> {
    let http = json!([{"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80, "targetPort": "http"},
                      {"name": "metrics", "protocol": "TCP", "port": 9090, "targetPort": 9090}]);
    let mut out = vec![service("web", "10.96.0.107", http.clone())];
    for (name, ip) in [("web-v1", "10.96.0.108"), ("web-v2", "10.96.0.109")] {
        out.push(service(name, ip, http.clone()));
    }
    let grpc = json!([{"name": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c", "port": 9000, "targetPort": 9000}]);
    for (name, ip) in [
        ("orders", "10.96.0.110"),
        ("orders-v1", "10.96.0.111"),
        ("orders-v2", "10.96.0.112"),
    ] {
        out.push(service(name, ip, grpc.clone()));
    }
    out
}

fn pods() -> Vec<Value> {
    ["web", "web-7d9c-xr4qp", "web-injected"]
        .iter()
        .map(|name| {
            json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx"}]},
                   "status": {"phase": "Running"}})
        })
        .collect()
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> String {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "255"}, "items": items})
        .to_string()
}

/// What the fake API server answers, and what it saw.
#[derive(Default)]
struct Api {
    /// Path -> list body.
    lists: HashMap<&'static str, String>,
    /// Path -> watch bodies, one per watch call; later calls get an idle stream.
    watches: HashMap<&'static str, Vec<String>>,
    /// Paths answered 404 (a CRD that is not installed).
    missing: Vec<&'static str>,
    /// Token -> (status, TokenReview answer).
    reviews: HashMap<&'static str, (u16, String)>,
    calls: Vec<String>,
    /// PATCH requests: (path, body).
    patches: Vec<(String, Value)>,
    /// The API server is down: every request gets a 503.
    down: bool,
    /// Watch streams held open.
    open: Vec<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
}

fn full(status: u16, body: String) -> Response<Body> {
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(api: Arc<Mutex<Api>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    let is_watch = query.contains("watch=true") || query.contains("watch=1");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut api = api.lock().unwrap_or_else(|p| p.into_inner());
    api.calls.push(format!(
        "{} {path}",
        if is_watch { "WATCH" } else { "LIST" }
    ));
    if api.down {
        return full(
            503,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "ServiceUnavailable", "code": 503, "message": "etcd is down"})
            .to_string(),
        );
    }
    if method == hyper::Method::PATCH {
        let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
        api.patches.push((path, patch.clone()));
        return full(200, json!({"kind": "HTTPRoute", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {"name": "x"}}).to_string());
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let review: Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = review["spec"]["token"].as_str().unwrap_or("");
        assert_eq!(review["spec"]["audiences"], json!(["identity.strait.io"]));
        return match api.reviews.get(token) {
            Some((status, body)) => full(*status, body.clone()),
            None => full(500, "{}".into()),
        };
    }
    if api.missing.iter().any(|m| *m == path) {
        return full(404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"}).to_string());
    }
    if !is_watch {
        return match api.lists.get(path.as_str()) {
            Some(body) => full(200, body.clone()),
            None => full(404, "{}".into()),
        };
    }
    // A watch: the scripted events (if any left), then an open, idle stream.
    let events = api
        .watches
        .get_mut(path.as_str())
        .and_then(|w| (!w.is_empty()).then(|| w.remove(0)));
    let (tx, rx) = mpsc::channel(16);
    let ends = events.as_deref().is_some_and(|e| e.contains("\"ERROR\""));
    if let Some(events) = events {
        for line in events.lines() {
            let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("{line}\n")))));
        }
    }
    if !ends {
        api.open.push(tx);
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn start(api: Api) -> (SocketAddr, Arc<Mutex<Api>>) {
    let api = Arc::new(Mutex::new(api));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shared = api.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let api = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(answer(api, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, api)
}

fn client(addr: SocketAddr) -> kube::Client {
    let url = format!("http://{addr}").parse().expect("url");
    strait_control_plane::kubernetes::client(kube::Config::new(url)).expect("client")
}

/// Starts the fake API server with `api` and the control plane's Kubernetes mode against it;
/// returns once it is ready, with its published state, what the server saw and its readiness.
async fn run_against(
    api: Api,
) -> (
    watch::Receiver<Arc<MeshIndex>>,
    Arc<Mutex<Api>>,
    watch::Receiver<bool>,
) {
    let (addr, api) = start(api).await;
    let (tx, rx) = watch::channel(Arc::new(MeshIndex::default()));
    let (ready_tx, mut ready) = watch::channel(false);
    tokio::spawn(strait_control_plane::kubernetes::run(
        client(addr),
        Naming::default(),
        tx,
        ready_tx,
    ));
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("ready (a missing optional CRD does not hold it back)")
        .expect("ready");
    (rx, api, ready)
}

fn cluster_api() -> Api {
    let mut api = Api::default();
    api.lists
        .insert("/api/v1/services", list("ServiceList", "v1", services()));
    api.lists
        .insert("/api/v1/pods", list("PodList", "v1", pods()));
    api.lists.insert(
        "/apis/discovery.k8s.io/v1/endpointslices",
        testdata("watch/endpointslices-list.json"),
    );
    api.lists.insert(
        "/apis/split.smi-spec.io/v1alpha4/trafficsplits",
        testdata("crd/trafficsplits-v1alpha4-list.json"),
    );
    api.lists.insert(
        "/apis/specs.smi-spec.io/v1alpha4/httproutegroups",
        list(
            "HTTPRouteGroupList",
            "specs.smi-spec.io/v1alpha4",
            vec![json!({
            "metadata": {"name": "web-canary-users", "namespace": "shop"},
            "spec": {"matches": [{"name": "beta", "headers": {"x-user": "beta"}}]}})],
        ),
    );
    api.lists.insert(
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        testdata("crd/httproutes-v1-list.json"),
    );
    // The AuthorizationPolicy CRD is not installed: that kind is retried, the rest served.
    api.missing
        .push("/apis/policy.strait.io/v1alpha1/authorizationpolicies");
    api
}

/// The same objects as local-mode YAML files: services, pods, routes and the slice as the
/// watch left it (the last event re-created it).
fn local_index(final_slice: &Value) -> MeshIndex {
    let dir = std::env::temp_dir().join(format!("strait-k8s-same-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut docs = Vec::new();
    let with_kind = |mut v: Value, kind: &str, api_version: &str| {
        v["kind"] = json!(kind);
        v["apiVersion"] = json!(api_version);
        v
    };
    docs.extend(
        services()
            .into_iter()
            .map(|s| with_kind(s, "Service", "v1")),
    );
    docs.extend(pods().into_iter().map(|p| with_kind(p, "Pod", "v1")));
    docs.push(with_kind(
        final_slice.clone(),
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ));
    for (file, kind) in [
        ("crd/trafficsplits-v1alpha4-list.json", "TrafficSplit"),
        ("crd/httproutes-v1-list.json", "HTTPRoute"),
    ] {
        let list: Value = serde_json::from_str(&testdata(file)).expect("list");
        for item in list["items"].as_array().expect("items") {
            docs.push(with_kind(item.clone(), kind, "x/v1"));
        }
    }
    docs.push(
        json!({"kind": "HTTPRouteGroup", "apiVersion": "specs.smi-spec.io/v1alpha4",
        "metadata": {"name": "web-canary-users", "namespace": "shop"},
        "spec": {"matches": [{"name": "beta", "headers": {"x-user": "beta"}}]}}),
    );
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("yaml"))
        .collect();
    std::fs::write(dir.join("mesh.yaml"), text.join("---\n")).expect("write");
    let mut source = LocalSource::new(&dir);
    source.scan().expect("scan");
    assert!(source.errors().is_empty(), "{:?}", source.errors());
    let index = MeshIndex::update(&source.resources(), &Naming::default(), None);
    std::fs::remove_dir_all(&dir).ok();
    index
}

const TARGETS: [&str; 6] = [
    "10.96.0.107:80",
    "web.shop.svc.cluster.local:80",
    "10.96.0.107:9090",
    "web-v1.shop.svc.cluster.local:80",
    "orders.shop.svc.cluster.local:9000",
    "10.96.0.112:9000",
];

fn endpoints(index: &MeshIndex, target: &str) -> Vec<String> {
    match &index.lookup(target, None).update {
        Some(Update::Destination(d)) => d
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect(),
        _ => Vec::new(),
    }
}

async fn converge(rx: &watch::Receiver<Arc<MeshIndex>>, expected: &MeshIndex) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let current = rx.borrow().clone();
        if TARGETS
            .iter()
            .all(|t| current.lookup(t, None) == expected.lookup(t, None))
        {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            for t in TARGETS {
                assert_eq!(current.lookup(t, None), expected.lookup(t, None), "{t}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_and_a_410_relist_give_the_same_state_as_local_yaml() {
    let mut api = cluster_api();
    // First watch: expired (410), which forces a relist; second: the captured edits.
    api.watches.insert(
        "/apis/discovery.k8s.io/v1/endpointslices",
        vec![
            testdata("watch/endpointslices-watch-410.jsonl"),
            testdata("watch/endpointslices-watch.jsonl"),
        ],
    );
    let (rx, api, _) = run_against(api).await;

    let last_event = testdata("watch/endpointslices-watch.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["type"] == "ADDED")
        .expect("an ADDED event");
    let expected = local_index(&last_event["object"]);
    converge(&rx, &expected).await;

    // After the edits: the terminating endpoint is gone and the unready one is not served.
    assert_eq!(
        endpoints(&rx.borrow(), "10.96.0.107:80"),
        ["10.244.1.11:8080"]
    );
    let calls = api.lock().expect("lock").calls.clone();
    let slice_lists = calls
        .iter()
        .filter(|c| *c == "LIST /apis/discovery.k8s.io/v1/endpointslices")
        .count();
    assert!(slice_lists >= 2, "the 410 forced a relist: {calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_endpoints_are_served_with_their_identity_and_kept_through_an_outage() {
    let (rx, api, ready) = run_against(cluster_api()).await;
    let listed: Value =
        serde_json::from_str(&testdata("watch/endpointslices-list.json")).expect("list");
    let expected = local_index(&listed["items"][0]);
    converge(&rx, &expected).await;
    let index = rx.borrow().clone();
    let mut eps = endpoints(&index, "web.shop.svc.cluster.local:80");
    eps.sort();
    assert_eq!(
        eps,
        ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.2.17:8080"]
    );
    let Some(Update::Destination(d)) = &index.lookup("10.96.0.107:80", None).update else {
        panic!("web is in the mesh");
    };
    assert!(d
        .endpoints
        .iter()
        .all(|e| e.identity == "spiffe://cluster.local/ns/shop/sa/web"));
    assert!(
        !d.routes.is_empty(),
        "the HTTPRoute's routes reach the service"
    );

    // The API server goes down: watches break, relists fail, and the last state stays.
    let before = api.lock().expect("lock").calls.len();
    {
        let mut api = api.lock().expect("lock");
        api.down = true;
        api.open.clear();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = api.lock().expect("lock").calls.len();
    assert!(during > before, "the watchers retried");
    for t in TARGETS {
        assert_eq!(
            rx.borrow().lookup(t, None),
            expected.lookup(t, None),
            "{t} kept during the outage"
        );
    }
    assert!(*ready.borrow(), "still ready: serving the last known state");

    // The outage goes on (8 s in all, long enough for any backoff to grow), then the API server
    // returns with one endpoint fewer: the watchers resume within WatchBackoff's cap.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut fewer = listed.clone();
    if let Some(eps) = fewer["items"][0]["endpoints"].as_array_mut() {
        eps.pop();
    }
    {
        let mut api = api.lock().expect("lock");
        api.lists.insert(
            "/apis/discovery.k8s.io/v1/endpointslices",
            fewer.to_string(),
        );
        // As a real API server after a while: the watch's resourceVersion is too old (410).
        api.watches.insert(
            "/apis/discovery.k8s.io/v1/endpointslices",
            vec![testdata("watch/endpointslices-watch-410.jsonl")],
        );
        api.down = false;
    }
    let back = std::time::Instant::now();
    loop {
        if endpoints(&rx.borrow(), "web.shop.svc.cluster.local:80").len() == 2 {
            break;
        }
        // The backoff's cap plus room for a loaded machine.
        let bound =
            strait_control_plane::kubernetes::WatchBackoff::CAP + Duration::from_millis(1500);
        assert!(
            back.elapsed() < bound,
            "watches did not resume within {bound:?} of the API server's return"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "after an 8 s outage the new state was served {:?} after the API server returned",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_decides_which_identity_is_signed() {
    let mut api = Api::default();
    api.reviews.insert(
        "valid-token",
        (201, testdata("tokenreview/valid.response.json")),
    );
    api.reviews.insert(
        "garbage",
        (201, testdata("tokenreview/garbage.response.json")),
    );
    api.reviews.insert(
        "forbidden",
        (403, testdata("tokenreview/forbidden.response.json")),
    );
    let (addr, api) = start(api).await;

    let dir = std::env::temp_dir().join(format!("strait-k8s-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .expect("ca");
    std::fs::write(dir.join("issuer.crt"), &ca.issuer_cert_pem).expect("write");
    std::fs::write(dir.join("issuer.key"), &ca.issuer_key_pem).expect("write");
    let issuer = Issuer::load(dir.join("issuer.crt"), dir.join("issuer.key")).expect("issuer");
    let metrics = Arc::new(strait_control_plane::admin::Metrics::default());
    let service = IdentityService {
        metrics: metrics.clone(),
        tokens: Authenticator::kubernetes(client(addr), "identity.strait.io".into()),
        issuer: Arc::new(issuer),
        trust_domain: "cluster.local".into(),
        leaf_lifetime: Duration::from_secs(600),
        rate: Arc::new(strait_control_plane::limits::RateLimit::new(100.0, 100.0)),
    };
    let certify = |sa: &str, token: &str| {
        let id = SpiffeId::new("cluster.local", "shop", sa).expect("id");
        let (_key, csr) = strait_identity::ca::new_csr(&id).expect("csr");
        tonic::Request::new(CertifyRequest {
            identity: id.to_string(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
    };
    let signed = service
        .certify(certify("web", "valid-token"))
        .await
        .expect("the token's own account is signed")
        .into_inner();
    assert_eq!(
        strait_identity::ca::spiffe_ids(&signed.leaf_certificate),
        ["spiffe://cluster.local/ns/shop/sa/web"]
    );
    let other = service
        .certify(certify("admin", "valid-token"))
        .await
        .expect_err("another account");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    let garbage = service
        .certify(certify("web", "garbage"))
        .await
        .expect_err("a token TokenReview rejects");
    assert_eq!(garbage.code(), tonic::Code::Unauthenticated);
    assert!(
        garbage.message().contains("invalid bearer token"),
        "{}",
        garbage.message()
    );
    let forbidden = service
        .certify(certify("web", "forbidden"))
        .await
        .expect_err("a failing TokenReview");
    assert_eq!(forbidden.code(), tonic::Code::Unavailable);
    // The valid token was reviewed once, though used twice; the failed review is not cached.
    let reviews = |api: &Arc<Mutex<Api>>| {
        api.lock()
            .expect("lock")
            .calls
            .iter()
            .filter(|c| c.contains("tokenreviews"))
            .count()
    };
    assert_eq!(reviews(&api), 3, "valid (once), garbage, forbidden");
    let _ = service.certify(certify("web", "forbidden")).await;
    assert_eq!(reviews(&api), 4, "a failed review is asked again");
    let text = metrics.encode(&MeshIndex::default(), true);
    for needle in [
        "strait_control_plane_certificates_total{result=\"signed\",reason=\"\"} 1",
        "strait_control_plane_certificates_total{result=\"refused\",reason=\"identity\"} 1",
        "strait_control_plane_certificates_total{result=\"refused\",reason=\"token\"} 1",
        "strait_control_plane_certificates_total{result=\"refused\",reason=\"token_review\"} 2",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// GAMMA against the API server: the hijack seen on a real v1.32 cluster (a route in another
/// namespace naming `shop/web` as its parent) reaches only its own namespace's clients, a
/// cross-namespace backend without a ReferenceGrant gets no endpoints, and both routes get
/// their conditions written to `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_routes_stay_in_their_namespace_and_route_status_is_written() {
    let mut api = cluster_api();
    api.lists.insert(
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        list(
            "HTTPRouteList",
            "gateway.networking.k8s.io/v1",
            vec![
                json!({"metadata": {"name": "takeover", "namespace": "plain", "generation": 3},
                       "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "namespace": "shop", "port": 80}],
                                "rules": [{"backendRefs": [{"name": "orders", "namespace": "shop", "port": 9000}]}]}}),
            ],
        ),
    );
    api.lists.insert(
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        list(
            "ReferenceGrantList",
            "gateway.networking.k8s.io/v1beta1",
            vec![],
        ),
    );
    let (rx, api, _) = run_against(api).await;
    let routes_seen_by = |ns: Option<&str>| -> Vec<String> {
        match &rx
            .borrow()
            .lookup("web.shop.svc.cluster.local:80", ns)
            .update
        {
            Some(Update::Destination(d)) => d
                .routes
                .iter()
                .flat_map(|r| {
                    r.backends
                        .iter()
                        .map(|b| format!("{}:{}", b.service, b.exists))
                })
                .collect(),
            _ => vec!["not in mesh".into()],
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while routes_seen_by(Some("plain")).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The consumer route applies to `plain` only; its backend in `shop` has no grant.
    assert_eq!(routes_seen_by(Some("plain")), ["orders.shop:9000:false"]);
    // Everyone else keeps the producer's view (the captured TrafficSplit of shop/web).
    for ns in [Some("shop"), Some("default"), None] {
        let seen = routes_seen_by(ns);
        assert!(
            !seen.iter().any(|b| b.starts_with("orders")),
            "{ns:?}: {seen:?}"
        );
        assert!(
            seen.iter().any(|b| b.starts_with("web-v1")),
            "{ns:?}: {seen:?}"
        );
    }
    // Its status: accepted as a consumer route, refs not permitted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let patch = loop {
        let found = api
            .lock()
            .expect("lock")
            .patches
            .iter()
            .find(|(p, _)| p == "/apis/gateway.networking.k8s.io/v1/namespaces/plain/httproutes/takeover/status")
            .cloned();
        if let Some(found) = found {
            break found.1;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status PATCH");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let parent = &patch["status"]["parents"][0];
    assert_eq!(parent["parentRef"]["name"], "web");
    assert_eq!(parent["parentRef"]["namespace"], "shop");
    assert_eq!(parent["controllerName"], "strait.io/mesh");
    let conditions = parent["conditions"].as_array().expect("conditions");
    let find = |t: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .expect(t)
    };
    assert_eq!(find("Accepted")["status"], "True");
    assert!(find("Accepted")["message"]
        .as_str()
        .unwrap_or("")
        .contains("clients in namespace plain only"));
    assert_eq!(find("ResolvedRefs")["status"], "False");
    assert_eq!(find("ResolvedRefs")["reason"], "RefNotPermitted");
    assert_eq!(find("ResolvedRefs")["observedGeneration"], 3);
}
