//! Discovery-driven behaviour: balancing over endpoints, config changes, a dead control plane,
//! and destinations outside the mesh.

use std::time::Duration;

use strait_e2e::{metric, served_by, Mesh, ServiceDef};

fn requests(mesh: &Mesh, pod: &strait_testbed::Pod, n: usize) -> anyhow::Result<String> {
    let urls: Vec<&str> = std::iter::repeat_n("http://10.96.0.10/", n).collect();
    mesh.curl(pod, &urls)
}

#[test]
fn three_endpoints_share_load_and_a_removed_one_stops_receiving_within_2s() -> anyhow::Result<()> {
    let mesh = Mesh::new("balance")?;
    let mut pods = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let pod = mesh.meshed_pod(name)?;
        mesh.net.start_app(
            &pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", name],
        )?;
        pods.push(pod);
    }
    let all: Vec<_> = pods.iter().collect();
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all))?;
    let client = mesh.meshed_pod("client")?;

    let counts = served_by(&requests(&mesh, &client, 150)?);
    assert_eq!(counts.values().sum::<usize>(), 150, "{counts:?}");
    for name in ["s1", "s2", "s3"] {
        assert!(
            counts.get(name).copied().unwrap_or(0) >= 8,
            "{name} got too little: {counts:?}"
        );
    }

    // Remove s3 from the config: it must stop receiving traffic within 2 s.
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all[..2]))?;
    let took = mesh.eventually(Duration::from_secs(2), || {
        Ok(!served_by(&requests(&mesh, &client, 10)?).contains_key("s3"))
    })?;
    eprintln!("s3 stopped receiving traffic {took:?} after the config change");
    let counts = served_by(&requests(&mesh, &client, 60)?);
    assert!(!counts.contains_key("s3"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    Ok(())
}

#[test]
fn traffic_keeps_flowing_when_the_control_plane_dies_and_streams_reconnect() -> anyhow::Result<()> {
    let mesh = Mesh::new("cpdead")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    assert_eq!(
        served_by(&requests(&mesh, &client, 5)?).get("server"),
        Some(&5)
    );

    mesh.net
        .kill(&mesh.control_plane, nix::sys::signal::Signal::SIGKILL)?;
    // New connections and requests to the known destination keep working from the last state.
    for _ in 0..10 {
        assert_eq!(
            served_by(&requests(&mesh, &client, 3)?).get("server"),
            Some(&3)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_discovery_connected", &[]),
        Some(0.0),
        "stream is down: {m}"
    );

    // A new control plane: the proxy reconnects by itself and sees changes again.
    let _cp = mesh.start_control_plane()?;
    mesh.eventually(Duration::from_secs(10), || {
        Ok(metric(&mesh.metrics(&client)?, "strait_discovery_connected", &[]) == Some(1.0))
    })?;
    assert_eq!(
        served_by(&requests(&mesh, &client, 5)?).get("server"),
        Some(&5)
    );
    Ok(())
}

#[test]
fn a_destination_outside_the_mesh_is_reached_through_passthrough() -> anyhow::Result<()> {
    let mesh = Mesh::new("passthru")?;
    // A plain pod: no sidecar, not in the config.
    let outside = mesh.net.pod("outside")?;
    mesh.net.start_app(
        &outside,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "outside"],
    )?;
    let client = mesh.meshed_pod("client")?;
    let out = mesh.curl(&client, &[&format!("http://{}:8080/", outside.ip)])?;
    assert_eq!(out.trim(), "hello from outside");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &["direction=\"outbound\"", "target=\"passthrough\""]
        ),
        Some(1.0),
        "{m}"
    );
    Ok(())
}

/// One keep-alive HTTP/1.1 connection to 10.96.0.10:80, opened before the service exists: it
/// sends a request at once (no service yet: passed through), logs `first <status>`, then one
/// request every 100 ms on the same socket until one is served (`served <body>`). It fails if
/// the connection is closed or replaced, and gives up after 30 s.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, sys, time
c = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
c.auto_open = 0  # a closed socket raises instead of silently reconnecting
c.connect()
port = c.sock.getsockname()[1]
def get():
    c.request("GET", "/")
    r = c.getresponse()
    return r.status, r.read().decode(errors="replace").strip()
