//! The leaf of the stack: one backend service's endpoints. Picks an endpoint (P2C over
//! peak-EWMA) and sends the request to it: over the pooled mTLS HTTP/2 connection to a meshed
//! peer, or straight to an unmeshed one in the client's protocol.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::Either;
use tower::Service;

use super::{Egress, Req, Rsp};
use crate::balance::Balancer;
use crate::http::client::send_upgrade;
use crate::http::error::ProxyError;
use crate::http::forward::{direct, to_peer};
use crate::http::headers::is_upgrade;
use crate::metrics::{Destination, Label};

/// Endpoints a request may try when connections fail (nothing was sent to them).
const CONNECT_TRIES: usize = 3;

#[derive(Debug, Clone)]
pub struct Balance {
    balancer: Arc<Balancer>,
    /// The backend service, `web.shop.svc.cluster.local:80`.
    service: Arc<str>,
    egress: Arc<Egress>,
}

impl Balance {
    pub fn new(balancer: Arc<Balancer>, service: Arc<str>, egress: Arc<Egress>) -> Self {
        Self {
            balancer,
            service,
            egress,
        }
    }

    /// Sends `req` to an endpoint.
    ///
    /// A meshed endpoint whose connection cannot be established costs the request nothing:
    /// nothing was sent, so it moves to another endpoint (up to [`CONNECT_TRIES`]), and the
    /// failure counts against that endpoint at once. An endpoint whose first connection is
    /// still being attempted is passed over when another one is already connected, so requests
    /// do not queue behind a connect to a black-holed endpoint.
    pub async fn send(&self, req: Req) -> Result<Rsp, ProxyError> {
        send_to(&self.balancer, &self.service, &self.egress, req).await
    }
}

/// [`Balance::send`] without the service: the path of a request to a destination without
/// routes, which needs no stack.
pub async fn send_to(
    balancer: &Balancer,
    service: &Arc<str>,
    egress: &Egress,
    mut req: Req,
) -> Result<Rsp, ProxyError> {
    let upgrade = is_upgrade(&req);
    let no_endpoints = || ProxyError::NoEndpoints(service.to_string());
    let mut endpoint = balancer.pick().ok_or_else(no_endpoints)?;
    let mut tries = 0;
    let in_flight = loop {
        // Only pooled HTTP/2 to a meshed peer is set up ahead of the request.
        if !endpoint.spec.meshed || upgrade {
            break endpoint.start();
        }
        if !endpoint.h2.is_open() && endpoint.h2.is_connecting() && tries == 0 {
            if let Some(other) = balancer.pick().filter(|o| o.h2.is_open()) {
                endpoint = other;
            }
        }
        let mut in_flight = endpoint.start();
        match endpoint.h2.ready().await {
            Ok(()) => {
                in_flight.connected();
                break in_flight;
            }
            Err(e) => {
                in_flight.failure();
                tries += 1;
                if tries >= CONNECT_TRIES.min(balancer.len()) {
                    return Err(e);
                }
                // Another endpoint than this one, if the balancer gives one.
                let failed = endpoint.addr();
                endpoint = (0..4)
                    .filter_map(|_| balancer.pick())
                    .find(|e| e.addr() != failed)
                    .ok_or(e)?;
            }
        }
    };
    let mtls = endpoint.tls.is_some() && endpoint.spec.meshed;
    if mtls {
        tell_peer(&mut req, service, egress.workload.as_ref());
    }
    let clients = &egress.clients;
    let result = match (&endpoint.tls, endpoint.spec.meshed, upgrade) {
        // An upgrade to a meshed peer: its own mTLS connection, HTTP/1.1 inside.
        (Some(tls), true, true) => {
            send_upgrade(
                endpoint.addr(),
                clients.connect_timeout,
                Some(&tls.http1),
                req,
            )
            .await
        }
        (_, true, false) => to_peer(&endpoint.h2, req).await,
        _ => direct(clients, endpoint.addr(), &endpoint.h2, req).await,
    };
    match result {
        Ok(mut resp) => {
            in_flight.response(resp.status());
            let dst_workload = said_by_server(resp.headers_mut(), mtls);
            resp.extensions_mut().insert(Destination {
                route: Label::empty(),
                backend: Label::from(service.clone()),
                server_id: Label::from(endpoint.spec.identity.clone()),
                tls: mtls,
                upstream: Some(endpoint.addr()),
                dst_workload,
                ..Destination::default()
            });
            Ok(resp.map(Either::Left))
        }
        Err(e) => {
            in_flight.failure();
            Err(e)
        }
    }
}

impl Service<Req> for Balance {
    type Response = Rsp;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Rsp, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(req).await })
    }
}

/// Tells the server's proxy (over mTLS) which service the request went to and which workload
/// sent it, for its metrics' `dst_service` and `src_workload`.
fn tell_peer<B>(req: &mut http::Request<B>, service: &str, workload: Option<&http::HeaderValue>) {
    let headers = req.headers_mut();
    if let Some((name, ns)) = crate::metrics::service_of(service) {
        if let Ok(v) = http::HeaderValue::from_str(&format!("{name}.{ns}")) {
            headers.insert(crate::http::headers::DST_SERVICE, v);
        }
    }
    if let Some(w) = workload {
        headers.insert(crate::http::headers::SRC_WORKLOAD, w.clone());
    }
}

/// The workload the server's proxy says answered (trusted over mTLS only); the header is
/// removed whoever sent it.
fn said_by_server(headers: &mut http::HeaderMap, mtls: bool) -> Label {
    headers
        .remove(crate::http::headers::DST_WORKLOAD)
        .filter(|_| mtls)
        .as_ref()
        .and_then(Label::from_peer)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_workload_is_read_over_mtls_only_and_never_passed_on() {
        let header = crate::http::headers::DST_WORKLOAD;
        let mut headers = http::HeaderMap::new();
        headers.insert(header.clone(), http::HeaderValue::from_static("web.shop"));
        assert_eq!(said_by_server(&mut headers, true).as_str(), "web.shop");
        assert!(headers.is_empty());
        // An unmeshed server (or its application) cannot name itself.
        headers.insert(
            header.clone(),
            http::HeaderValue::from_static("admin.kube-system"),
        );
        assert_eq!(said_by_server(&mut headers, false).as_str(), "");
        assert!(headers.is_empty());
        let long = "w".repeat(300);
        let Ok(long) = http::HeaderValue::from_str(&long) else {
            panic!("a header value")
        };
        headers.insert(header, long);
        assert_eq!(said_by_server(&mut headers, true).as_str(), "");
    }
}
