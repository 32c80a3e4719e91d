//! Bad input and lifecycle: malformed HTTP, graceful drain, the admin server, iptables rules.

use std::time::Duration;

use strait_e2e::{metric, Mesh, ServiceDef};

const MALFORMED: &str =
    "exec 3<>/dev/tcp/10.96.0.10/80; printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\nthis is not a header\\r\\n\\r\\n' >&3; timeout 5 cat <&3";

#[test]
fn malformed_http_gets_a_400_and_the_proxy_keeps_serving() -> anyhow::Result<()> {
    let mesh = Mesh::new("malformed")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;

    for _ in 0..3 {
        let (_, out, _) = mesh.net.try_exec(&client, &["bash", "-c", MALFORMED])?;
        assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
        assert_eq!(
            mesh.curl(&client, &["http://10.96.0.10/"])?.trim(),
            "hello from server"
        );
    }
    // The inbound side too: a plain client sending garbage straight to the pod.
    let plain = mesh.net.pod("plain")?;
    let script = MALFORMED.replace("10.96.0.10/80", &format!("{}/8080", server.ip));
    let (_, out, _) = mesh.net.try_exec(&plain, &["bash", "-c", &script])?;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert_eq!(
        mesh.curl(&plain, &[&format!("http://{}:8080/", server.ip)])?
            .trim(),
        "hello from server"
    );
    Ok(())
}

#[test]
fn sigterm_drains_in_flight_requests_and_refuses_new_ones() -> anyhow::Result<()> {
    let mesh = Mesh::new("drain")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.net.pod("client")?;
    let proxy = mesh.net.start_sidecar(&client, &Default::default())?;

    // /shutdown is refused from outside the pod.
    let out = mesh.net.exec_in(
        &mesh.net.bridge_ns,
        &[
            "curl",
            "-s",
            "-X",
            "POST",
            &format!("http://{}:4191/shutdown", client.ip),
        ],
    )?;
    assert!(out.contains("only accepted from loopback"), "{out}");

    let slow = mesh.net.spawn(
        &client,
        "slow",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " code=%{http_code}",
            "http://10.96.0.10/delay/1500",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(400));
    mesh.net
        .kill_nowait(&proxy, nix::sys::signal::Signal::SIGTERM)?;
    std::thread::sleep(Duration::from_millis(200));
    // New connections are refused while the old one finishes.
    let (ok, _, err) = mesh.net.try_exec(
        &client,
        &["curl", "-sS", "--max-time", "3", "http://10.96.0.10/"],
    )?;
    assert!(!ok, "a new request during the drain must fail");
    assert!(
        err.contains("refused") || err.contains("Failed to connect"),
        "{err}"
    );
    assert!(
        mesh.net.wait(&slow, Duration::from_secs(5))?,
        "in-flight request failed: {}",
        mesh.net.output(&slow)
    );
    let out = mesh.net.output(&slow);
    assert!(
        out.contains("delayed 1500 ms by server") && out.contains("code=200"),
        "{out}"
    );
    assert!(
        mesh.net.wait(&proxy, Duration::from_secs(5))?,
        "the proxy exits cleanly after draining"
    );
    Ok(())
}

#[test]
fn init_is_idempotent_and_cleanup_removes_every_rule() -> anyhow::Result<()> {
    let net = strait_testbed::Net::new("init")?;
    let pod = net.pod("pod")?;
    let bin = strait_testbed::bin("strait-proxy")?;
    let bin = bin.to_string_lossy();
    let rules = || -> anyhow::Result<Vec<String>> {
        Ok(net
            .exec(&pod, &["iptables", "-t", "nat", "-S"])?
            .lines()
            .filter(|l| l.contains("STRAIT"))
            .map(str::to_string)
            .collect())
    };
    net.exec(&pod, &[&bin, "init", "--skip-outbound-ports", "22"])?;
    let first = rules()?;
    assert!(
        first
            .iter()
            .any(|l| l.contains("--uid-owner 2102 -j RETURN")),
        "{first:#?}"
    );
    assert!(
        first.iter().any(|l| l.contains("--dport 22 -j RETURN")),
        "{first:#?}"
    );
    net.exec(&pod, &[&bin, "init", "--skip-outbound-ports", "22"])?;
    assert_eq!(rules()?, first, "a second init changes nothing");
    net.exec(&pod, &[&bin, "init", "--cleanup"])?;
    assert!(rules()?.is_empty(), "{:#?}", rules()?);
    // Bad settings are named.
    let (ok, _, err) = net.try_exec(
        &pod,
        &[&bin, "init", "--skip-outbound-cidrs", "10.0.0.0/99"],
    )?;
    assert!(!ok && err.contains("--skip-outbound-cidrs"), "{err}");
    Ok(())
}

