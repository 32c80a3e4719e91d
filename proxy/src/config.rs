//! Typed proxy configuration, from flags or `STRAIT_*` environment variables. A bad value is
//! rejected at start with the flag, the variable and the value named.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// Linkerd's default opaque ports: server-speaks-first protocols that detection would stall.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";

/// Settings of `strait-proxy run`.
#[derive(Debug, Clone, Args)]
pub struct ProxyConfig {
    /// Listener for the pod's outbound traffic (redirected by iptables).
    #[arg(long, env = "STRAIT_OUTBOUND_ADDR", default_value = "0.0.0.0:4140")]
    pub outbound_addr: SocketAddr,
    /// Listener for the pod's inbound traffic (redirected by iptables).
    #[arg(long, env = "STRAIT_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,
    /// Admin server: /live, /ready, /metrics, POST /shutdown (loopback only).
    #[arg(long, env = "STRAIT_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    pub admin_addr: SocketAddr,
    /// Discovery server, `host:port` or `http://host:port`. Unset: every destination is passed
    /// through to its original address.
    #[arg(long, env = "STRAIT_CONTROL_PLANE_ADDR")]
    pub control_plane_addr: Option<String>,
    /// How long a client may stay silent before the proxy opens the upstream connection
    /// speculatively, to hear a server that speaks first (MySQL, SMTP, ...).
    #[arg(long, env = "STRAIT_SERVER_FIRST_WAIT", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub server_first_wait: Duration,
    /// How long a speculative upstream connection waits for the server to speak first; after
    /// it (nobody spoke) it is closed and the connection waits for the client's first bytes.
    #[arg(long, env = "STRAIT_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// How long a connection on which neither side has sent a byte is kept open.
    #[arg(long, env = "STRAIT_DETECT_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub detect_idle_timeout: Duration,
    /// How long the proxy remembers that a destination speaks first (no detection) or that
    /// its client does (no speculative connection); 0 remembers nothing.
    #[arg(long, env = "STRAIT_PROTOCOL_MEMORY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub protocol_memory: Duration,
    /// How long a client may take to send a request's headers (the request line included,
    /// during detection): a slower one is cut (slowloris). Also each HTTP/1 request's headers.
    #[arg(long, env = "STRAIT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Most headers a request may have; past it the proxy answers 431 naming this setting.
    #[arg(long, env = "STRAIT_MAX_REQUEST_HEADERS", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_request_headers: u16,
    /// Most headers an upstream's response may have; past it the proxy answers 502.
    #[arg(long, env = "STRAIT_MAX_RESPONSE_HEADERS", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_response_headers: u16,
    /// Largest header section (request or response: names, values, 4 bytes each), in bytes.
    #[arg(long, env = "STRAIT_MAX_HEADER_BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1024..=4_194_304))]
    pub max_header_bytes: u32,
    /// How long a mesh (mTLS) connection may live: pooled connections to peers are made again
    /// after it, inbound ones are closed gracefully, so that none outlives the certificates
    /// and anchors it was verified with. Keep it under 30% of the certificate lifetime.
    #[arg(long, env = "STRAIT_MAX_CONNECTION_AGE", default_value = "6h", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// Ports that carry opaque TCP: no protocol detection (comma-separated, ranges `a-b`).
    #[arg(long, env = "STRAIT_OPAQUE_PORTS", default_value = DEFAULT_OPAQUE_PORTS, value_parser = PortList::parse)]
    pub opaque_ports: PortList,
    /// Timeout of a TCP connect to an endpoint or the application.
    #[arg(long, env = "STRAIT_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// How long an idle HTTP/1 connection to the application (or to a destination outside
    /// the mesh) is kept for reuse. Keep it under the server's own keep-alive timeout
    /// (Node.js: 5s), so that the proxy never sends a request on a connection the server is
    /// closing.
    #[arg(long, env = "STRAIT_HTTP1_POOL_IDLE_TIMEOUT", default_value = "3s", value_parser = parse_pool_idle_timeout)]
    pub http1_pool_idle_timeout: Duration,
    /// How long a new destination waits for its first discovery answer before passing through.
    #[arg(long, env = "STRAIT_DISCOVERY_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub discovery_timeout: Duration,
    /// On SIGTERM or /shutdown: how long in-flight connections may take to finish.
    #[arg(long, env = "STRAIT_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace_period: Duration,
    /// Runtime worker threads (1 = a single-threaded runtime, the sidecar default).
    #[arg(long, env = "STRAIT_THREADS", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// This workload, `<namespace>/<pod>`, for logs and the control plane.
    #[arg(long, env = "STRAIT_WORKLOAD", default_value = "")]
    pub workload: String,
    /// Identity API (TLS), `host:port`. Set: mTLS between proxies. Needs --trust-anchors,
    /// --identity-token-file and --identity.
    #[arg(long, env = "STRAIT_IDENTITY_ADDR", requires_all = ["identity_token_file", "identity"])]
    pub identity_addr: Option<String>,
    /// SPIFFE ID the control plane's discovery server must present (mTLS, when this proxy
    /// has an identity). Default: `spiffe://<trust-domain>/ns/strait-system/sa/strait-control-plane`.
    #[arg(long, env = "STRAIT_CONTROL_PLANE_IDENTITY", value_parser = parse_spiffe_id)]
    pub control_plane_identity: Option<strait_identity::SpiffeId>,
    /// DNS name the identity server's certificate must have (also the SNI of the discovery
    /// connection).
    #[arg(
        long,
        env = "STRAIT_IDENTITY_SERVER_NAME",
        default_value = "identity.strait-system.svc.cluster.local"
    )]
    pub identity_server_name: String,
    /// PEM bundle of trust anchors (re-read when it changes).
    #[arg(
        long,
        env = "STRAIT_TRUST_ANCHORS",
        conflicts_with = "trust_anchors_pem"
    )]
    pub trust_anchors: Option<std::path::PathBuf>,
    /// The trust anchors themselves, PEM (what the injector sets in Kubernetes).
    #[arg(long, env = "STRAIT_TRUST_ANCHORS_PEM", hide_env_values = true)]
    pub trust_anchors_pem: Option<String>,
    /// File holding this workload's ServiceAccount token (re-read at every renewal).
    #[arg(long, env = "STRAIT_IDENTITY_TOKEN_FILE")]
    pub identity_token_file: Option<std::path::PathBuf>,
    /// This workload's SPIFFE ID, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, env = "STRAIT_IDENTITY", value_parser = parse_spiffe_id)]
    pub identity: Option<strait_identity::SpiffeId>,
    /// Inbound mode of the workload: `permissive` also accepts plaintext from clients outside
    /// the mesh; `strict` accepts only mTLS from the mesh.
    #[arg(long, env = "STRAIT_INBOUND_MODE", value_enum, default_value_t = InboundMode::Permissive)]
    pub inbound_mode: InboundMode,
    /// Ports that are strict whatever the workload's mode.
    #[arg(long, env = "STRAIT_INBOUND_STRICT_PORTS", default_value = "", value_parser = PortList::parse)]
    pub inbound_strict_ports: PortList,
    /// Retry budget: retries may add at most this share of requests (0.2 = 20%)...
    #[arg(long, env = "STRAIT_RETRY_BUDGET_RATIO", default_value_t = 0.2, value_parser = parse_ratio)]
    pub retry_budget_ratio: f32,
    /// ... plus this many retries per second...
    #[arg(long, env = "STRAIT_RETRY_BUDGET_MIN_PER_SECOND", default_value_t = 10)]
    pub retry_budget_min_per_second: u32,
    /// ... over this window (1s to 60s).
    #[arg(long, env = "STRAIT_RETRY_BUDGET_WINDOW", default_value = "10s", value_parser = parse_window)]
    pub retry_budget_window: Duration,
    /// Consecutive failures (connect errors, 5xx) that eject an endpoint; 0 disables ejection.
    #[arg(long, env = "STRAIT_EJECT_AFTER", default_value_t = 7)]
    pub eject_after: u32,
    /// Ports that are permissive whatever the workload's mode.
    #[arg(long, env = "STRAIT_INBOUND_PERMISSIVE_PORTS", default_value = "", value_parser = PortList::parse)]
    pub inbound_permissive_ports: PortList,
    /// OpenTelemetry collector for spans, OTLP/gRPC in plaintext (`http://host:4317`; a
    /// collector next to the node, or a local agent). Unset: no tracing.
    #[arg(long, env = "STRAIT_TRACE_COLLECTOR", value_parser = parse_collector)]
    pub trace_collector: Option<String>,
    /// Share of requests without a sampling decision that start a trace (0 to 1). Requests
    /// carrying a parent (`traceparent`, B3) follow the parent's decision.
    #[arg(long, env = "STRAIT_TRACE_SAMPLE_RATIO", default_value_t = 0.01, value_parser = parse_probability)]
    pub trace_sample_ratio: f64,
    /// Spans held for export at most; beyond, spans are dropped and counted.
    #[arg(long, env = "STRAIT_TRACE_QUEUE_SIZE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub trace_queue_size: u32,
    /// The workload's name in traces (`service.name`); unset: `<pod>.<namespace>` from
    /// `--workload` (the injector sets `<deployment or other owner>.<namespace>`), so each
    /// workload is its own node of a service graph.
    #[arg(long, env = "STRAIT_TRACE_SERVICE_NAME", default_value = "")]
    pub trace_service_name: String,
    /// The application's kubelet probes, which the admin server answers on
    /// `/app-health/<container>/<kind>`: JSON `{"<container>/<kind>": {"kind": "http" | "tcp",
    /// "port": 8080, "path": "/healthz", ...}}` (the injector writes it).
    #[arg(long, env = "STRAIT_APP_PROBES", default_value = "", value_parser = crate::app_probe::parse, hide_env_values = true)]
    pub app_probes: std::collections::BTreeMap<String, crate::app_probe::AppProbe>,
    /// The pod's IP: where application probes connect unless they name a host. Unset or empty
    /// (the downward API before the pod has an IP): loopback.
    #[arg(long, env = "STRAIT_POD_IP", default_value = "", value_parser = parse_pod_ip)]
    pub pod_ip: PodIp,
    /// Access log: `off`, or `json` for one JSON line per request on stdout.
    #[arg(long, env = "STRAIT_ACCESS_LOG", value_enum, default_value_t = AccessLogFormat::Off)]
    pub access_log: AccessLogFormat,
    /// Query parameters whose values the access log and spans write as `REDACTED`
    /// (comma-separated names, any case; empty: none).
    #[arg(long, env = "STRAIT_ACCESS_LOG_REDACT", default_value = crate::telemetry::redact::DEFAULT, value_parser = crate::telemetry::redact::Redact::parse)]
    pub access_log_redact: crate::telemetry::redact::Redact,
    /// This pod's default inbound policy for ports no AuthorizationPolicy selects
    /// (`all-unauthenticated`, `all-authenticated`, `cluster-authenticated`, `deny`); wins over
    /// the namespace's and the cluster's, which the control plane sends. The injector sets it
    /// from the pod annotation `strait.io/default-inbound-policy`.
    #[arg(long, env = "STRAIT_DEFAULT_INBOUND_POLICY", value_parser = crate::policy::parse_default)]
    pub default_inbound_policy: Option<strait_api::discovery::DefaultPolicy>,
    /// Networks of the cluster's pods and services. A destination inside them that discovery
    /// has not answered for is refused rather than sent in plaintext (it may be a meshed pod);
    /// outside them it is passed through.
    #[arg(
        long,
        env = "STRAIT_CLUSTER_NETWORKS",
        default_value = DEFAULT_CLUSTER_NETWORKS,
        value_parser = Networks::parse
    )]
    pub cluster_networks: Networks,
}

