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
    /// Set for a mesh with identity (mTLS).
    pub ca: Option<CaFiles>,
    /// The control plane's flags, to start it again the same way.
    control_plane_args: Vec<String>,
}

impl Mesh {
    /// A network with a running control plane and an empty config, without identity: the
    /// sidecars run without certificates, and discovery is plaintext (`--plaintext`).
    pub fn new(tag: &str) -> Result<Self> {
        let net = Net::new(tag)?;
        let config = MeshConfig::new(net.dir.join("config"))?;
        let control_plane_args = vec!["--plaintext".to_string()];
        let args: Vec<&str> = control_plane_args.iter().map(String::as_str).collect();
        let control_plane = net.start_control_plane_with(&config.dir, &args)?;
        Ok(Self {
            net,
            config,
            control_plane,
            ca: None,
            control_plane_args,
        })
    }

    /// Restarts the control plane with `extra` flags added to its own (kept for later
    /// restarts). Call before any pod starts.
    pub fn with_control_plane_args(mut self, extra: &[&str]) -> Result<Self> {
        self.net
            .kill(&self.control_plane, nix::sys::signal::Signal::SIGKILL)?;
        self.control_plane_args
            .extend(extra.iter().map(|s| s.to_string()));
        self.control_plane = self.start_control_plane()?;
        Ok(self)
    }

    /// Starts the control plane again (after a kill), with the flags it first had.
    pub fn start_control_plane(&self) -> Result<Proc> {
        let args: Vec<&str> = self.control_plane_args.iter().map(String::as_str).collect();
        self.net.start_control_plane_with(&self.config.dir, &args)
    }

    /// A pod with its iptables rules and sidecar.
    pub fn meshed_pod(&self, name: &str) -> Result<Pod> {
        self.meshed_pod_with(name, &SidecarOpts::default())
    }

    pub fn meshed_pod_with(&self, name: &str, opts: &SidecarOpts) -> Result<Pod> {
        self.pod_as(name, name, opts)
    }

    /// Runs curl in `pod` (silent, failing on transport errors): 10 s per transfer, and the
    /// whole command (a glob of many transfers too) within the testbed's command limit
    /// (`strait_testbed::netns::COMMAND_LIMIT`, or less near the test's deadline).
    pub fn curl(&self, pod: &Pod, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
        cmd.extend_from_slice(args);
        self.net.exec(pod, &cmd)
    }

