//! The test bed itself: a stuck test fails at its deadline instead of hanging, and a killed
//! test leaves no namespace or process behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strait_testbed::netns::namespaces;
use strait_testbed::Net;

#[test]
fn a_command_past_the_deadline_is_killed_and_the_test_fails_fast() -> anyhow::Result<()> {
    // One process per test (nextest): this setting is this test's own.
    std::env::set_var("STRAIT_TEST_DEADLINE", "3s");
    let net = Net::new("deadline")?;
    let pod = net.pod("stuck")?;
    let start = Instant::now();
    // A command that would outlive the test: the watchdog kills it at the deadline.
    let result = net.exec(&pod, &["sleep", "60"]);
    let took = start.elapsed();
    assert!(result.is_err(), "a killed command is a failure: {result:?}");
    assert!(
        took < Duration::from_secs(10),
        "ended by the deadline, not by the command: {took:?}"
    );
    // After the deadline nothing more runs in this Net.
    let after = net.exec(&pod, &["true"]);
    assert!(
        after
            .as_ref()
            .is_err_and(|e| e.to_string().contains("deadline")),
        "{after:?}"
    );
    Ok(())
}

/// Run only as the child of the test below: holds a Net until it is killed.
#[test]
#[ignore = "a helper of a_killed_test_leaves_no_namespace_behind"]
fn holds_a_net_until_killed() -> anyhow::Result<()> {
    let net = Net::new("killed")?;
    let pod = net.pod("p")?;
    let sleeper = net.spawn(&pod, "sleeper", &["sleep", "300"])?;
    println!("SLEEPER {}", sleeper.pid);
    println!("PREFIX {}", net.prefix);
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

#[test]
fn a_killed_test_leaves_no_namespace_behind() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "holds_a_net_until_killed",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.strip_prefix("SLEEPER ") {
                let _ = pid_tx.send(p.trim().to_string());
            }
            if let Some(p) = line.strip_prefix("PREFIX ") {
                let _ = tx.send(p.to_string());
            }
        }
    });
    let prefix = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            anyhow::bail!("the helper never made its Net: {e}");
        }
    };
    let ours = |prefix: &str| -> Vec<String> {
        namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect()
    };
    assert_eq!(ours(&prefix).len(), 2, "the bridge and the pod");
    // SIGKILL: no destructor runs; the guardian must clean up.
    child.kill()?;
    child.wait()?;
    let start = Instant::now();
    while !ours(&prefix).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left behind: {:?}",
            ours(&prefix)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the guardian removed {prefix}'s namespaces {:?} after the kill",
        start.elapsed()
    );
    // And the process that ran in the pod (by its own PID) is gone too.
    let sleeper = pid_rx.recv_timeout(Duration::from_secs(1))?;
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{sleeper}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "process {sleeper} of the killed test is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
