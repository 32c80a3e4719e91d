//! Circuit breaking: a failing endpoint is ejected, traffic goes to the healthy ones, the
//! endpoint comes back once it recovers; when every endpoint fails, the proxy keeps trying them
//! (no self-inflicted outage) and recovers with the first success; a burst of concurrent
//! failures is one failure event, not dozens of ejections.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strait_e2e::{Mesh, ServiceDef};

/// Status codes and servers of `n` sequential requests.
fn statuses(
    mesh: &Mesh,
    client: &strait_testbed::Pod,
    n: usize,
) -> anyhow::Result<(HashMap<String, usize>, HashMap<String, usize>)> {
    let out = mesh.curl(
        client,
        &[
            "-s",
            "-w",
            " code=%{http_code}\n",
            &format!("http://10.96.0.10/?n=[1-{n}]"),
        ],
    )?;
    let (mut codes, mut servers) = (HashMap::new(), HashMap::new());
    for line in out.lines() {
        if let Some(code) = line.rsplit("code=").next() {
            *codes.entry(code.trim().to_string()).or_default() += 1;
        }
        if let Some(rest) = line.strip_prefix("hello from ") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            *servers.entry(name).or_default() += 1;
        }
    }
    Ok((codes, servers))
}

#[test]
fn a_failing_endpoint_is_ejected_comes_back_and_all_failing_recovers_at_once() -> anyhow::Result<()>
{
    let mesh = Mesh::new("breaker")?;
    let mut pods = Vec::new();
    let mut apps = Vec::new();
    for name in ["s1", "s2", "s3"] {
        let pod = mesh.meshed_pod(name)?;
        apps.push(mesh.net.start_app(
            &pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", name],
        )?);
        pods.push(pod);
    }
    let all: Vec<_> = pods.iter().collect();
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &all))?;
    let client = mesh.meshed_pod("client")?;
    let (codes, _) = statuses(&mesh, &client, 30)?;
    assert_eq!(codes.get("200"), Some(&30), "{codes:?}");

    // s3 fails: its application is gone (connections refused).
    mesh.net.kill(&apps[2], nix::sys::signal::Signal::SIGKILL)?;
    let (codes, _) = statuses(&mesh, &client, 60)?;
    let failed = 60 - codes.get("200").copied().unwrap_or(0);
    assert!(
        failed <= 7,
        "at most 7 consecutive failures before ejection, got {failed}: {codes:?}"
    );
    let (codes, servers) = statuses(&mesh, &client, 100)?;
    assert_eq!(
        codes.get("200"),
        Some(&100),
        "the ejected endpoint gets no traffic: {codes:?}"
    );
    assert!(!servers.contains_key("s3"));

    // s3 recovers: after its backoff a probe succeeds and it takes traffic again.
    mesh.net.start_app(
        &pods[2],
        "app2",
        &["http", "--listen", "0.0.0.0:8080", "--name", "s3"],
    )?;
    let took = mesh.eventually(Duration::from_secs(30), || {
        Ok(statuses(&mesh, &client, 20)?.1.contains_key("s3"))
    })?;
    eprintln!("s3 took traffic again {took:?} after recovering");

    // Every endpoint fails: below the healthy floor the proxy keeps trying them, each request
    // failing at once (connection refused), never queued.
    for pod in &pods {
        let pids = strait_testbed::netns::sh("ip", &["netns", "pids", &pod.ns])?;
        for pid in pids.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "strait-testapp" {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid.parse()?),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let (codes, _) = statuses(&mesh, &client, 40)?;
    assert_eq!(codes.get("200"), None, "{codes:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "40 failures took {:?}: not a queue",
        start.elapsed()
    );
    // One endpoint comes back: its first success restores it, whatever its backoff.
    mesh.net.start_app(
        &pods[0],
        "app3",
        &["http", "--listen", "0.0.0.0:8080", "--name", "s1"],
    )?;
    let back = Instant::now();
    let took = mesh.eventually(Duration::from_secs(3), || {
        Ok(statuses(&mesh, &client, 5)?.1.contains_key("s1"))
    })?;
    eprintln!(
        "with every endpoint ejected, s1 served again {took:?} after it came back ({:?})",
        back.elapsed()
    );
    Ok(())
}

#[test]
fn a_burst_of_concurrent_500s_does_not_take_a_single_endpoint_service_down() -> anyhow::Result<()> {
    let mesh = Mesh::new("burst")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.meshed_pod("client")?;
    let ok = mesh.curl(&client, &["--http2-prior-knowledge", "http://10.96.0.10/"])?;
    assert_eq!(ok.trim(), "hello from server");
    // The repro: 200 requests, 40 in flight at a time, all answered 500.
    let out = mesh.net.exec(
        &client,
        &[
            "h2load",
            "-n",
            "200",
            "-c",
            "4",
            "-m",
            "10",
            "http://10.96.0.10/status/500",
        ],
    )?;
    assert!(out.contains("200 total"), "{out}");
    let burst_end = Instant::now();
    // The backend answers 200 at once, and so does the mesh: no minute of fail-fast.
    let took = mesh.eventually(Duration::from_secs(3), || {
        let (ok, out, _) = mesh.net.try_exec(
            &client,
            &[
                "curl",
                "-s",
                "--max-time",
                "2",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://10.96.0.10/",
            ],
        )?;
        Ok(ok && out.trim() == "200")
    })?;
    eprintln!(
        "after 200 concurrent 500s, a request succeeded {took:?} later ({:?} after the burst)",
        burst_end.elapsed()
    );
    let proxy_log = mesh.net.logs();
    let ejections = proxy_log.matches("endpoint ejected").count();
    assert!(
        ejections <= 3,
        "{ejections} ejections in one burst:\n{proxy_log}"
    );
    Ok(())
}

#[test]
fn a_black_holed_endpoint_costs_requests_nothing() -> anyhow::Result<()> {
    let mesh = Mesh::new("blackhole")?;
    let server = mesh.meshed_pod("server")?;
    mesh.net.start_app(
        &server,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
    )?;
    // The second endpoint is an address nobody has: SYNs go nowhere, connects time out (1 s).
    let mut svc = ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]);
    svc.endpoints
        .push(("10.88.0.250".to_string(), "ghost".to_string()));
    mesh.config.service(&svc)?;
    let client = mesh.meshed_pod("client")?;
    let start = Instant::now();
    let (codes, servers) = statuses(&mesh, &client, 30)?;
    let took = start.elapsed();
    eprintln!("30 requests with a black-holed endpoint took {took:?}: {codes:?}");
    assert_eq!(codes.get("200"), Some(&30), "{codes:?}");
    assert_eq!(servers.get("server"), Some(&30));
    // At most a few connect timeouts were waited out (each moved its request on), not one
    // per request in a queue.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    Ok(())
}
