//! The application's kubelet probes, answered on the admin port.
//!
//! A strict pod refuses plaintext on its application ports, and kubelet probes are plaintext
//! from outside the mesh: left alone, they would fail and the pod would never be ready. So the
//! injector rewrites each `httpGet` and `tcpSocket` probe of the application's containers to
//! `GET :4191/app-health/<container>/<kind>` and hands the original to the proxy
//! (`STRAIT_APP_PROBES`). The proxy then probes the application itself, from inside the pod and
//! outside the redirection (its UID is excluded), and answers with the verdict kubelet would
//! have reached: a 2xx or 3xx from the application is a 200, any other status is passed on, and
//! a refused or timed-out connection is a 503. Istio's `pilot-agent` does the same.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// The URL prefix of the rewritten probes.
pub const PREFIX: &str = "/app-health/";

/// One of the application's probes, as it was written in the pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AppProbe {
    /// `httpGet`: a GET of `path` on `port`, with the probe's own headers.
    Http {
        port: u16,
        #[serde(default = "root")]
        path: String,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        headers: Vec<Header>,
        #[serde(default = "one", rename = "timeoutSeconds")]
        timeout_seconds: u32,
    },
    /// `tcpSocket`: a connection to `port` is accepted.
    Tcp {
        port: u16,
        #[serde(default)]
        host: Option<String>,
        #[serde(default = "one", rename = "timeoutSeconds")]
        timeout_seconds: u32,
    },
}

/// A header the probe sends (`httpHeaders` in the pod spec).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

fn root() -> String {
    "/".into()
}

fn one() -> u32 {
    1
}

/// The probes by `<container>/<kind>`, and where the application listens.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    probes: BTreeMap<String, AppProbe>,
    /// The pod's IP, which kubelet would probe; loopback when unknown.
    pod_ip: Option<IpAddr>,
}

/// Parses `STRAIT_APP_PROBES`: a JSON object of `<container>/<kind>` to probe.
pub fn parse(s: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    if s.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let probes: BTreeMap<String, AppProbe> = serde_json::from_str(s).map_err(|e| {
        format!("not a JSON object of \"<container>/<kind>\": {{\"kind\": \"http\"|\"tcp\", \"port\": ...}}: {e}")
    })?;
    for (name, probe) in &probes {
        if name.split('/').count() != 2 {
            return Err(format!("probe name {name:?} is not <container>/<kind>"));
        }
        let (port, timeout) = match probe {
            AppProbe::Http {
                port,
                timeout_seconds,
                path,
                headers,
                ..
            } => {
                if !path.starts_with('/') || path.parse::<http::Uri>().is_err() {
                    return Err(format!(
                        "probe {name:?}: path {path:?} is not an absolute path"
                    ));
                }
                for h in headers {
                    if header::HeaderName::try_from(h.name.as_str()).is_err()
                        || header::HeaderValue::try_from(h.value.as_str()).is_err()
                    {
                        return Err(format!("probe {name:?}: header {:?} is not valid", h.name));
                    }
                }
                (*port, *timeout_seconds)
            }
            AppProbe::Tcp {
                port,
                timeout_seconds,
                ..
            } => (*port, *timeout_seconds),
        };
        if port == 0 {
            return Err(format!("probe {name:?}: port 0"));
        }
        if timeout == 0 {
            return Err(format!("probe {name:?}: timeoutSeconds must be at least 1"));
        }
    }
    Ok(probes)
}

impl AppProbes {
    pub fn new(probes: BTreeMap<String, AppProbe>, pod_ip: Option<IpAddr>) -> Self {
        Self { probes, pod_ip }
    }

    /// Answers `GET /app-health/<name>`; `user_agent` is kubelet's, passed on.
    pub async fn check(&self, name: &str, user_agent: Option<&str>) -> Response<Full<Bytes>> {
        let Some(probe) = self.probes.get(name) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no application probe {name:?}\n"),
            );
        };
        let (port, host, timeout) = match probe {
            AppProbe::Http {
                port,
                host,
                timeout_seconds,
                ..
            }
            | AppProbe::Tcp {
                port,
                host,
                timeout_seconds,
            } => (
                *port,
                host,
                Duration::from_secs(u64::from(*timeout_seconds)),
            ),
        };
        let addr = match self.address(host.as_deref(), port).await {
            Ok(a) => a,
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        let verdict = tokio::time::timeout(timeout, async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to the application at {addr}: {e}"))?;
            match probe {
                AppProbe::Tcp { .. } => Ok(StatusCode::OK),
                AppProbe::Http { path, headers, .. } => {
                    get(stream, addr, host.as_deref(), path, headers, user_agent).await
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the application at {addr} did not answer within {timeout:?}"
            ))
        });
        match verdict {
            // Kubelet counts 2xx and 3xx as success (it does not follow redirects elsewhere).
            Ok(s) if s.is_success() || s.is_redirection() => {
                text(StatusCode::OK, format!("application answered {s}\n"))
            }
            Ok(s) => text(s, format!("application answered {s}\n")),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        }
    }

    async fn address(&self, host: Option<&str>, port: u16) -> Result<SocketAddr, String> {
        match host {
            None => Ok(SocketAddr::new(
                self.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port,
            )),
            Some(h) => {
                if let Ok(ip) = h.parse::<IpAddr>() {
                    return Ok(SocketAddr::new(ip, port));
                }
                tokio::net::lookup_host((h, port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| format!("cannot resolve the probe's host {h:?}"))
            }
        }
    }
}