/// Linkerd's default `clusterNetworks`: the private ranges pods and services live in.
pub const DEFAULT_CLUSTER_NETWORKS: &str =
    "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8";

/// A list of CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<(std::net::IpAddr, u8)>);

impl Networks {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (ip, len) = item
                .split_once('/')
                .ok_or_else(|| format!("{item:?} is not a CIDR like 10.0.0.0/8"))?;
            let ip: std::net::IpAddr = ip
                .parse()
                .map_err(|_| format!("{item:?}: {ip:?} is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{item:?}: the prefix length must be 0 to {max}"))?;
            out.push((ip, len));
        }
        Ok(Self(out))
    }

    /// Whether `ip` is inside one of the networks.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|(net, len)| match (net, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }
}

/// `--pod-ip`: an IP, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIp(pub Option<std::net::IpAddr>);

fn parse_pod_ip(s: &str) -> Result<PodIp, String> {
    if s.trim().is_empty() {
        return Ok(PodIp(None));
    }
    s.trim()
        .parse()
        .map(|ip| PodIp(Some(ip)))
        .map_err(|_| format!("{s:?} is not an IP address"))
}

/// The access log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    Off,
    Json,
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a probability between 0 and 1 (0.01 = 1%)"
        )),
    }
}

fn parse_collector(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL like http://collector:4317: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not a URL like http://collector:4317 (OTLP/gRPC in plaintext: scheme http, and a host)"
        )),
    }
}

