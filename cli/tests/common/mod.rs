//! Shared by the CLI's integration tests: a fake Kubernetes API server and a kubeconfig for it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// A kubeconfig whose current context is the API server at `addr`, without credentials.
pub fn write_kubeconfig(path: &Path, addr: std::net::SocketAddr) {
    std::fs::write(path, format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{addr}'}}}}]\n\
         users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n"
    ))
    .expect("kubeconfig");
}

/// Answers each path with its bodies in turn (the last one repeated); counts the calls.
pub async fn fake_api(
    bodies: HashMap<String, Vec<String>>,
) -> (std::net::SocketAddr, Arc<HashMap<String, AtomicUsize>>) {
    let calls: Arc<HashMap<String, AtomicUsize>> = Arc::new(
        bodies
            .keys()
            .map(|k| (k.clone(), AtomicUsize::new(0)))
            .collect(),
    );
    let bodies = Arc::new(bodies);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (bodies, calls) = (bodies.clone(), calls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_string();
                        let body = bodies.get(&path).map(|list| {
                            let n = calls[&path].fetch_add(1, Ordering::SeqCst);
                            list[n.min(list.len() - 1)].clone()
                        });
                        async move {
                            let mut r = match body {
                                // A body "403" stands for RBAC refusing the request.
                                Some(b) if b.trim_matches('"') == "403" => {
                                    let mut r = Response::new(Full::new(Bytes::from(
                                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                               "reason": "Forbidden", "code": 403,
                                               "message": "secrets is forbidden"}).to_string(),
                                    )));
                                    *r.status_mut() = StatusCode::FORBIDDEN;
                                    r
                                }
                                Some(b) => Response::new(Full::new(Bytes::from(b))),
                                None => {
                                    let mut r = Response::new(Full::new(Bytes::from(
                                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                           "reason": "NotFound", "code": 404}).to_string(),
                                )));
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                    r
                                }
                            };
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().expect("value"));
                            Ok::<_, Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, counts)
}
