//! The control plane's process lifecycle: it always becomes ready (no race between the first
//! scan and the readiness watch), and SIGTERM ends it promptly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The status code of `GET path` on `addr`, if it answers.
fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn start(dir: &std::path::Path, admin: SocketAddr) -> Child {
    Command::new(env!("CARGO_BIN_EXE_strait-control-plane"))
        .args(["--config-dir", &dir.to_string_lossy()])
        .args([
            "--state-dir",
            &dir.with_extension("state").to_string_lossy(),
        ])
        .args(["--discovery-addr", &format!("127.0.0.1:{}", free_port())])
        // Not the default 0.0.0.0:8080: the tests of this file run in parallel, and a start
        // that finds the port taken exits (never ready).
        .args(["--identity-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--poll-interval", "50ms"])
        .env("STRAIT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the control plane")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fifty_starts_all_become_ready_without_a_config_change() {
    let dir = std::env::temp_dir().join(format!("strait-ready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("svc.yaml"),
        "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
    )
    .expect("write");
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Killed(start(&dir, admin));
        let started = Instant::now();
        loop {
            if get(admin, "/ready") == Some(200) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "start {i}: /ready never turned 200 (the first scan was missed)"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        slowest = slowest.max(started.elapsed());
        drop(child);
    }
    eprintln!("50 starts, the slowest ready after {slowest:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_makes_it_not_ready_and_exit() {
    let dir = std::env::temp_dir().join(format!("strait-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Killed(start(&dir, admin));
    let started = Instant::now();
    while get(admin, "/ready") != Some(200) {
        assert!(started.elapsed() < Duration::from_secs(5), "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
