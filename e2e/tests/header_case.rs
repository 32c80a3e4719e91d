//! HTTP/1 header names and keep-alive as the client sent them, compared with a direct
//! connection: exact case wherever a request stays HTTP/1 inside one proxy (an unmeshed client
//! to a meshed server, a meshed client to an unmeshed server); canonical Title-Case across the
//! proxy-to-proxy HTTP/2 hop, where HTTP/2 lowercases every name; HTTP/1.0 keep-alive kept.

use std::time::Duration;

use strait_e2e::{Mesh, ServiceDef};
use strait_testbed::Pod;

/// An HTTP/1 server that answers each request with the raw header lines it received (the body)
/// and reply headers in three casings; HTTP/1.0 keep-alive as the RFCs say.
const ECHO_HEAD_SERVER: &str = r#"
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(16)
print("listening on 0.0.0.0:8080", flush=True)
def serve(c):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(4096)
            if not d:
                c.close()
                return
            buf += d
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        version = lines[0].split(b" ")[-1]
        fields = lines[1:]
        conn = b",".join(l.split(b":", 1)[1].strip().lower() for l in fields if l.lower().startswith(b"connection:"))
        keep = (b"keep-alive" in conn) if version == b"HTTP/1.0" else (b"close" not in conn)
        body = b"version=" + version + b"\n" + b"\n".join(fields) + b"\n"
        reply = version + b" 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        reply += b"X-Custom-Reply: 1\r\nx-lower-reply: 2\r\nX-REPLY-CAPS: 3\r\n"
        if version == b"HTTP/1.0" and keep:
            reply += b"Connection: keep-alive\r\n"
        c.sendall(reply + b"\r\n" + body)
        if not keep:
            c.close()
            return
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A raw client: sends `requests` one after another on one connection, reading each response
/// by its Content-Length; prints each response and whether the server closed after the last.
const RAW_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
buf = b""
for req in sys.argv[2:]:
    s.sendall(req.encode().decode("unicode_escape").encode("latin-1"))
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            print("CLOSED-EARLY"); sys.exit(0)
        buf += d
    head, buf = buf.split(b"\r\n\r\n", 1)
    length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
    while len(buf) < length:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    body, buf = buf[:length], buf[length:]
    sys.stdout.write("RESPONSE\n" + head.decode("latin-1") + "\n\n" + body.decode("latin-1") + "END\n")
s.settimeout(1)
try:
    closed = s.recv(1) == b""
except socket.timeout:
    closed = False
print("CLOSED=%s" % closed)
"#;

const REQUEST: &str = "GET / HTTP/1.1\\r\\nHost: web\\r\\nX-Custom-Header: a\\r\\nX-API-KEY: k\\r\\nx-lower: l\\r\\n\\r\\n";

fn exchange(mesh: &Mesh, pod: &Pod, addr: &str, requests: &[&str]) -> anyhow::Result<String> {
    let script = mesh.net.dir.join("raw_client.py");
    std::fs::write(&script, RAW_CLIENT)?;
    let mut args = vec!["python3", script.to_str().unwrap_or_default(), addr];
    args.extend_from_slice(requests);
    mesh.net.exec(pod, &args)
}

/// The `X-...` header lines of each response head and body, as they appear on the wire: what
/// the application received (body) and what the client received (head).
fn custom_names(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-"))
        .filter_map(|l| l.split(':').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn header_names_and_keep_alive_reach_both_ends_as_sent() -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("hcase", "1h")?;
    let script = mesh.net.dir.join("echo_head.py");
    std::fs::write(&script, ECHO_HEAD_SERVER)?;
    let server = mesh.meshed_pod("server")?;
    let plain = mesh.net.pod("plain")?;
    for pod in [&server, &plain] {
        let app = mesh
            .net
            .spawn(pod, "app", &["python3", &script.to_string_lossy()])?;
        mesh.net
            .wait_log(&app, "listening on", Duration::from_secs(10))?;
    }
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    let outsider = mesh.net.pod("outsider")?;
    let meshed_addr = format!("{}:8080", server.ip);
    let plain_addr = format!("{}:8080", plain.ip);

    let direct = exchange(&mesh, &outsider, &plain_addr, &[REQUEST])?;
    let exact = custom_names(&direct);
    assert_eq!(
        exact,
        [
            "X-Custom-Reply",
            "x-lower-reply",
            "X-REPLY-CAPS",
            "X-Custom-Header",
            "X-API-KEY",
            "x-lower"
        ],
        "{direct}"
    );
    // One proxy, HTTP/1 on both sides: byte for byte the direct names, both ways.
    for (from, addr, path) in [
        (&outsider, &meshed_addr, "unmeshed client -> meshed server"),
        (&client, &plain_addr, "meshed client -> unmeshed server"),
    ] {
        let out = exchange(&mesh, from, addr, &[REQUEST])?;
        assert_eq!(custom_names(&out), exact, "{path}:\n{out}");
    }
    // Two proxies, HTTP/2 between them: HTTP/2 lowercases names; the receiving proxy writes
    // them in canonical Title-Case (what HTTP/1 clients send), in both directions.
    let mut out = String::new();
    mesh.eventually(Duration::from_secs(10), || {
        out = exchange(&mesh, &client, "10.96.0.10:80", &[REQUEST])?;
        Ok(out.contains("RESPONSE"))
    })?;
    // (The order of fields with different names is not kept across HTTP/2; it carries no
    // meaning, RFC 9110 5.3.)
    let mut names = custom_names(&out);
    names.sort();
    assert_eq!(
        names,
        [
            "X-Api-Key",
            "X-Custom-Header",
            "X-Custom-Reply",
            "X-Lower",
            "X-Lower-Reply",
            "X-Reply-Caps",
        ],
        "{out}"
    );

    // HTTP/1.0 with keep-alive across the HTTP/2 hop: both requests on one connection, each
    // answered as 1.0 with Connection: keep-alive, as the direct server answers.
    let ka = "GET / HTTP/1.0\\r\\nHost: web\\r\\nConnection: keep-alive\\r\\n\\r\\n";
    for (addr, from) in [
        (&plain_addr, &outsider),
        (&"10.96.0.10:80".to_string(), &client),
    ] {
        let out = exchange(&mesh, from, addr, &[ka, ka])?;
        assert_eq!(out.matches("RESPONSE\nHTTP/1.0 200").count(), 2, "{out}");
        assert_eq!(out.matches("version=HTTP/1.0").count(), 2, "{out}");
        let heads_keeping_alive = out
            .split("RESPONSE\n")
            .filter_map(|r| r.split("\n\n").next())
            .filter(|head| {
                head.to_ascii_lowercase()
                    .contains("\nconnection: keep-alive")
            })
            .count();
        assert_eq!(heads_keeping_alive, 2, "{addr}: {out}");
        assert!(out.contains("CLOSED=False"), "{addr}: {out}");
        // Without keep-alive, HTTP/1.0 closes after the response.
        let out = exchange(
            &mesh,
            from,
            addr,
            &["GET / HTTP/1.0\\r\\nHost: web\\r\\n\\r\\n"],
        )?;
        assert!(out.contains("RESPONSE\nHTTP/1.0 200"), "{out}");
        assert!(out.contains("CLOSED=True"), "{addr}: {out}");
    }
    Ok(())
}
