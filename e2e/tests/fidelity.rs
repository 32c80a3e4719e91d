//! HTTP as the RFCs say it, through the mesh, with a raw-socket client: a request without
//! Host is refused and its connection closed on both sides; transfer codings other than a
//! single chunked get 501; header limits are settings whose answers name them, and sections
//! between hyper's old 100 and the limits pass both ways.

use strait_e2e::Mesh;
use strait_testbed::Pod;

/// Sends `request` raw to `addr` from `pod`; returns everything the proxy answered until it
/// closed the connection (or 5 s passed), and whether it closed it.
fn raw(mesh: &Mesh, pod: &Pod, addr: &str, request: &str) -> anyhow::Result<(String, bool)> {
    let script = format!(
        "import socket, sys, time\n\
         host, port = {addr:?}.rsplit(':', 1)\n\
         s = socket.create_connection((host, int(port)), timeout=5)\n\
         s.sendall({request:?}.encode())\n\
         data = b''\n\
         closed = False\n\
         end = time.time() + 5\n\
         while time.time() < end:\n\
         \x20   try:\n\
         \x20       chunk = s.recv(65536)\n\
         \x20   except socket.timeout:\n\
         \x20       break\n\
         \x20   if not chunk:\n\
         \x20       closed = True\n\
         \x20       break\n\
         \x20   data += chunk\n\
         \x20   if b'\\r\\n\\r\\n' in data and not closed and b'connection: close' not in data.lower():\n\
         \x20       s.settimeout(0.5)\n\
         sys.stdout.write(data.decode('latin-1'))\n\
         sys.stdout.write('\\nCLOSED=%s\\n' % closed)\n"
    );
    let out = mesh.net.exec(pod, &["python3", "-c", &script])?;
    let closed = out.contains("CLOSED=True");
    Ok((out, closed))
}

fn status(out: &str) -> u16 {
    out.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hosts_codings_and_header_limits_follow_the_rfcs_on_both_sides() -> anyhow::Result<()> {
    let mesh = Mesh::new("fidelity")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod("client")?;
    let outsider = mesh.net.pod("outsider")?;
    let direct = format!("{}:8080", server.ip);

    // No Host: 400 with the reason, connection closed; from a meshed client (outbound) and
    // from a client outside the mesh (inbound, which forwarded it before).
    for (pod, addr) in [(&client, "10.96.0.10:80"), (&outsider, direct.as_str())] {
        let (out, closed) = raw(&mesh, pod, addr, "GET / HTTP/1.1\r\n\r\n")?;
        assert_eq!(status(&out), 400, "{addr}: {out}");
        assert!(
            out.to_lowercase()
                .contains("strait-proxy-error: bad request: the request has no host header"),
            "{out}"
        );
        assert!(closed, "{addr}: the connection must close: {out}");
        // HTTP/1.0 may leave it out.
        let (out, _) = raw(&mesh, pod, addr, "GET / HTTP/1.0\r\n\r\n")?;
        assert_eq!(status(&out), 200, "{addr}: {out}");
    }

    // The version the client spoke reaches the application (HTTP/1.0 over the HTTP/2 hop
    // between the proxies), and its answer comes back in it.
    let (out, _) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        "GET /headers HTTP/1.0\r\nHost: web\r\n\r\n",
    )?;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(
        out.contains("version: HTTP/1.0"),
        "the application saw HTTP/1.0: {out}"
    );

    // Transfer codings: only a single chunked.
    let (out, closed) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        "POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )?;
    assert_eq!(status(&out), 501, "{out}");
    assert!(closed, "{out}");
    let (out, _) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        "POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )?;
    assert_eq!(status(&out), 200, "{out}");
    assert!(out.contains("hello"), "{out}");

    // 150 request headers (hyper's default cap was 100) pass; 600 get 431 naming the setting.
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H-{i}: v\r\n")).collect() };
    let (out, _) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        &format!(
            "GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n{}\r\n",
            headers(150)
        ),
    )?;
    assert_eq!(status(&out), 200, "{out}");
    assert!(
        out.contains("x-h-149: v"),
        "every header reached the application"
    );
    let (out, closed) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        &format!("GET / HTTP/1.1\r\nHost: web\r\n{}\r\n", headers(600)),
    )?;
    assert_eq!(status(&out), 431, "{out}");
    assert!(out.contains("STRAIT_MAX_REQUEST_HEADERS"), "{out}");
    assert!(closed, "{out}");

    // An upstream response with 150 headers passes back; 600 get 502 naming the setting.
    let (out, _) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        "GET /many-headers/150 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )?;
    assert_eq!(status(&out), 200, "{out}");
    assert!(out.to_ascii_lowercase().contains("x-many-149: v"), "{out}");
    let (out, _) = raw(
        &mesh,
        &client,
        "10.96.0.10:80",
        "GET /many-headers/600 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )?;
    assert_eq!(status(&out), 502, "{out}");
    assert!(out.contains("STRAIT_MAX_RESPONSE_HEADERS"), "{out}");
    Ok(())
}