fn parse_pool_idle_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
        return Err(format!("{s}: must be between 100ms and 10m"));
    }
    Ok(d)
}

fn parse_ratio(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(r) if (0.0..=10.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 10 (0.2 = 20%)")),
    }
}

fn parse_window(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(60) => Ok(d),
        _ => Err(format!("{s:?} is not a duration between 1s and 60s")),
    }
}

fn parse_spiffe_id(s: &str) -> Result<strait_identity::SpiffeId, String> {
    s.parse()
        .map_err(|e: strait_identity::SpiffeIdError| e.to_string())
}

/// Whether an inbound port accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMode {
    Permissive,
    Strict,
}

impl ProxyConfig {
    /// `service.name` of this proxy's spans.
    pub fn service_name(&self) -> String {
        if !self.trace_service_name.is_empty() {
            return self.trace_service_name.clone();
        }
        match self.workload.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() => format!("{pod}.{ns}"),
            _ => "strait-proxy".to_string(),
        }
    }

    /// How HTTP connections are served: the header-read timeout and the header limits.
    pub fn serve_settings(&self) -> crate::http::server::ServeSettings {
        crate::http::server::ServeSettings {
            header_read_timeout: self.header_read_timeout,
            limits: crate::http::limits::Limits {
                max_request_headers: usize::from(self.max_request_headers),
                max_response_headers: usize::from(self.max_response_headers),
                max_header_bytes: self.max_header_bytes as usize,
            },
        }
    }

    pub fn retry_budget(&self) -> crate::retry::BudgetSettings {
        crate::retry::BudgetSettings {
            ratio: self.retry_budget_ratio,
            min_per_second: self.retry_budget_min_per_second,
            window: self.retry_budget_window,
        }
    }

    /// Whether plaintext is refused on inbound `port`.
    pub fn is_strict(&self, port: u16) -> bool {
        if self.inbound_strict_ports.contains(port) {
            return true;
        }
        if self.inbound_permissive_ports.contains(port) {
            return false;
        }
        self.inbound_mode == InboundMode::Strict
    }
}

