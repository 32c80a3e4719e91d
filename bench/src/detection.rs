//! `strait-bench detection`: what protocol detection costs a new connection, against a direct
//! connection in the same run (mTLS mesh, nothing declared):
//! - a server-speaks-first server (a MariaDB-style greeting) on a port nobody declared: the
//!   first connection (found by speculation), and the later ones (remembered);
//! - the same greeting on a declared opaque port (3306), from an unmeshed client;
//! - a client-first HTTP request on a new connection, on the same machinery (no wait paid).
//!
//! Times are measured inside the client pod from `connect()` to the first byte answered.

use std::time::Duration;

use anyhow::{Context as _, Result};
use strait_e2e::{Mesh, ServiceDef};

/// Connects `n` times; prints each time (ms) from connect to the first byte back. `greeting`:
/// the server speaks first; `http`: a request on a new connection.
const CLIENT: &str = r#"
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
times = []
for _ in range(n):
    t = time.perf_counter()
    s = socket.create_connection((host, port), timeout=5)
    if mode == "http":
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    if not s.recv(100):
        sys.exit("closed without a byte")
    times.append((time.perf_counter() - t) * 1000)
    s.close()
print(" ".join("%.3f" % t for t in times))
"#;

fn times(
    mesh: &Mesh,
    pod: &strait_testbed::Pod,
    mode: &str,
    addr: &str,
    n: u32,
) -> Result<Vec<f64>> {
    let (host, port) = addr.rsplit_once(':').context("host:port")?;
    let script = mesh.net.dir.join("detect_client.py");
    std::fs::write(&script, CLIENT)?;
    let out = mesh.net.exec(
        pod,
        &[
            "python3",
            &script.to_string_lossy(),
            mode,
            host,
            port,
            &n.to_string(),
        ],
    )?;
    out.split_whitespace()
        .map(|t| t.parse::<f64>().context("a time"))
        .collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn detection(n: u32) -> Result<()> {
    let n = n.clamp(10, 2000);
    let mesh = Mesh::with_identity("detect", "24h")?;
    let net = &mesh.net;
    let server = mesh.meshed_pod("server")?;
    let direct = net.pod("dserver")?;
    for pod in [&server, &direct] {
        for (name, port) in [("db", "3307"), ("mysql", "3306")] {
            let listen = format!("0.0.0.0:{port}");
            net.start_app(
                pod,
                name,
                &["banner", "--listen", &listen, "--text", "GREETING"],
            )?;
        }
        net.start_app(
            pod,
            "http",
            &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
        )?;
    }
    mesh.config
        .service(&ServiceDef::new("db", "10.96.0.30", 3307, 3307, &[&server]))?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    let outsider = net.pod("outsider")?;
    // Discovery has answered for both services before anything is timed (a request to the
    // web service also warms the client proxy's connection to the identity of the server).
    mesh.eventually(Duration::from_secs(10), || {
        Ok(mesh.curl(&client, &["http://10.96.0.10/"]).is_ok())
    })?;
    let d = |p: &str| format!("{}:{p}", direct.ip);
    let s = |p: &str| format!("{}:{p}", server.ip);

    let direct_greeting = times(&mesh, &outsider, "greeting", &d("3307"), n)?;
    let meshed = times(&mesh, &client, "greeting", "10.96.0.30:3307", n + 1)?;
    let (first, later) = meshed.split_first().context("no times")?;
    let opaque_first = times(&mesh, &outsider, "greeting", &s("3306"), 1)?[0];
    let direct_http = times(&mesh, &outsider, "http", &d("8080"), n)?;
    let mesh_http = times(&mesh, &client, "http", "10.96.0.10:80", n)?;

    let p50 = |v: &[f64]| percentile(v, 0.5);
    let p99 = |v: &[f64]| percentile(v, 0.99);
    println!("| new connection, time to first byte (ms) | direct p50 | mesh | added |");
    println!("|---|---|---|---|");
    println!(
        "| server-first, undeclared port, 1st connection | {:.2} | {first:.2} | {:+.2} |",
        p50(&direct_greeting),
        first - p50(&direct_greeting)
    );
    println!(
        "| server-first, undeclared port, later (p50 / p99) | {:.2} | {:.2} / {:.2} | {:+.2} / {:+.2} |",
        p50(&direct_greeting),
        p50(later),
        p99(later),
        p50(later) - p50(&direct_greeting),
        p99(later) - p99(&direct_greeting)
    );
    println!(
        "| server-first, opaque port, unmeshed client, 1st connection | {:.2} | {opaque_first:.2} | {:+.2} |",
        p50(&direct_greeting),
        opaque_first - p50(&direct_greeting)
    );
    println!(
        "| client-first HTTP, new connection (p50 / p99) | {:.2} | {:.2} / {:.2} | {:+.2} / {:+.2} |",
        p50(&direct_http),
        p50(&mesh_http),
        p99(&mesh_http),
        p50(&mesh_http) - p50(&direct_http),
        p99(&mesh_http) - p99(&direct_http)
    );
    println!();
    println!(
        "server_first_first_added_ms {:.2}",
        first - p50(&direct_greeting)
    );
    println!(
        "server_first_later_added_p50_ms {:.2}",
        p50(later) - p50(&direct_greeting)
    );
    println!(
        "server_first_later_added_p99_ms {:.2}",
        p99(later) - p99(&direct_greeting)
    );
    println!(
        "opaque_unmeshed_first_added_ms {:.2}",
        opaque_first - p50(&direct_greeting)
    );
    println!(
        "http_new_conn_added_p50_ms {:.2}",
        p50(&mesh_http) - p50(&direct_http)
    );
    println!(
        "http_new_conn_added_p99_ms {:.2}",
        p99(&mesh_http) - p99(&direct_http)
    );
    Ok(())
}
