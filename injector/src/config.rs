//! What the injector puts into a pod: images, addresses, identity settings and defaults. The
//! same settings drive the webhook (`strait-injector`) and the offline `strait inject`.

use std::path::PathBuf;

/// How the proxy runs next to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): starts before the
    /// application, stops after it, and lets Jobs complete.
    Native,
    /// For clusters older than 1.29: the proxy is the first regular container and a
    /// `postStart` hook holds the application until the proxy is ready.
    Classic,
}

impl SidecarMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "classic" => Some(Self::Classic),
            _ => None,
        }
    }
}

/// Injection settings. Every flag has a `STRAIT_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectConfig {
    /// Image holding `strait-proxy` (used for the init container and the sidecar).
    #[arg(long, env = "STRAIT_PROXY_IMAGE", default_value = DEFAULT_IMAGE)]
    pub proxy_image: String,
    /// `imagePullPolicy` of the injected containers.
    #[arg(long, env = "STRAIT_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// UID the proxy runs as; iptables leaves its traffic alone.
    #[arg(long, env = "STRAIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: i64,
    /// Discovery API of the control plane, `host:port`.
    #[arg(
        long,
        env = "STRAIT_CONTROL_PLANE_ADDR",
        default_value = "strait-control-plane.strait-system.svc.cluster.local:8086"
    )]
    pub control_plane_addr: String,
    /// Identity API of the control plane, `host:port`.
    #[arg(
        long,
        env = "STRAIT_IDENTITY_ADDR",
        default_value = "strait-identity.strait-system.svc.cluster.local:8080"
    )]
    pub identity_addr: String,
    /// DNS name in the identity API's certificate.
    #[arg(
        long,
        env = "STRAIT_IDENTITY_SERVER_NAME",
        default_value = "identity.strait-system.svc.cluster.local"
    )]
    pub identity_server_name: String,
    /// SPIFFE trust domain.
    #[arg(long, env = "STRAIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// PEM bundle of trust anchors given to every proxy (re-read for each pod). Without it the
    /// proxies run without identity (plaintext between proxies).
    #[arg(long, env = "STRAIT_TRUST_ANCHORS")]
    pub trust_anchors: Option<PathBuf>,
    /// Audience of the projected ServiceAccount token the proxy proves its identity with.
    #[arg(
        long,
        env = "STRAIT_TOKEN_AUDIENCE",
        default_value = "identity.strait.io"
    )]
    pub token_audience: String,
    /// CNI mode: the `strait-cni` plugin (installed by `strait install --cni`) writes each
    /// injected pod's redirection rules, so pods get no `strait-init` container with
    /// NET_ADMIN/NET_RAW and pass PodSecurity `restricted`.
    #[arg(long, env = "STRAIT_CNI")]
    pub cni: bool,
    /// Default sidecar mode; the pod annotation `strait.io/sidecar-mode` overrides it.
    #[arg(long, env = "STRAIT_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    /// Default proxy CPU request (annotation `strait.io/proxy-cpu-request`).
    #[arg(long, env = "STRAIT_PROXY_CPU_REQUEST", default_value = "50m")]
    pub proxy_cpu_request: String,
    /// Default proxy CPU limit (annotation `strait.io/proxy-cpu-limit`).
    #[arg(long, env = "STRAIT_PROXY_CPU_LIMIT", default_value = "1")]
    pub proxy_cpu_limit: String,
    /// Default proxy memory request (annotation `strait.io/proxy-memory-request`).
    #[arg(long, env = "STRAIT_PROXY_MEMORY_REQUEST", default_value = "32Mi")]
    pub proxy_memory_request: String,
    /// Default proxy memory limit (annotation `strait.io/proxy-memory-limit`).
    #[arg(long, env = "STRAIT_PROXY_MEMORY_LIMIT", default_value = "128Mi")]
    pub proxy_memory_limit: String,
    /// OpenTelemetry collector every proxy sends spans to (OTLP/gRPC, `http://host:4317`).
    /// Unset: no tracing.
    #[arg(long, env = "STRAIT_PROXY_TRACE_COLLECTOR", value_parser = parse_collector)]
    pub trace_collector: Option<String>,
    /// Default share of requests without a parent's decision that start a trace (annotation
    /// `strait.io/trace-sample-ratio`).
    #[arg(long, env = "STRAIT_PROXY_TRACE_SAMPLE_RATIO", default_value = "0.01", value_parser = parse_ratio)]
    pub trace_sample_ratio: String,
    /// Default access log, `off` or `json` (annotation `strait.io/access-log`).
    #[arg(long, env = "STRAIT_PROXY_ACCESS_LOG", default_value = "off", value_parser = ["off", "json"])]
    pub access_log: String,
}

/// A collector URL the proxy accepts: `http://host:port`.
fn parse_collector(s: &str) -> Result<String, String> {
    match s.parse::<hyper::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not a URL like http://collector:4317 (OTLP/gRPC, plaintext)"
        )),
    }
}

fn parse_ratio(s: &str) -> Result<String, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/strait-mesh/strait:", env!("CARGO_PKG_VERSION"));

impl InjectConfig {
    /// The defaults, as the flags would give them.
    pub fn defaults() -> Self {
        Self {
            proxy_image: DEFAULT_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            proxy_uid: 2102,
            control_plane_addr: "strait-control-plane.strait-system.svc.cluster.local:8086".into(),
            identity_addr: "strait-identity.strait-system.svc.cluster.local:8080".into(),
            identity_server_name: "identity.strait-system.svc.cluster.local".into(),
            trust_domain: "cluster.local".into(),
            trust_anchors: None,
            token_audience: "identity.strait.io".into(),
            cni: false,
            sidecar_mode: SidecarMode::Native,
            proxy_cpu_request: "50m".into(),
            proxy_cpu_limit: "1".into(),
            proxy_memory_request: "32Mi".into(),
            proxy_memory_limit: "128Mi".into(),
            trace_collector: None,
            trace_sample_ratio: "0.01".into(),
            access_log: "off".into(),
        }
    }

    /// The trust anchors' PEM, when configured.
    pub fn read_anchors(&self) -> Result<Option<String>, crate::inject::InjectError> {
        let Some(path) = &self.trust_anchors else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(pem) if pem.contains("BEGIN CERTIFICATE") => Ok(Some(pem)),
            Ok(_) => Err(crate::inject::InjectError::Anchors {
                path: path.clone(),
                message: "no CERTIFICATE block".into(),
            }),
            Err(e) => Err(crate::inject::InjectError::Anchors {
                path: path.clone(),
                message: e.to_string(),
            }),
        }
    }
}