/// A set of TCP ports, parsed from `"25,587,4444-4450"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(Vec<u16>);

impl PortList {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut ports = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || format!("{item:?} is not a port (1-65535) or a range a-b");
            match item.split_once('-') {
                Some((a, b)) => {
                    let a: u16 = a.trim().parse().map_err(|_| bad())?;
                    let b: u16 = b.trim().parse().map_err(|_| bad())?;
                    if a == 0 || a > b {
                        return Err(bad());
                    }
                    ports.extend(a..=b);
                }
                None => {
                    let p: u16 = item.parse().map_err(|_| bad())?;
                    if p == 0 {
                        return Err(bad());
                    }
                    ports.push(p);
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        Ok(Self(ports))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }

    pub fn ports(&self) -> &[u16] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `strait-proxy run`'s settings parsed from `args`.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("p").chain(args.iter().copied()))
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: ProxyConfig,
    }

    #[test]
    fn port_lists() {
        let l = PortList::parse(" 6379, 25 ,4444-4446").expect("valid");
        assert_eq!(l.ports(), [25, 4444, 4445, 4446, 6379]);
        assert!(l.contains(4445) && !l.contains(80));
        assert!(PortList::parse("")
            .expect("empty is fine")
            .ports()
            .is_empty());
        for bad in ["x", "0", "70000", "9-1", "1-"] {
            let err = PortList::parse(bad).expect_err(bad);
            assert!(err.contains(bad.split('-').next().unwrap_or(bad)), "{err}");
        }
    }

