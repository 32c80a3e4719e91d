//! Chaos under a steady load of idempotent requests (20 req/s from a meshed client): the
//! control plane killed and restarted, a rolling restart of every backend, a black-holed
//! endpoint. Each case must cost the client no failed request; the figures are printed.
//! (Certificates rotating every 20 s under load: e2e/tests/rotation.rs.)

use std::time::{Duration, Instant};

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::Pod;

fn app(mesh: &Mesh, pod: &Pod) -> anyhow::Result<strait_testbed::Proc> {
    mesh.net.start_app(
        pod,
        "app",
        &["http", "--listen", "0.0.0.0:8080", "--name", &pod.name],
    )
}

fn report(case: &str, sent: u64, ok: u64, took: Duration) {
    eprintln!(
        "chaos {case}: {ok}/{sent} requests succeeded ({} failed) over {took:.1?}",
        sent - ok
    );
}

#[test]
fn the_control_plane_killed_and_restarted_under_load_costs_nothing() -> anyhow::Result<()> {
    let mesh = Mesh::new("chaoscp")?;
    let pods: Vec<Pod> = ["s1", "s2"]
        .iter()
        .map(|n| mesh.meshed_pod(n))
        .collect::<anyhow::Result<_>>()?;
    for p in &pods {
        app(&mesh, p)?;
    }
    let refs: Vec<&Pod> = pods.iter().collect();
    mesh.config
        .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &refs))?;
    let client = mesh.meshed_pod("client")?;
    let start = Instant::now();
    let load = mesh.load(&client, "http://10.96.0.10/", 12)?;
    std::thread::sleep(Duration::from_secs(3));
    mesh.net
        .kill(&mesh.control_plane, nix::sys::signal::Signal::SIGKILL)?;
    std::thread::sleep(Duration::from_secs(4));
    let _cp = mesh.start_control_plane()?;
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(40))?;
    report("control plane killed 4 s", sent, ok, start.elapsed());
    assert!(sent >= 200, "sent {sent}");
    assert_eq!(ok, sent);
    Ok(())
}

#[test]
fn a_rolling_restart_of_every_backend_under_load_costs_nothing() -> anyhow::Result<()> {
    let mesh = Mesh::new("chaosroll")?;
    let mut pods: Vec<Pod> = Vec::new();
    let mut procs = Vec::new();
    for n in ["s1", "s2", "s3"] {
        let p = mesh.meshed_pod(n)?;
        procs.push(app(&mesh, &p)?);
        pods.push(p);
    }
    let publish = |pods: &[Pod]| -> anyhow::Result<()> {
        let refs: Vec<&Pod> = pods.iter().collect();
        mesh.config
            .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &refs))
    };
    publish(&pods)?;
    let client = mesh.meshed_pod("client")?;
    let start = Instant::now();
    let load = mesh.load(&client, "http://10.96.0.10/", 20)?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        // As a Deployment rolls: the endpoint leaves the slice, the pod drains and goes, a
        // new pod comes up and joins the slice.
        let old = pods.remove(0);
        let old_app = procs.remove(0);
        publish(&pods)?;
        std::thread::sleep(Duration::from_millis(800));
        mesh.net.kill(&old_app, nix::sys::signal::Signal::SIGTERM)?;
        // The old pod's proxy gets its SIGTERM too, and drains.
        for pid in strait_testbed::netns::sh("ip", &["netns", "pids", &old.ns])?.split_whitespace()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.parse()?),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let new = mesh.meshed_pod(&format!("{}r{i}", old.name))?;
        procs.push(app(&mesh, &new)?);
        pods.push(new);
        publish(&pods)?;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(60))?;
    report("rolling restart of 3 backends", sent, ok, start.elapsed());
    assert!(sent >= 350, "sent {sent}");
    assert_eq!(ok, sent);
    Ok(())
}

#[test]
fn a_black_holed_endpoint_under_load_costs_nothing() -> anyhow::Result<()> {
    let mesh = Mesh::new("chaoshole")?;
    let server = mesh.meshed_pod("server")?;
    app(&mesh, &server)?;
    let mut svc = ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&server]);
    // Nobody has this address: every SYN to it is lost.
    svc.endpoints
        .push(("10.88.0.250".to_string(), "ghost".to_string()));
    mesh.config.service(&svc)?;
    let client = mesh.meshed_pod("client")?;
    let start = Instant::now();
    let load = mesh.load(&client, "http://10.96.0.10/", 10)?;
    let (sent, ok) = mesh.finish_load(&load, Duration::from_secs(40))?;
    report(
        "one of two endpoints black-holed",
        sent,
        ok,
        start.elapsed(),
    );
    assert!(sent >= 150, "sent {sent}");
    assert_eq!(ok, sent);
    Ok(())
}

#[test]
fn a_certificate_that_expires_while_the_control_plane_is_away_is_reported_and_ends_readiness(
) -> anyhow::Result<()> {
    let mesh = Mesh::with_identity("chaosexp", "12s")?;
    let pod = mesh.meshed_pod("server")?;
    let ready = |mesh: &Mesh| -> anyhow::Result<String> {
        mesh.net.exec(
            &pod,
            &[
                "curl",
                "-s",
                "-w",
                " %{http_code}",
                "http://127.0.0.1:4191/ready",
            ],
        )
    };
    assert!(ready(&mesh)?.ends_with(" 200"));
    let m = mesh.metrics(&pod)?;
    let not_after = metric(&m, "strait_identity_cert_expiry_timestamp_seconds", &[]).unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(not_after > now, "{m}");
    mesh.net
        .kill(&mesh.control_plane, nix::sys::signal::Signal::SIGKILL)?;
    // Renewal (at 70% of the life) fails; the certificate stays in use and /ready stays 200
    // until it expires, then 503.
    let started = Instant::now();
    let mut ready_after_failure = false;
    let until_503 = mesh.eventually(Duration::from_secs(30), || {
        let m = mesh.metrics(&pod)?;
        let failed = metric(&m, "strait_identity_certify_total", &["result=\"error\""]);
        let r = ready(&mesh)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        if failed.is_some() && now < not_after - 0.5 {
            assert!(r.ends_with(" 200"), "ready before expiry: {r}");
            ready_after_failure = true;
        }
        Ok(r.ends_with(" 503"))
    })?;
    let expired_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    println!(
        "renewal failed, still ready until expiry; /ready 503 {:.1} s after the kill, {:.1} s after NotAfter",
        started.elapsed().as_secs_f64(),
        expired_at - not_after
    );
    assert!(
        ready_after_failure,
        "renewal failures were not seen while valid"
    );
    assert!(expired_at >= not_after - 0.5, "503 before the expiry");
    let _ = until_503;
    let body = ready(&mesh)?;
    assert!(body.contains("certificate expired"), "{body}");
    let logs = mesh.net.logs();
    assert!(
        logs.contains("certificate renewal failed; the current certificate stays in use"),
        "no warning logged"
    );
    Ok(())
}
