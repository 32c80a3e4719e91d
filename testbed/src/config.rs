//! Local-mode mesh config (Kubernetes-style YAML) for test and demo services, and starting the
//! control plane and sidecars in a [`Net`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::netns::{Net, Pod, Proc, BRIDGE_IP, PROXY_UID};

/// Where the control plane listens inside every Net.
pub const DISCOVERY_PORT: u16 = 8086;

/// One service and its endpoints.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: String,
    pub port: u16,
    pub target_port: u16,
    /// (pod IP, pod name): the name becomes the endpoint's `targetRef`, so a Pod document
    /// can give its service account.
    pub endpoints: Vec<(String, String)>,
    pub service_account: String,
    pub app_protocol: Option<String>,
    pub opaque: bool,
    pub meshed: bool,
}

impl ServiceDef {
    pub fn new(
        name: &str,
        cluster_ip: &str,
        port: u16,
        target_port: u16,
        endpoints: &[&Pod],
    ) -> Self {
        Self {
            name: name.to_string(),
            namespace: "default".to_string(),
            cluster_ip: cluster_ip.to_string(),
            port,
            target_port,
            endpoints: endpoints
                .iter()
                .map(|p| (p.ip.clone(), p.name.clone()))
                .collect(),
            service_account: name.to_string(),
            app_protocol: None,
            opaque: false,
            meshed: true,
        }
    }

    pub fn yaml(&self) -> String {
        let mut annotations = String::new();
        if self.opaque {
            annotations = format!(
                "\n  annotations:\n    strait.io/opaque-ports: \"{}\"",
                self.port
            );
        }
        let app_protocol = self
            .app_protocol
            .as_ref()
            .map(|p| format!(", appProtocol: {p}"))
            .unwrap_or_default();
        let endpoints: String = self
            .endpoints
            .iter()
            .map(|(ip, pod)| {
                format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}}}\n")
            })
            .collect();
        let endpoints = if endpoints.is_empty() {
            "[]\n".to_string()
        } else {
            format!("\n{endpoints}")
        };
        format!(
            r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}{annotations}
spec:
  clusterIP: {ip}
  ports:
  - {{name: main, port: {port}, targetPort: {target}, protocol: TCP{app_protocol}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-slice
  namespace: {ns}
  labels:
    kubernetes.io/service-name: {name}
  annotations:
    strait.io/service-account: {sa}
    strait.io/meshed: "{meshed}"
addressType: IPv4
ports:
- {{name: main, port: {target}, protocol: TCP}}
endpoints: {endpoints}"#,
            name = self.name,
            ns = self.namespace,
            ip = self.cluster_ip,
            port = self.port,
            target = self.target_port,
            sa = self.service_account,
            meshed = self.meshed,
        )
    }
}

/// A local-mode config directory.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub dir: PathBuf,
}

impl MeshConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Writes (or replaces) a file atomically, so the control plane never reads half of it.
    pub fn write(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(file))?;
        Ok(())
    }

    pub fn service(&self, svc: &ServiceDef) -> Result<()> {
        self.write(&format!("{}-{}.yaml", svc.namespace, svc.name), &svc.yaml())
    }
}

/// Settings of a sidecar started by [`Net::start_sidecar`].
#[derive(Debug, Clone, Default)]
pub struct SidecarOpts<'a> {
    pub env: Vec<(&'a str, &'a str)>,
    pub skip_outbound_ports: Option<&'a str>,
    /// The pod's rules are already there (written by the CNI plugin): no `strait-proxy init`.
    pub skip_init: bool,
}

impl Net {
    /// Starts the control plane in the bridge namespace, serving `config`.
    pub fn start_control_plane(&self, config: &Path) -> Result<Proc> {
        self.start_control_plane_with(config, &[])
    }

    /// Same, with extra flags (e.g. the issuer's files).
    pub fn start_control_plane_with(&self, config: &Path, extra: &[&str]) -> Result<Proc> {
        let bin = crate::bin("strait-control-plane")?;
        let addr = format!("{BRIDGE_IP}:{DISCOVERY_PORT}");
        let dir = config.to_string_lossy();
        let bin = bin.to_string_lossy();
        let state = self.state_dir();
        let state = state.to_string_lossy();
        let mut cmd: Vec<&str> = vec![
            &bin,
            "--config-dir",
            &dir,
            "--state-dir",
            &state,
            "--discovery-addr",
            &addr,
            "--poll-interval",
            "100ms",
        ];
        cmd.extend_from_slice(extra);
        let proc = self.spawn_in(
            &self.bridge_ns,
            "control-plane",
            None,
            &cmd,
            &[("STRAIT_LOG", "info,strait_control_plane::discovery=debug")],
        )?;
        self.wait_log(&proc, "serving discovery", Duration::from_secs(10))?;
        Ok(proc)
    }

