//! The e2e fixture: a [`Mesh`] is a private network (see `strait_testbed::netns`) with the
//! control plane serving a local-mode config directory, plus helpers to add meshed pods and
//! run real clients in them.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use strait_testbed::{MeshConfig, Net, Pod, Proc, SidecarOpts};

pub use strait_testbed::{netns, ServiceDef};

pub struct Mesh {
    pub net: Net,
    pub config: MeshConfig,
    pub control_plane: Proc,
}

impl Mesh {
    /// A network with a running control plane and an empty config.
    pub fn new(tag: &str) -> Result<Self> {
        let net = Net::new(tag)?;
        let config = MeshConfig::new(net.dir.join("config"))?;
        let control_plane = net.start_control_plane(&config.dir)?;
        Ok(Self {
            net,
            config,
            control_plane,
        })
    }

    /// A pod with its iptables rules and sidecar.
    pub fn meshed_pod(&self, name: &str) -> Result<Pod> {
        self.meshed_pod_with(name, &SidecarOpts::default())
    }

    pub fn meshed_pod_with(&self, name: &str, opts: &SidecarOpts) -> Result<Pod> {
        let pod = self.net.pod(name)?;
        self.net.start_sidecar(&pod, opts)?;
        Ok(pod)
    }

    /// Runs curl in `pod` (silent, failing on transport errors, 10 s cap).
    pub fn curl(&self, pod: &Pod, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
        cmd.extend_from_slice(args);
        self.net.exec(pod, &cmd)
    }

    /// The proxy's Prometheus text, read from inside the pod.
    pub fn metrics(&self, pod: &Pod) -> Result<String> {
        self.curl(pod, &["http://127.0.0.1:4191/metrics"])
    }

    /// Polls `check` every 50 ms until it returns true or `timeout` passes.
    pub fn eventually(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if check()? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("condition not met within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of the sample of `name` whose labels contain every `labels` fragment.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|frag| l.contains(frag)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// SHA-256 hex digest of `bytes`, through `sha256sum`.
pub fn sha256(bytes: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .map(|mut s| s.write_all(bytes))
        .transpose()?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}
