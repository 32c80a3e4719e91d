//! Network namespaces, veth pairs, a bridge, and processes inside them.
//!
//! Layout of one [`Net`] (addresses exist only inside its namespaces):
//!
//! ```text
//!  netns <prefix>-br:  br0 10.88.0.1/16 ── control plane, metrics scrapers
//!        │ veth (v<n> in -br, eth0 in the pod)
//!  netns <prefix>-<pod>: eth0 10.88.0.<n>/16, default route via 10.88.0.1
//!        app + strait-proxy (uid 2102) + iptables from `strait-proxy init`
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// The address of the bridge (and of the control plane) inside every Net.
pub const BRIDGE_IP: &str = "10.88.0.1";
/// The bridge's IPv6 address.
pub const BRIDGE_IP6: &str = "fd00:88::1";
/// The UID proxies run as; `strait-proxy init` excludes it from redirection.
pub const PROXY_UID: u32 = 2102;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A pod: a network namespace with one address on the Net's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// The pod's IPv6 address, `fd00:88::<n>`.
    pub ip6: String,
}

/// A process started in a namespace; killed when the Net is dropped, or by [`Net::kill`].
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// A private network of pods. Dropping it kills its processes and deletes its namespaces.
///
/// A Net made by [`Net::new`] (the tests') has a deadline ([`TEST_DEADLINE`]): when it passes,
/// every process in its namespaces is killed, so whatever the test waits on ends and the test
/// fails instead of hanging. Every command run in it is bounded as a whole. A guardian process
/// outside the test's process group deletes the namespaces if the test process is killed
/// before it can clean up (e.g. by the test runner's timeout).
#[derive(Debug)]
pub struct Net {
    pub prefix: String,
    pub bridge_ns: String,
    pub dir: PathBuf,
    pods: Mutex<Vec<Pod>>,
    children: Mutex<Vec<(Proc, Child)>>,
    next_host: AtomicU32,
    keep_logs: bool,
    /// When the test's time is up (tests only).
    deadline: Option<Instant>,
    /// Dropped with the Net: stops the deadline watchdog.
    _watchdog: Option<std::sync::mpsc::Sender<()>>,
    guardian: Option<Child>,
}

/// How long a test's Net may live before its processes are killed: far below the test
/// runner's own timeout (.config/nextest.toml), so that a stuck test fails with its logs and
/// cleans up. `STRAIT_TEST_DEADLINE` (e.g. `300s`) overrides it.
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// The longest any single command run in a Net may take (a globbed curl included).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Runs a command to completion, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    sh_within(program, args, COMMAND_LIMIT)
}

