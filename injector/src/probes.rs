//! Kubelet probes of the application's containers, rewritten to go through the proxy.
//!
//! Kubelet probes come in plaintext from outside the mesh, which a strict pod refuses. Each
//! `httpGet` (scheme HTTP) and `tcpSocket` probe of a container in `spec.containers` becomes
//! `GET :4191/app-health/<container>/<kind>`, the admin port that is never redirected; the
//! original goes to the proxy in `STRAIT_APP_PROBES`, and the proxy probes the application from
//! inside the pod (see `strait-proxy`'s `app_probe`). Timing fields (period, thresholds,
//! timeout) stay on the rewritten probe, so kubelet judges as before. `exec` and `grpc` probes
//! are left alone (exec does not use the network; gRPC probes of a strict port need
//! `strait.io/skip-inbound-ports`), as are HTTPS probes.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::inject::ADMIN_PORT;

/// The probe fields of a container, and the kind named in the rewritten path.
const PROBES: [(&str, &str); 3] = [
    ("startupProbe", "startup"),
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
];

/// JSON Patch operations on `spec.containers`, and what the proxy needs to probe in their
/// place (by `<container>/<kind>`).
#[derive(Debug, Default)]
pub struct Rewrite {
    pub ops: Vec<Value>,
    pub probes: BTreeMap<String, Value>,
}

/// Rewrites the probes of `spec.containers`. The operations use the containers' indices
/// before any container is added, so they must come first in the patch.
pub fn rewrite(spec: &Value) -> Rewrite {
    let mut out = Rewrite::default();
    let containers = spec.get("containers").and_then(Value::as_array);
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let Some(name) = c.get("name").and_then(Value::as_str) else {
            continue;
        };
        for (field, kind) in PROBES {
            let Some(probe) = c.get(field) else { continue };
            let Some((handler, original)) = original(c, probe) else {
                continue;
            };
            let base = format!("/spec/containers/{i}/{field}");
            let target = json!({
                "path": format!("/app-health/{name}/{kind}"),
                "port": ADMIN_PORT,
                "scheme": "HTTP",
            });
            if handler == "httpGet" {
                out.ops.push(
                    json!({"op": "replace", "path": format!("{base}/httpGet"), "value": target}),
                );
            } else {
                out.ops
                    .push(json!({"op": "remove", "path": format!("{base}/{handler}")}));
                out.ops
                    .push(json!({"op": "add", "path": format!("{base}/httpGet"), "value": target}));
            }
            out.probes.insert(format!("{name}/{kind}"), original);
        }
    }
    out
}

/// The handler field and what the proxy is told, for a probe it can take over.
fn original(container: &Value, probe: &Value) -> Option<(&'static str, Value)> {
    let timeout = probe
        .get("timeoutSeconds")
        .and_then(Value::as_u64)
        .filter(|t| *t > 0)
        .unwrap_or(1);
    let mut out = Map::new();
    let (handler, action) = if let Some(get) = probe.get("httpGet") {
        let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
        if !scheme.eq_ignore_ascii_case("HTTP") {
            return None;
        }
        out.insert("kind".into(), "http".into());
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        // Kubelet adds the leading slash a path may lack.
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        out.insert("path".into(), path.into());
        if let Some(headers) = get.get("httpHeaders").and_then(Value::as_array) {
            let headers: Vec<Value> = headers
                .iter()
                .filter_map(|h| {
                    Some(json!({
                        "name": h.get("name")?.as_str()?,
                        "value": h.get("value").and_then(Value::as_str).unwrap_or(""),
                    }))
                })
                .collect();
            out.insert("headers".into(), headers.into());
        }
        ("httpGet", get)
    } else if let Some(tcp) = probe.get("tcpSocket") {
        out.insert("kind".into(), "tcp".into());
        ("tcpSocket", tcp)
    } else {
        return None;
    };
    let port = port(container, action.get("port")?)?;
    if i32::from(port) == ADMIN_PORT {
        return None; // already the admin port: nothing to take over
    }
    out.insert("port".into(), port.into());
    if let Some(host) = action.get("host").and_then(Value::as_str) {
        if !host.is_empty() {
            out.insert("host".into(), host.into());
        }
    }
    out.insert("timeoutSeconds".into(), timeout.into());
    Some((handler, Value::Object(out)))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(container: &Value, port: &Value) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).ok().filter(|p| *p > 0);
    }
    let name = port.as_str()?;
    if let Ok(n) = name.parse::<u16>() {
        return Some(n).filter(|p| *p > 0);
    }
    container
        .get("ports")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
        .get("containerPort")?
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_tcp_probes_move_to_the_admin_port_and_others_stay() {
        let spec = json!({"containers": [
            {"name": "app",
             "ports": [{"name": "http", "containerPort": 8080}],
             "readinessProbe": {"httpGet": {"path": "healthz", "port": "http",
                 "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 3},
             "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
             "startupProbe": {"exec": {"command": ["true"]}}},
            {"name": "tls",
             "readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS"}},
             "livenessProbe": {"httpGet": {"port": "missing"}},
             "startupProbe": {"grpc": {"port": 9090}}},
        ]});
        let r = rewrite(&spec);
        assert_eq!(
            r.ops,
            vec![
                json!({"op": "replace", "path": "/spec/containers/0/readinessProbe/httpGet",
                       "value": {"path": "/app-health/app/readiness", "port": 4191, "scheme": "HTTP"}}),
                json!({"op": "remove", "path": "/spec/containers/0/livenessProbe/tcpSocket"}),
                json!({"op": "add", "path": "/spec/containers/0/livenessProbe/httpGet",
                       "value": {"path": "/app-health/app/liveness", "port": 4191, "scheme": "HTTP"}}),
            ]
        );
        assert_eq!(
            Value::Object(r.probes.into_iter().collect()),
            json!({
                "app/readiness": {"kind": "http", "port": 8080, "path": "/healthz",
                    "headers": [{"name": "X-Probe", "value": "1"}], "timeoutSeconds": 1},
                "app/liveness": {"kind": "tcp", "port": 8080, "timeoutSeconds": 2},
            })
        );
    }

    #[test]
    fn pods_without_probes_or_containers_get_nothing() {
        assert!(rewrite(&json!({"containers": [{"name": "a"}]}))
            .ops
            .is_empty());
        assert!(rewrite(&json!({})).probes.is_empty());
        let on_admin = json!({"containers": [{"name": "a",
            "readinessProbe": {"httpGet": {"port": 4191}}}]});
        assert!(rewrite(&on_admin).ops.is_empty());
    }
}