    /// Runs the HTTP test app (`hello from server`) in `pod` on 8080 and publishes it as the
    /// service `web`, 10.96.0.10:80.
    pub fn serve_web(&self, pod: &Pod) -> Result<()> {
        self.net.start_app(
            pod,
            "http",
            &["http", "--listen", "0.0.0.0:8080", "--name", "server"],
        )?;
        self.config
            .service(&ServiceDef::new("web", "10.96.0.10", 80, 8080, &[pod]))?;
        Ok(())
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

/// The CA files of a mesh with identity (under `<net dir>/ca`).
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: std::path::PathBuf,
    /// The bundle proxies trust (re-read by them when it changes).
    pub anchors: std::path::PathBuf,
    pub anchor_cert: std::path::PathBuf,
    pub anchor_key: std::path::PathBuf,
    pub issuer_cert: std::path::PathBuf,
    pub issuer_key: std::path::PathBuf,
}

/// Where the control plane's identity API listens inside every Net.
pub const IDENTITY_ADDR: &str = "10.88.0.1:8080";

impl Mesh {
    /// A mesh with mTLS: a new CA, the control plane's identity API (workload certificates
    /// valid for `leaf_lifetime`, e.g. "24h" or "20s"), and sidecars that get certificates.
    pub fn with_identity(tag: &str, leaf_lifetime: &str) -> Result<Self> {
        let net = Net::new(tag)?;
        let config = MeshConfig::new(net.dir.join("config"))?;
        let dir = net.dir.join("ca");
        std::fs::create_dir_all(&dir)?;
        let ca = strait_identity::ca::generate(
            "cluster.local",
            Duration::from_secs(3600 * 24 * 365),
            Duration::from_secs(3600 * 24 * 30),
        )?;
        let files = CaFiles {
            anchors: dir.join("anchors.pem"),
            anchor_cert: dir.join("ca.crt"),
            anchor_key: dir.join("ca.key"),
            issuer_cert: dir.join("issuer.crt"),
            issuer_key: dir.join("issuer.key"),
            dir,
        };
        std::fs::write(&files.anchors, &ca.anchor_cert_pem)?;
        std::fs::write(&files.anchor_cert, &ca.anchor_cert_pem)?;
        std::fs::write(&files.anchor_key, &ca.anchor_key_pem)?;
        std::fs::write(&files.issuer_cert, &ca.issuer_cert_pem)?;
        std::fs::write(&files.issuer_key, &ca.issuer_key_pem)?;
        let control_plane_args: Vec<String> = [
            "--issuer-cert",
            &files.issuer_cert.to_string_lossy(),
            "--issuer-key",
            &files.issuer_key.to_string_lossy(),
            "--trust-anchors",
            &files.anchors.to_string_lossy(),
            "--identity-addr",
            IDENTITY_ADDR,
            "--leaf-lifetime",
            leaf_lifetime,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args: Vec<&str> = control_plane_args.iter().map(String::as_str).collect();
        let control_plane = net.start_control_plane_with(&config.dir, &args)?;
        net.wait_log(&control_plane, "serving identity", Duration::from_secs(10))?;
        Ok(Self {
            net,
            config,
            control_plane,
            ca: Some(files),
            control_plane_args,
        })
    }

    /// A pod running as service account `sa`, with its token, Pod document and sidecar (with an
    /// identity when the mesh has one).
    pub fn pod_as(&self, name: &str, sa: &str, opts: &SidecarOpts) -> Result<Pod> {
        self.pod_in(name, "default", sa, opts)
    }

    /// A pod in namespace `ns` running as service account `sa`.
    pub fn pod_in(&self, name: &str, ns: &str, sa: &str, opts: &SidecarOpts) -> Result<Pod> {
        let pod = self.net.pod(name)?;
        let mut env: Vec<(String, String)> = opts
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(ca) = &self.ca {
            let token = format!("token-{name}-{}", std::process::id());
            let token_file = self.net.dir.join(format!("{name}.token"));
            std::fs::write(&token_file, &token)?;
            self.config.write(
                &format!("pod-{name}.yaml"),
                &format!(
                    "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{serviceAccountName: {sa}}}\n---\n\
                     kind: Secret\nmetadata: {{name: {name}-token, namespace: {ns}, annotations: {{kubernetes.io/service-account.name: {sa}}}}}\n\
                     type: kubernetes.io/service-account-token\nstringData: {{token: {token}}}\n"
                ),
            )?;
            env.push(("STRAIT_IDENTITY_ADDR".into(), IDENTITY_ADDR.into()));
            // Anchors given inline (as the injector does) replace the file.
            if !env.iter().any(|(k, _)| k == "STRAIT_TRUST_ANCHORS_PEM") {
                env.push((
                    "STRAIT_TRUST_ANCHORS".into(),
                    ca.anchors.to_string_lossy().into(),
                ));
            }
            env.push((
                "STRAIT_IDENTITY_TOKEN_FILE".into(),
                token_file.to_string_lossy().into(),
            ));
            env.push((
                "STRAIT_IDENTITY".into(),
                format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            ));
            // Let the control plane see the token before the proxy asks.
            std::thread::sleep(Duration::from_millis(300));
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let opts = SidecarOpts {
            env: env_refs,
            skip_outbound_ports: opts.skip_outbound_ports,
            skip_init: opts.skip_init,
        };
        self.net.start_sidecar(&pod, &opts)?;
        Ok(pod)
    }
}

/// PEM text of one DER block.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a certificate (with its issuer) and key for `sa`, signed by the issuer in `ca`
/// (or by a new, foreign CA), as PEM files for openssl: returns (leaf, key, intermediates).
pub fn workload_cert(
    dir: &std::path::Path,
    name: &str,
    sa: &str,
    ca: Option<&CaFiles>,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let issuer = match ca {
        Some(ca) => strait_identity::ca::CertificateAuthority::from_pem(
            &std::fs::read_to_string(&ca.issuer_cert)?,
            &std::fs::read_to_string(&ca.issuer_key)?,
        )?,
        None => {
            let foreign = strait_identity::ca::generate(
                "cluster.local",
                Duration::from_secs(86400),
                Duration::from_secs(86400),
            )?;
            strait_identity::ca::CertificateAuthority::from_pem(
                &foreign.issuer_cert_pem,
                &foreign.issuer_key_pem,
            )?
        }
    };
    let id = strait_identity::SpiffeId::new("cluster.local", "default", sa)?;
    let (chain, key) = issuer.issue_server(&id, "impostor.example", Duration::from_secs(3600))?;
    let leaf_path = dir.join(format!("{name}.crt"));
    let chain_path = dir.join(format!("{name}-chain.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&leaf_path, pem("CERTIFICATE", &chain[0]))?;
    std::fs::write(
        &chain_path,
        chain[1..]
            .iter()
            .map(|c| pem("CERTIFICATE", c))
            .collect::<String>(),
    )?;
    std::fs::write(&key_path, pem("PRIVATE KEY", &key))?;
    Ok((leaf_path, key_path, chain_path))
}

/// How many `hello from <name>` lines each server answered.
pub fn served_by(out: &str) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("hello from ") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

impl Mesh {
    /// Starts a bounded load (20 req/s to `url` for `seconds`) from `pod`.
    pub fn load(&self, pod: &Pod, url: &str, seconds: u32) -> Result<Proc> {
        let bin = strait_testbed::bin("strait-testapp")?;
        self.net.spawn(
            pod,
            "load",
            &[
                &bin.to_string_lossy(),
                "load",
                "--url",
                url,
                "--rps",
                "20",
                "--duration",
                &format!("{seconds}s"),
            ],
        )
    }

    /// Waits for a load to end; returns (requests sent, requests answered 2xx).
    pub fn finish_load(&self, load: &Proc, timeout: Duration) -> Result<(u64, u64)> {
        if !self.net.wait(load, timeout)? {
            bail!("load failed: {}", self.net.output(load));
        }
        let out = self.net.output(load);
        let field = |name: &str| -> u64 {
            out.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("sent"), field("ok")))
    }
}

/// A client that holds one TCP connection to `addr` (an echo), sending a line every 100 ms:
/// it prints `open` once echoed, then `closed after <s>` when the connection ends under it,
/// and gives up after 20 s.
const HOLD_TCP: &str = r#"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(b"PING\n")
assert s.recv(64).startswith(b"PING"), "no echo"
print("open", flush=True)
start = time.time()
while time.time() - start < 20:
    time.sleep(0.1)
    try:
        s.sendall(b"PING\n")
        if not s.recv(64):
            break
    except OSError:
        break
else:
    sys.exit("still open after 20 s")
print("closed after %.3f" % (time.time() - start), flush=True)
"#;

/// One held TCP connection (see [`Mesh::hold_tcp`]).
pub struct HeldTcp(Proc);

impl Mesh {
    /// Opens a TCP connection from `pod` to the echo at `addr` and keeps it busy; returns once
    /// the first echo came back.
    pub fn hold_tcp(&self, pod: &Pod, addr: &str) -> Result<HeldTcp> {
        let script = self.net.dir.join("hold_tcp.py");
        std::fs::write(&script, HOLD_TCP)?;
        let proc = self
            .net
            .spawn(pod, "hold", &["python3", &script.to_string_lossy(), addr])?;
        self.net.wait_log(&proc, "open", Duration::from_secs(10))?;
        Ok(HeldTcp(proc))
    }

    /// Waits (up to `timeout`) for the held connection to be closed under the client; returns
    /// how long it stayed open after the first echo.
    pub fn held_tcp_closed(&self, held: &HeldTcp, timeout: Duration) -> Result<Duration> {
        let ok = self.net.wait(&held.0, timeout)?;
        let out = self.net.output(&held.0);
        if !ok {
            bail!("the held connection was not closed: {out}");
        }
        out.lines()
            .find_map(|l| l.strip_prefix("closed after "))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64)
            .ok_or_else(|| anyhow::anyhow!("no `closed after` in: {out}"))
    }
}
