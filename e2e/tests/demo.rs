//! `strait demo`, the README's main job: it runs a working mesh, shows live golden signals, and
//! leaves nothing behind, even when killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strait_testbed::netns::namespaces;

fn ours(prefix: &str) -> usize {
    namespaces()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .count()
}

#[test]
fn demo_shows_live_signals_for_every_service_and_cleans_up() -> anyhow::Result<()> {
    let name = format!("strait-demo-e2e{}", std::process::id());
    let strait = strait_testbed::bin("strait")?;
    let demo = Command::new(&strait)
        .args([
            "demo",
            "--duration",
            "6s",
            "--interval",
            "2s",
            "--rps",
            "40",
            "--name",
            &name,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // While it runs: two seconds of web-1's link, to other pods and to the control plane.
    let web1 = format!("{name}-web-1");
    let start = Instant::now();
    while !namespaces().contains(&web1) && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let dump = Command::new("ip")
        .args([
            "netns", "exec", &web1, "timeout", "2", "tcpdump", "-i", "eth0", "-n", "-A",
        ])
        .args(["tcp"])
        .stdin(Stdio::null())
        .output()?;
    let capture = String::from_utf8_lossy(&dump.stdout);
    let out = demo.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last table has both services with traffic; web never fails, api fails 1 call in 6.
    let last = stdout.rsplit("SERVICE").next().unwrap_or("");
    // Failure messages end with the last table: what a truncated CI log still shows.
    let why = |what: &str| format!("{stdout}\n{what}; the last table:\nSERVICE{last}");
    let row = |svc: &str| -> Vec<String> {
        last.lines()
            .find(|l| l.starts_with(svc))
            .unwrap_or_else(|| panic!("{}", why(&format!("no row for {svc}"))))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let web = row("web.demo.svc.cluster.local:80");
    let api = row("api.demo.svc.cluster.local:80");
    let rps = |r: &[String]| r[1].parse::<f64>().unwrap_or(0.0);
    assert!(
        rps(&web) > 5.0 && rps(&api) > 5.0,
        "{}",
        why("too few requests per second")
    );
    assert_eq!(web[2], "100.0%", "{}", why("web must not fail"));
    let api_success: f64 = api[2].trim_end_matches('%').parse()?;
    assert!(
        (70.0..95.0).contains(&api_success),
        "{}",
        why("api fails 1 call in 6")
    );
    assert!(
        web[3].ends_with("ms") && web[4].ends_with("ms"),
        "{}",
        why("latencies")
    );
    // Every pod has an identity: every request rode mTLS, to the identity discovery announced.
    assert_eq!(web[6], "100%", "{}", why("web over mTLS"));
    assert_eq!(api[6], "100%", "{}", why("api over mTLS"));
    assert_eq!(
        web[7],
        "spiffe://cluster.local/ns/demo/sa/web",
        "{}",
        why("web's identity")
    );
    assert_eq!(
        api[7],
        "spiffe://cluster.local/ns/demo/sa/api",
        "{}",
        why("api's identity")
    );
    assert!(
        stdout.contains("mTLS between all pods"),
        "{}",
        why("the demo says so")
    );
    // And on the wire: web-1's traffic to and from other pods is TLS, never the app's text.
    let packets = capture.lines().filter(|l| l.contains(" > ")).count();
    assert!(packets >= 5, "too little captured on {web1}:\n{capture}");
    assert!(
        !capture.contains("hello from")
            && !capture.contains("HTTP/1.1")
            && !capture.contains("demo.svc.cluster.local")
            && !capture.contains("spiffe://cluster.local/ns/demo"),
        "plaintext on the wire between pods or to the control plane:\n{capture}"
    );
    assert_eq!(ours(&name), 0, "namespaces left behind");
    Ok(())
}

#[test]
fn a_killed_demo_still_leaves_no_namespace_behind() -> anyhow::Result<()> {
    let name = format!("strait-demo-kill{}", std::process::id());
    let strait = strait_testbed::bin("strait")?;
    let mut demo = Command::new(&strait)
        .args(["demo", "--duration", "60s", "--name", &name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while ours(&name) < 5 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ours(&name), 5, "the demo should have made 5 namespaces");
    demo.kill()?; // SIGKILL: no handler runs
    demo.wait()?;
    let start = Instant::now();
    while ours(&name) > 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        ours(&name),
        0,
        "the reaper removes the namespaces of a killed demo"
    );
    Ok(())
}