    #[test]
    fn telemetry_settings_are_checked_and_errors_name_them() {
        let ok = parse(&[
            "--trace-collector",
            "http://10.88.0.1:4317",
            "--trace-sample-ratio",
            "0.5",
            "--access-log",
            "json",
        ])
        .expect("valid");
        assert_eq!(ok.cfg.trace_sample_ratio, 0.5);
        assert_eq!(ok.cfg.access_log, AccessLogFormat::Json);
        for (flag, bad) in [
            ("--trace-collector", "10.88.0.1:4317"),
            ("--trace-collector", "ftp://x:1"),
            ("--trace-collector", "https://x:1"),
            ("--trace-sample-ratio", "1.5"),
            ("--access-log", "xml"),
        ] {
            let err = parse(&[flag, bad]).err().expect(bad).to_string();
            assert!(err.contains(flag) && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_http1_pool_idle_timeout_is_short_by_default_and_checked() {
        // Under Node.js's keep-alive timeout (5s), like linkerd2-proxy's 3s.
        let cfg = parse(&[]).expect("defaults").cfg;
        assert_eq!(cfg.http1_pool_idle_timeout, Duration::from_secs(3));
        let cfg = parse(&["--http1-pool-idle-timeout", "500ms"])
            .expect("valid")
            .cfg;
        assert_eq!(cfg.http1_pool_idle_timeout, Duration::from_millis(500));
        for bad in ["0s", "20m", "soon"] {
            let err = parse(&["--http1-pool-idle-timeout", bad])
                .err()
                .expect(bad)
                .to_string();
            assert!(
                err.contains("--http1-pool-idle-timeout") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn probe_settings_are_checked_and_an_empty_pod_ip_is_unset() {
        let cfg = parse(&[]).expect("defaults").cfg;
        assert_eq!(cfg.pod_ip, PodIp(None));
        assert!(cfg.app_probes.is_empty());
        assert_eq!(
            parse(&["--pod-ip", ""]).expect("empty").cfg.pod_ip,
            PodIp(None)
        );
        let cfg = parse(&[
            "--pod-ip",
            "10.88.0.7",
            "--app-probes",
            r#"{"app/readiness": {"kind": "tcp", "port": 8080}}"#,
        ])
        .expect("valid")
        .cfg;
        assert_eq!(cfg.pod_ip, PodIp(Some([10, 88, 0, 7].into())));
        assert_eq!(cfg.app_probes.len(), 1);
        for (flag, bad) in [("--pod-ip", "10.88.0"), ("--app-probes", "{\"app\": 1}")] {
            let err = parse(&[flag, bad]).err().expect(bad).to_string();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn cluster_networks_parse_and_match() {
        let n = Networks::parse(DEFAULT_CLUSTER_NETWORKS).expect("default parses");
        for inside in [
            "10.96.0.10",
            "10.88.0.5",
            "192.168.1.1",
            "fd00::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(n.contains(inside.parse().expect("ip")), "{inside}");
        }
        for outside in ["8.8.8.8", "127.0.0.1", "2001:db8::1", "11.0.0.1"] {
            assert!(!n.contains(outside.parse().expect("ip")), "{outside}");
        }
        assert!(Networks::parse("").expect("empty").0.is_empty());
        assert!(Networks::parse("10.0.0.0/33").is_err());
        assert!(Networks::parse("10.0.0.0").is_err());
        assert!(Networks::parse("0.0.0.0/0")
            .expect("all")
            .contains("1.2.3.4".parse().expect("ip")));
    }
}
