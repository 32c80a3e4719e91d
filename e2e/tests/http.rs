//! HTTP/1.1 through both sidecars: status, headers, large bodies, and the proxy's own answers.

use std::time::Duration;

use strait_e2e::{metric, sha256, Mesh, ServiceDef};
use strait_testbed::app::pattern;

const TEN_MB: u64 = 10 * 1024 * 1024;

#[test]
fn http1_status_headers_and_10mb_bodies_cross_the_mesh_intact() -> anyhow::Result<()> {
    let mesh = Mesh::new("http1")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;

    // Status and headers: the app's status and headers arrive; Host is what the client sent.
    let out = mesh.curl(
        &client,
        &["-i", "-H", "x-custom: kept", "http://10.96.0.10/status/418"],
    )?;
    assert!(out.starts_with("HTTP/1.1 418"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-served-by: server"),
        "{out}"
    );
    let headers = mesh.curl(
        &client,
        &[
            "-H",
            "x-custom: kept",
            "-H",
            "Connection: keep-alive, x-hop",
            "-H",
            "x-hop: dropped",
            "http://10.96.0.10/headers",
        ],
    )?;
    assert!(
        headers.contains("version: HTTP/1.1"),
        "the app gets HTTP/1.1 back: {headers}"
    );
    assert!(headers.contains("host: 10.96.0.10"), "{headers}");
    assert!(headers.contains("x-custom: kept"), "{headers}");
    assert!(
        !headers.contains("x-hop"),
        "Connection-listed headers are hop-by-hop: {headers}"
    );
    assert!(
        !headers.contains("strait-orig-proto"),
        "the inbound proxy strips its marker: {headers}"
    );

    // A 10 MB download, streamed, arrives byte for byte.
    let file = mesh.net.dir.join("download");
    mesh.curl(
        &client,
        &[
            "-o",
            &file.to_string_lossy(),
            &format!("http://10.96.0.10/bytes/{TEN_MB}"),
        ],
    )?;
    let got = std::fs::read(&file)?;
    assert_eq!(got.len() as u64, TEN_MB);
    assert_eq!(sha256(&got)?, sha256(&pattern(TEN_MB))?);

    // A 10 MB upload with chunked encoding and Expect: 100-continue is echoed byte for byte.
    let upload = mesh.net.dir.join("upload");
    std::fs::write(&upload, pattern(TEN_MB))?;
    let echoed = mesh.net.dir.join("echoed");
    let out = mesh.curl(
        &client,
        &[
            "-o",
            &echoed.to_string_lossy(),
            "-w",
            "%{http_code}",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &format!("@{}", upload.to_string_lossy()),
            "http://10.96.0.10/echo",
        ],
    )?;
    assert_eq!(out, "200");
    assert_eq!(sha256(&std::fs::read(&echoed)?)?, sha256(&pattern(TEN_MB))?);

    // Keep-alive: several requests on one connection.
    let out = mesh.curl(
        &client,
        &[
            "-w",
            "%{num_connects}\n",
            "http://10.96.0.10/",
            "http://10.96.0.10/",
        ],
    )?;
    assert_eq!(out.matches("hello from server").count(), 2, "{out}");

    // Both proxies counted the requests.
    let m = mesh.metrics(&client)?;
    let outbound = metric(
        &m,
        "strait_request_total",
        &[
            "direction=\"outbound\"",
            "target=\"web.default.svc.cluster.local:80\"",
        ],
    );
    assert!(outbound >= Some(6.0), "{m}");
    let m = mesh.metrics(&server)?;
    assert!(
        metric(
            &m,
            "strait_request_total",
            &["direction=\"inbound\"", "target=\"8080\""]
        ) >= Some(6.0),
        "{m}"
    );
    Ok(())
}

#[test]
fn a_service_without_endpoints_gets_a_503_from_the_proxy() -> anyhow::Result<()> {
    let mesh = Mesh::new("noep")?;
    mesh.config
        .service(&ServiceDef::new("empty", "10.96.0.11", 80, 8080, &[]))?;
    let client = mesh.meshed_pod("client")?;
    let out = mesh.curl(&client, &["-i", "http://10.96.0.11/"])?;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.contains(
            "Strait-Proxy-Error: no endpoint is available for empty.default.svc.cluster.local:80"
        ),
        "{out}"
    );
    Ok(())
}

/// A server that answers every request on 8080 with a fixed response and no `Date`.
const NO_DATE_SERVER: &str = r#"
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(16)
print("listening on 0.0.0.0:8080", flush=True)
def serve(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d:
            return
        buf += d
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Origin: python\r\nConnection: close\r\n\r\nok\n")
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn the_proxies_add_no_date_header_of_their_own() -> anyhow::Result<()> {
    let mesh = Mesh::new("nodate")?;
    let server = mesh.meshed_pod("server")?;
    let script = mesh.net.dir.join("nodate.py");
    std::fs::write(&script, NO_DATE_SERVER)?;
    let app = mesh
        .net
        .spawn(&server, "app", &["python3", &script.to_string_lossy()])?;
    mesh.net
        .wait_log(&app, "listening on", Duration::from_secs(10))?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    // Client -> proxy (HTTP/1) -> proxy (HTTP/2 between them) -> app (HTTP/1): no hop adds one.
    let out = mesh.curl(&client, &["-si", "http://10.96.0.10/"])?;
    assert!(out.contains("ok"), "{out}");
    assert!(out.to_lowercase().contains("x-origin: python"), "{out}");
    assert!(
        !out.to_lowercase().contains("\ndate:"),
        "the app sent no Date and neither proxy may add one:\n{out}"
    );
    Ok(())
}