/// Runs `program` with `args`; kills it after `limit`, with stdout and stderr pipes read
/// concurrently so a chatty command cannot block.
pub fn run_within(program: &str, args: &[&str], limit: Duration) -> Result<std::process::Output> {
    use std::io::Read;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            bail!(
                "`{program} {}` did not finish within {limit:?} and was killed; its output:\n{}",
                args.join(" "),
                tail(&String::from_utf8_lossy(&stdout), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// [`sh`] with its own time limit.
pub fn sh_within(program: &str, args: &[&str], limit: Duration) -> Result<String> {
    let out = run_within(program, args, limit)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    sh("ip", args)
}

impl Net {
    /// Creates a test's Net: the bridge namespace, the deadline watchdog and the guardian.
    /// `tag` is a short name for this network (test name).
    pub fn new(tag: &str) -> Result<Self> {
        let mut net = Self::with_prefix(format!(
            "stt{}x{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            tag
        ))?;
        let limit = match std::env::var("STRAIT_TEST_DEADLINE") {
            Ok(v) => humantime::parse_duration(&v)
                .with_context(|| format!("STRAIT_TEST_DEADLINE {v:?} is not a duration"))?,
            Err(_) => TEST_DEADLINE,
        };
        net.deadline = Some(Instant::now() + limit);
        net._watchdog = Some(watchdog(net.prefix.clone(), limit));
        net.guardian = guardian(&net.prefix);
        Ok(net)
    }

    /// Creates a Net whose namespaces are named `<prefix>-*` (no deadline: the demo's).
    pub fn with_prefix(prefix: String) -> Result<Self> {
        if !crate::is_root() {
            bail!("network namespaces need root: run as root (e.g. sudo)");
        }
        remove_stale_namespaces();
        let dir = std::env::temp_dir().join(format!("strait-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let bridge_ns = format!("{prefix}-br");
        let net = Net {
            prefix,
            bridge_ns: bridge_ns.clone(),
            dir,
            pods: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(2),
            keep_logs: std::env::var_os("STRAIT_KEEP_LOGS").is_some(),
            deadline: None,
            _watchdog: None,
            guardian: None,
        };
        ip(&["netns", "add", &bridge_ns])?;
        let b = bridge_ns.as_str();
        ip(&["-n", b, "link", "set", "lo", "up"])?;
        // A fixed address: a bridge left to choose takes the lowest address of its ports, so
        // every new pod could change it and leave the pods already running with a stale ARP
        // entry for the control plane (their connections to it hang until the entry expires).
        ip(&[
            "-n",
            b,
            "link",
            "add",
            "br0",
            "address",
            "02:88:00:00:00:01",
            "type",
            "bridge",
        ])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("{BRIDGE_IP}/16"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("{BRIDGE_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", b, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// Adds a pod: its namespace, a veth to the bridge, an address and a default route.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        let n = self.next_host.fetch_add(1, Ordering::Relaxed);
        if n > 250 {
            bail!("too many pods in one Net");
        }
        let ns = format!("{}-{name}", self.prefix);
        let pod_ip = format!("10.88.0.{n}");
        ip(&["netns", "add", &ns])?;
        let pod = Pod {
            name: name.to_string(),
            ns: ns.clone(),
            ip: pod_ip.clone(),
            ip6: format!("fd00:88::{n:x}"),
        };
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pod.clone());
        let veth = format!("v{n}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &veth,
            "netns",
            &self.bridge_ns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &veth,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{pod_ip}/16"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", BRIDGE_IP])?;
        // IPv6 too; `nodad` makes the address usable at once.
        let cidr6 = format!("{}/64", pod.ip6);
        ip(&["-n", &ns, "addr", "add", &cidr6, "dev", "eth0", "nodad"])?;
        ip(&[
            "-n", &ns, "-6", "route", "add", "default", "via", BRIDGE_IP6,
        ])?;
        Ok(pod)
    }

    /// Starts `cmd` in namespace `ns` (as `uid` when given), logging to `<dir>/<name>.log`.
    pub fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        uid: Option<u32>,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let file = File::create(&log)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
            c.args(["setpriv", &u, &g, "--clear-groups", "--"]);
        }
        c.args(cmd)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = c
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        let proc = Proc {
            name: name.to_string(),
            pid: child.id(),
            log,
        };
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((proc.clone(), child));
        Ok(proc)
    }

    /// Starts `cmd` in a pod.
    pub fn spawn(&self, pod: &Pod, name: &str, cmd: &[&str]) -> Result<Proc> {
        self.spawn_in(&pod.ns, &format!("{}-{name}", pod.name), None, cmd, &[])
    }

    /// How long a command may still run: [`COMMAND_LIMIT`], or less when the Net's deadline
    /// is nearer. Fails once the deadline has passed.
    pub fn command_limit(&self) -> Result<Duration> {
        match self.deadline {
            None => Ok(COMMAND_LIMIT),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(left.min(COMMAND_LIMIT)),
                _ => bail!(
                    "the test's deadline ({TEST_DEADLINE:?}, STRAIT_TEST_DEADLINE) has passed"
                ),
            },
        }
    }

    /// Runs `cmd` in namespace `ns` to completion; returns stdout, fails with stderr.
    pub fn exec_in(&self, ns: &str, cmd: &[&str]) -> Result<String> {
        self.exec_within(ns, cmd, self.command_limit()?)
    }

    /// Runs `cmd` in namespace `ns`, killed after `limit` (or the Net's deadline, if nearer).
    pub fn exec_within(&self, ns: &str, cmd: &[&str], limit: Duration) -> Result<String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        sh_within("ip", &args, limit.min(self.command_limit()?))
    }

    /// Runs `cmd` in a pod to completion.
    pub fn exec(&self, pod: &Pod, cmd: &[&str]) -> Result<String> {
        self.exec_in(&pod.ns, cmd)
    }

    /// Like [`Net::exec`] but returns (exit success, stdout, stderr) instead of failing.
    pub fn try_exec(&self, pod: &Pod, cmd: &[&str]) -> Result<(bool, String, String)> {
        let mut args = vec!["netns", "exec", pod.ns.as_str()];
        args.extend_from_slice(cmd);
        let out = run_within("ip", &args, self.command_limit()?)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Waits until `proc`'s log contains `needle` (or the process exits, or `timeout`).
    pub fn wait_log(&self, proc: &Proc, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(f) = File::open(&proc.log) {
                if BufReader::new(f)
                    .lines()
                    .map_while(|l| l.ok())
                    .any(|l| l.contains(needle))
                {
                    return Ok(());
                }
            }
            if !self.is_running(proc) {
                bail!(
                    "{} exited before logging {needle:?}; log:\n{}",
                    proc.name,
                    read(&proc.log)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{}",
                    proc.name,
                    read(&proc.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `timeout`) for `proc` to exit; returns whether it exited successfully.
    pub fn wait(&self, proc: &Proc, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        loop {
            {
                let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
                let Some((_, child)) = children.iter_mut().find(|(p, _)| p.pid == proc.pid) else {
                    bail!("{} is not a process of this Net", proc.name);
                };
                if let Some(status) = child.try_wait()? {
                    return Ok(status.success());
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} still running after {timeout:?}; log:\n{}",
                    proc.name,
                    read(&proc.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What `proc` has written so far.
    pub fn output(&self, proc: &Proc) -> String {
        read(&proc.log)
    }

    /// Whether `proc` is still running.
    pub fn is_running(&self, proc: &Proc) -> bool {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        children
            .iter_mut()
            .find(|(p, _)| p.pid == proc.pid)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` to `proc` without waiting (see [`Net::wait`]).
    pub fn kill_nowait(&self, proc: &Proc, signal: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(proc.pid as i32), signal)?;
        Ok(())
    }

    /// Sends `signal` to `proc` and waits (up to 10 s) for it to exit.
    pub fn kill(&self, proc: &Proc, signal: nix::sys::signal::Signal) -> Result<()> {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = children.iter().position(|(p, _)| p.pid == proc.pid) {
            let (_, mut child) = children.remove(pos);
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// The pods created so far.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every process log, for failure reports.
    pub fn logs(&self) -> String {
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (p, _) in children.iter() {
            out.push_str(&format!(
                "----- {} (pid {}) -----\n{}\n",
                p.name,
                p.pid,
                tail(&read(&p.log), 60)
            ));
        }
        out
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Kills every process in `ns` and deletes it.
pub fn delete_namespace(ns: &str) {
    kill_all_in(ns);
    let _ = sh("ip", &["netns", "del", ns]);
}

/// Names of the existing network namespaces.
pub fn namespaces() -> Vec<String> {
    sh("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Kills every process in the namespaces named `<prefix>-*` once `limit` has passed, unless
/// the returned sender is dropped first (the Net went away).
fn watchdog(prefix: String, limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!(
                "testbed: {prefix}: the test ran past its deadline of {limit:?}; killing its processes"
            );
            for ns in namespaces()
                .iter()
                .filter(|n| n.starts_with(&format!("{prefix}-")))
            {
                kill_all_in(ns);
            }
        }
    });
    tx
}

/// A process in a session of its own (so a runner that kills the test's process group leaves
/// it alive) that waits for the test process to exit, then kills what is left in the Net's
/// namespaces and deletes them. After a normal drop there is nothing left and it is killed.
fn guardian(prefix: &str) -> Option<Child> {
    let script = r#"while kill -0 "$0" 2>/dev/null; do sleep 1; done
for ns in $(ip netns list | cut -d' ' -f1); do
  case "$ns" in
    "$1"-*) for p in $(ip netns pids "$ns"); do kill -9 "$p"; done; ip netns del "$ns";;
  esac
done"#;
    let child = Command::new("setsid")
        .args(["sh", "-c", script, &std::process::id().to_string(), prefix])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("testbed: no guardian for {prefix} (setsid: {e}); a killed test may leave its namespaces until the next run");
            None
        }
    }
}

/// Kills every process in namespace `ns`.
fn kill_all_in(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes `stt<pid>x...` namespaces whose owner process is gone (a killed test run).
pub fn remove_stale_namespaces() {
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix("stt") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(&ns);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if failing {
            eprintln!("===== logs of {} =====", self.prefix);
            for (p, _) in children.iter() {
                eprintln!(
                    "----- {} (pid {}) -----\n{}",
                    p.name,
                    p.pid,
                    tail(&read(&p.log), 80)
                );
            }
        }
        for (_, child) in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        for pod in pods.iter() {
            delete_namespace(&pod.ns);
        }
        delete_namespace(&self.bridge_ns);
        if let Some(mut g) = self.guardian.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        if !self.keep_logs && !failing {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