/// One HTTP/1.1 GET, as kubelet sends it: `Host` is the probe's host and port unless a probe
/// header sets it.
async fn get(
    stream: TcpStream,
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
    headers: &[Header],
    user_agent: Option<&str>,
) -> Result<StatusCode, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with the application at {addr} failed: {e}"))?;
    tokio::spawn(conn);
    let authority = match host {
        Some(h) => format!("{h}:{}", addr.port()),
        None => addr.to_string(),
    };
    let mut req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "*/*")
        .header(header::USER_AGENT, user_agent.unwrap_or("kube-probe"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    for h in headers {
        // Checked when the probes were parsed.
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::try_from(h.name.as_str()),
            header::HeaderValue::try_from(h.value.as_str()),
        ) {
            req.headers_mut().insert(n, v);
        }
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("the application at {addr} failed the request: {e}"))?;
    Ok(resp.status())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An HTTP/1 server answering every request with `status`, sending back what it received.
    async fn app(status: u16) -> (u16, tokio::sync::mpsc::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        (port, rx)
    }

    fn probes(json: &str) -> AppProbes {
        AppProbes::new(parse(json).expect("valid probes"), None)
    }

    async fn body(r: Response<Full<Bytes>>) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn http_probes_reach_the_app_and_pass_its_verdict_on() {
        let (ok, mut seen) = app(204).await;
        let (redirect, _) = app(302).await;
        let (failing, _) = app(500).await;
        let p = probes(&format!(
            r#"{{"app/readiness": {{"kind": "http", "port": {ok}, "path": "/healthz?full=1",
                 "headers": [{{"name": "X-Probe", "value": "yes"}}, {{"name": "Host", "value": "app.local"}}]}},
               "app/startup": {{"kind": "http", "port": {redirect}}},
               "app/liveness": {{"kind": "http", "port": {failing}, "path": "/live"}}}}"#
        ));
        let r = p.check("app/readiness", Some("kube-probe/1.32")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r).await, "application answered 204 No Content\n");
        let req = seen.recv().await.expect("the app saw the probe");
        assert!(req.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"), "{req}");
        let lower = req.to_ascii_lowercase();
        assert!(lower.contains("x-probe: yes\r\n"), "{req}");
        assert!(lower.contains("host: app.local\r\n"), "{req}");
        assert!(lower.contains("user-agent: kube-probe/1.32\r\n"), "{req}");
        assert_eq!(p.check("app/startup", None).await.status(), StatusCode::OK);
        assert_eq!(
            p.check("app/liveness", None).await.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            p.check("app/other", None).await.status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn tcp_probes_and_dead_or_silent_apps() {
        let (up, _) = app(200).await;
        // A port nothing listens on: bind, note, close.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        // A server that accepts and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_port = silent.local_addr().expect("addr").port();
        let p = probes(&format!(
            r#"{{"app/liveness": {{"kind": "tcp", "port": {up}}},
               "app/readiness": {{"kind": "tcp", "port": {dead}}},
               "db/readiness": {{"kind": "http", "port": {silent_port}, "timeoutSeconds": 1}}}}"#
        ));
        assert_eq!(p.check("app/liveness", None).await.status(), StatusCode::OK);
        let r = p.check("app/readiness", None).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(r)
            .await
            .starts_with("cannot connect to the application"));
        let r = p.check("db/readiness", None).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(r).await.contains("did not answer within 1s"));
        drop(silent);
    }

    #[test]
    fn bad_probe_settings_are_refused_with_the_probe_named() {
        assert!(parse("").expect("empty").is_empty());
        let err = |s: &str| parse(s).expect_err(s);
        assert!(err("[1]").contains("JSON object"));
        assert!(err(r#"{"app/readiness": {"kind": "exec", "port": 1}}"#).contains("JSON object"));
        assert!(err(r#"{"app": {"kind": "tcp", "port": 1}}"#).contains("\"app\""));
        assert!(err(r#"{"a/b": {"kind": "tcp", "port": 0}}"#).contains("port 0"));
        assert!(err(r#"{"a/b": {"kind": "http", "port": 1, "path": "x"}}"#).contains("path"));
        assert!(
            err(r#"{"a/b": {"kind": "tcp", "port": 1, "timeoutSeconds": 0}}"#)
                .contains("timeoutSeconds")
        );
        assert!(err(
            r#"{"a/b": {"kind": "http", "port": 1, "headers": [{"name": "a b", "value": ""}]}}"#
        )
        .contains("header"));
    }
}
