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
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// The URL prefix of the rewritten probes.
pub const PREFIX: &str = "/app-health/";

/// One of the application's probes, checked once when the settings are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Written")]
pub struct AppProbe {
    port: u16,
    /// The probe's `host`: where to connect instead of the pod's IP.
    host: Option<String>,
    timeout: Duration,
    check: Check,
}

#[derive(Debug, Clone)]
enum Check {
    /// `httpGet`: a GET of `path`, with the probe's own headers.
    Http {
        path: PathAndQuery,
        headers: HeaderMap,
    },
    /// `tcpSocket`: a connection is accepted.
    Tcp,
}

/// A probe as the injector writes it.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum Written {
    Http {
        port: u16,
        #[serde(default = "root")]
        path: String,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        headers: Vec<WrittenHeader>,
        #[serde(default = "one", rename = "timeoutSeconds")]
        timeout_seconds: u32,
    },
    Tcp {
        port: u16,
        #[serde(default)]
        host: Option<String>,
        #[serde(default = "one", rename = "timeoutSeconds")]
        timeout_seconds: u32,
    },
}

/// A header the probe sends (`httpHeaders` in the pod spec).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenHeader {
    name: String,
    value: String,
}

fn root() -> String {
    "/".into()
}

fn one() -> u32 {
    1
}

impl TryFrom<Written> for AppProbe {
    type Error = String;

    fn try_from(w: Written) -> Result<Self, String> {
        let (port, host, timeout_seconds, check) = match w {
            Written::Http {
                port,
                path,
                host,
                headers,
                timeout_seconds,
            } => {
                let path = PathAndQuery::try_from(path.as_str())
                    .ok()
                    .filter(|p| p.as_str().starts_with('/'))
                    .ok_or_else(|| format!("path {path:?} is not an absolute path"))?;
                let mut map = HeaderMap::new();
                for h in headers {
                    let name = HeaderName::try_from(h.name.as_str());
                    let value = HeaderValue::try_from(h.value.as_str());
                    let (Ok(name), Ok(value)) = (name, value) else {
                        return Err(format!("header {:?} is not valid", h.name));
                    };
                    map.insert(name, value);
                }
                (
                    port,
                    host,
                    timeout_seconds,
                    Check::Http { path, headers: map },
                )
            }
            Written::Tcp {
                port,
                host,
                timeout_seconds,
            } => (port, host, timeout_seconds, Check::Tcp),
        };
        if port == 0 {
            return Err("port 0".into());
        }
        if timeout_seconds == 0 {
            return Err("timeoutSeconds must be at least 1".into());
        }
        Ok(Self {
            port,
            host: host.filter(|h| !h.is_empty()),
            timeout: Duration::from_secs(u64::from(timeout_seconds)),
            check,
        })
    }
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
    let written: BTreeMap<String, serde_json::Value> = serde_json::from_str(s).map_err(|e| {
        format!("not a JSON object of \"<container>/<kind>\": {{\"kind\": \"http\"|\"tcp\", \"port\": ...}}: {e}")
    })?;
    written
        .into_iter()
        .map(|(name, probe)| {
            if name.split('/').count() != 2 {
                return Err(format!("probe name {name:?} is not <container>/<kind>"));
            }
            match serde_json::from_value(probe) {
                Ok(probe) => Ok((name, probe)),
                Err(e) => Err(format!("probe {name:?}: {e}")),
            }
        })
        .collect()
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
        let addr = match self.address(probe.host.as_deref(), probe.port).await {
            Ok(a) => a,
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        let timeout = probe.timeout;
        let verdict = tokio::time::timeout(timeout, async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to the application at {addr}: {e}"))?;
            match &probe.check {
                Check::Tcp => Ok(StatusCode::OK),
                Check::Http { path, headers } => {
                    let host = probe.host.as_deref();
                    get(stream, addr, host, path, headers, user_agent).await
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
    path: &PathAndQuery,
    headers: &HeaderMap,
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
    let mut req = Request::get(path.as_str())
        .header(header::HOST, authority)
        .header(header::ACCEPT, "*/*")
        .header(header::USER_AGENT, user_agent.unwrap_or("kube-probe"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    for (name, value) in headers {
        req.headers_mut().insert(name, value.clone());
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
        assert!(err(r#"{"app/readiness": {"kind": "exec", "port": 1}}"#)
            .contains("probe \"app/readiness\": unknown variant `exec`"));
        assert!(err(r#"{"app": {"kind": "tcp", "port": 1}}"#).contains("\"app\""));
        assert!(err(r#"{"a/b": {"kind": "tcp", "port": 0}}"#).contains("probe \"a/b\": port 0"));
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