status, body = get()
print("first", status, body.splitlines()[0] if body else "", flush=True)
deadline = time.time() + 30
while time.time() < deadline:
    time.sleep(0.1)
    status, body = get()
    if c.sock is None or c.sock.getsockname()[1] != port:
        sys.exit("the connection was replaced")
    if status == 200 and body.startswith("hello from"):
        print("served", body, "on port", port, flush=True)
        sys.exit(0)
    print("still", status, flush=True)
sys.exit("never served through the mesh")
"#;

#[test]
fn a_keep_alive_connection_opened_before_the_service_exists_joins_the_mesh_when_it_appears(
) -> anyhow::Result<()> {
    let mesh = Mesh::new("latesvc")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    let client = mesh.meshed_pod("client")?;
    // The client connects while 10.96.0.10 is nobody's: discovery says "not in the mesh".
    let script = mesh.net.dir.join("keepalive.py");
    std::fs::write(&script, KEEP_ALIVE_CLIENT)?;
    let py = mesh.net.spawn(
        &client,
        "keepalive",
        &["python3", &script.to_string_lossy()],
    )?;
    mesh.net.wait_log(&py, "first ", Duration::from_secs(20))?;
    let first = mesh.net.output(&py);
    assert!(!first.contains("hello from"), "{first}");

    // The service appears: the next requests on the same connection go through the mesh.
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let ok = mesh.net.wait(&py, Duration::from_secs(40))?;
    let out = mesh.net.output(&py);
    assert!(
        ok,
        "the keep-alive connection never reached the mesh:\n{out}"
    );
    assert!(out.contains("served hello from server"), "{out}");

    let client_metrics = mesh.metrics(&client)?;
    let passthrough = metric(
        &client_metrics,
        "strait_request_total",
        &["direction=\"outbound\"", "target=\"passthrough\""],
    )
    .unwrap_or(0.0);
    let meshed = metric(
        &client_metrics,
        "strait_request_total",
        &["direction=\"outbound\"", "target=\"web.default"],
    )
    .unwrap_or(0.0);
    assert!(
        passthrough >= 1.0,
        "the first request was passed through:\n{client_metrics}"
    );
    assert!(
        meshed >= 1.0,
        "the last request went through the mesh:\n{client_metrics}"
    );
    let server_metrics = mesh.metrics(&server)?;
    let inbound = metric(
        &server_metrics,
        "strait_response_total",
        &["direction=\"inbound\"", "status_code=\"200\""],
    )
    .unwrap_or(0.0);
    assert!(
        inbound >= 1.0,
        "the serving pod's proxy answered it:\n{server_metrics}"
    );
    Ok(())
}

#[test]
fn the_control_plane_exits_on_sigterm_with_proxies_connected() -> anyhow::Result<()> {
    let mesh = Mesh::new("cpterm")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod("client")?;
    assert_eq!(
        served_by(&requests(&mesh, &client, 3)?).get("server"),
        Some(&3)
    );
    // Both proxies hold streams (destination and inbound policy) open.
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_discovery_connected", &[]),
        Some(1.0),
        "{m}"
    );

    let start = std::time::Instant::now();
    mesh.net
        .kill_nowait(&mesh.control_plane, nix::sys::signal::Signal::SIGTERM)?;
    let clean = mesh.net.wait(&mesh.control_plane, Duration::from_secs(8))?;
    let took = start.elapsed();
    eprintln!("the control plane exited {took:?} after SIGTERM");
    let log = mesh.net.output(&mesh.control_plane);
    assert!(clean, "a clean exit:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "exited after {took:?}:\n{log}"
    );
    // The proxies serve on from the last state.
    assert_eq!(
        served_by(&requests(&mesh, &client, 3)?).get("server"),
        Some(&3)
    );
    Ok(())
}