#[test]
fn a_failure_storm_costs_a_few_plain_log_lines() -> anyhow::Result<()> {
    let mesh = Mesh::new("logflood")?;
    // A meshed pod whose application is not running: every request fails (502).
    let server = mesh.meshed_pod("server")?;
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]))?;
    let client = mesh.meshed_pod("client")?;
    let out = mesh.net.exec(
        &client,
        &[
            "h2load",
            "-n",
            "3000",
            "-c",
            "4",
            "-m",
            "10",
            "http://10.96.0.10/",
        ],
    )?;
    assert!(out.contains("3000 total"), "{out}");
    let logs = mesh.net.logs();
    let failed_lines = logs
        .lines()
        .filter(|l| l.contains("request failed"))
        .count();
    eprintln!("3000 failed requests wrote {failed_lines} 'request failed' lines");
    assert!(
        (1..=4).contains(&failed_lines),
        "one line per cause per 10 s, not one per request:\n{logs}"
    );
    // Not a terminal: no colour codes in the files.
    assert!(!logs.contains('\u{1b}'), "ANSI escapes in a log file");
    // And the count of what was left out reaches the log once the interval has passed.
    std::thread::sleep(Duration::from_millis(10_500));
    let _ = mesh.curl(&client, &["-s", "http://10.96.0.10/"]);
    let logs = mesh.net.logs();
    let suppressed = logs
        .lines()
        .filter(|l| l.contains("request failed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("suppressed="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0);
    assert!(suppressed > 1000, "suppressed={suppressed}:\n{logs}");
    Ok(())
}

#[test]
fn strait_log_format_json_writes_one_object_per_line() -> anyhow::Result<()> {
    let mesh = Mesh::new("jsonlog")?;
    let opts = strait_testbed::SidecarOpts {
        env: vec![("STRAIT_LOG_FORMAT", "json")],
        ..Default::default()
    };
    let pod = mesh.meshed_pod_with("json", &opts)?;
    let log = std::fs::read_to_string(mesh.net.dir.join(format!("{}-proxy.log", pod.name)))?;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"proxy ready\"")),
        "{log}"
    );
    Ok(())
}

#[test]
fn every_listener_has_a_backlog_of_1024_in_both_families() -> anyhow::Result<()> {
    let mesh = Mesh::new("backlog")?;
    let pod = mesh.meshed_pod("pod")?;
    // `ss -ltn`: for a listening socket, Send-Q is the accept backlog.
    let backlog_of = |ns: &str, port: u16| -> anyhow::Result<Vec<String>> {
        let out = mesh.net.exec_in(ns, &["ss", "-Hltn"])?;
        Ok(out
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .collect())
    };
    for port in [4140, 4143, 4191] {
        let queues = backlog_of(&pod.ns, port)?;
        assert_eq!(queues, ["1024", "1024"], "proxy :{port}, IPv4 and IPv6");
    }
    let queues = backlog_of(&mesh.net.bridge_ns, 8086)?;
    assert_eq!(queues, ["1024"], "control plane discovery");
    Ok(())
}

/// Sends its request line one byte every 120 ms (16 bytes, about 2 s: past the 1 s detection
/// timeout, within the 3 s header-read timeout), then the headers; prints the response.
const SLOW_CLIENT: &str = r#"
import socket, time
s = socket.create_connection(("10.96.0.10", 80), timeout=10)
for b in b"GET / HTTP/1.1\r\n":
    s.sendall(bytes([b]))
    time.sleep(0.12)
s.sendall(b"Host: web\r\nConnection: close\r\n\r\n")
out = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    out += chunk
print(out.decode(errors="replace"))
"#;

/// Starts a request line and never finishes it; prints how long the proxy kept it open.
const SLOWLORIS: &str = r#"
import socket, time
s = socket.create_connection(("10.96.0.10", 80), timeout=30)
s.sendall(b"GET /slow")
start = time.time()
try:
    while time.time() - start < 25:
        s.sendall(b"a")
        time.sleep(0.5)
        s.settimeout(0.01)
        try:
            if s.recv(1) == b"":
                break
        except socket.timeout:
            pass
except OSError:
    pass
print("closed after %.1f" % (time.time() - start))
"#;

#[test]
fn a_slow_client_stays_http_and_a_slowloris_is_cut_by_the_proxy() -> anyhow::Result<()> {
    let mesh = Mesh::new("slowloris")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod_with(
        "client",
        &strait_testbed::SidecarOpts {
            env: vec![("STRAIT_HEADER_READ_TIMEOUT", "3s")],
            ..Default::default()
        },
    )?;
    let py = |name: &str, text: &str| -> anyhow::Result<String> {
        let script = mesh.net.dir.join(name);
        std::fs::write(&script, text)?;
        mesh.net
            .exec(&client, &["python3", &script.to_string_lossy()])
    };
    let out = py("slow.py", SLOW_CLIENT)?;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("hello from server"), "{out}");
    // It was handled as HTTP (routed and counted by service), not spliced as TCP.
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &["direction=\"outbound\"", "target=\"web.default"]
        ),
        Some(1.0),
        "{m}"
    );
    let out = py("loris.py", SLOWLORIS)?;
    let secs: f64 = out
        .trim()
        .strip_prefix("closed after ")
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::MAX);
    eprintln!("a slowloris request line was cut after {secs:.1}s (header-read timeout 3 s)");
    assert!((2.5..8.0).contains(&secs), "{out}");
    Ok(())
}