    /// The control plane's state directory (its local CA and the pods' bootstrap tokens).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// What a pod's proxy needs to get the identity `spiffe://cluster.local/ns/<ns>/sa/<sa>`
    /// from the control plane's local CA, as a pod's set-up hands it over: after the Pod
    /// document `pod-<name>.yaml` is in `config`, it waits for the control plane to mint the
    /// pod's bootstrap token and copies it to a file only the proxy's UID can read. With
    /// `config`, it writes that Pod document first (else the config already has it).
    pub fn local_identity(
        &self,
        config: Option<&MeshConfig>,
        pod: &Pod,
        ns: &str,
        sa: &str,
    ) -> Result<Vec<(String, String)>> {
        if let Some(config) = config {
            config.write(
                &format!("pod-{}.yaml", pod.name),
                &format!(
                    "kind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{serviceAccountName: {sa}}}\n",
                    name = pod.name
                ),
            )?;
        }
        let minted = self.state_dir().join("tokens").join(ns).join(&pod.name);
        let start = std::time::Instant::now();
        let token = loop {
            match std::fs::read_to_string(&minted) {
                Ok(t) if !t.trim().is_empty() => break t,
                _ if start.elapsed() > Duration::from_secs(10) => {
                    anyhow::bail!(
                        "the control plane minted no bootstrap token for {ns}/{} in 10 s ({})",
                        pod.name,
                        minted.display()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // The pod's own copy: readable by the proxy's UID only.
        let copy = self.dir.join(format!("{}.bootstrap-token", pod.name));
        std::fs::write(&copy, token.trim())?;
        std::os::unix::fs::chown(&copy, Some(PROXY_UID), Some(PROXY_UID))?;
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        // The state directory is the control plane's own (0700): the anchors are handed over
        // as a copy too.
        let anchors = self.dir.join("anchors.pem");
        std::fs::copy(self.state_dir().join("ca").join("anchors.pem"), &anchors)?;
        Ok(vec![
            ("STRAIT_IDENTITY_ADDR".into(), format!("{BRIDGE_IP}:8080")),
            (
                "STRAIT_TRUST_ANCHORS".into(),
                anchors.to_string_lossy().into(),
            ),
            (
                "STRAIT_IDENTITY_TOKEN_FILE".into(),
                copy.to_string_lossy().into(),
            ),
            (
                "STRAIT_IDENTITY".into(),
                format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            ),
        ])
    }

    /// Writes the pod's iptables rules and starts its proxy (as the proxy UID), waiting until it
    /// is ready.
    pub fn start_sidecar(&self, pod: &Pod, opts: &SidecarOpts) -> Result<Proc> {
        let bin = crate::bin("strait-proxy")?;
        let bin = bin.to_string_lossy();
        let mut init = vec![bin.as_ref(), "init"];
        if let Some(p) = opts.skip_outbound_ports {
            init.extend(["--skip-outbound-ports", p]);
        }
        if !opts.skip_init {
            self.exec(pod, &init).context("strait-proxy init")?;
        }
        let cp = format!("{BRIDGE_IP}:{DISCOVERY_PORT}");
        let workload = format!("default/{}", pod.name);
        let pod_ip = pod.ip.to_string();
        let mut env = vec![
            ("STRAIT_CONTROL_PLANE_ADDR", cp.as_str()),
            // As the injector sets it from status.podIP: where application probes connect.
            ("STRAIT_POD_IP", pod_ip.as_str()),
            ("STRAIT_WORKLOAD", workload.as_str()),
            ("STRAIT_LOG", "info,strait_proxy::discovery=debug"),
            ("STRAIT_SHUTDOWN_GRACE_PERIOD", "5s"),
            // Tests run many meshes at once on two cores: a first discovery answer can take
            // longer than the 1 s default, and the proxy would then pass the request through
            // (a safe fallback, but not what a test of the mesh means to exercise).
            ("STRAIT_DISCOVERY_TIMEOUT", "5s"),
        ];
        env.extend(opts.env.iter().copied());
        let proc = self.spawn_in(
            &pod.ns,
            &format!("{}-proxy", pod.name),
            Some(PROXY_UID),
            &[&bin, "run"],
            &env,
        )?;
        self.wait_log(&proc, "proxy ready", Duration::from_secs(10))?;
        Ok(proc)
    }

    /// Starts the test app in a pod and waits until it listens.
    pub fn start_app(&self, pod: &Pod, name: &str, args: &[&str]) -> Result<Proc> {
        let bin = crate::bin("strait-testapp")?;
        let bin = bin.to_string_lossy();
        let mut cmd = vec![bin.as_ref()];
        cmd.extend_from_slice(args);
        let proc = self.spawn(pod, name, &cmd)?;
        self.wait_log(&proc, "listening on", Duration::from_secs(10))?;
        Ok(proc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_yaml_is_what_the_control_plane_parses() {
        let pod = Pod {
            name: "a".into(),
            ns: "x".into(),
            ip: "10.88.0.2".into(),
            ip6: "fd00:88::2".into(),
        };
        let mut svc = ServiceDef::new("web", "10.96.0.10", 80, 8080, &[&pod]);
        svc.opaque = true;
        let y = svc.yaml();
        assert!(y.contains("clusterIP: 10.96.0.10"));
        assert!(y.contains("strait.io/opaque-ports: \"80\""));
        assert!(y.contains("addresses: [\"10.88.0.2\"]"));
        let empty = ServiceDef::new("web", "10.96.0.10", 80, 8080, &[]).yaml();
        assert!(empty.contains("endpoints: []"));
    }
}
