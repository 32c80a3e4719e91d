//! `strait-cni`: a chained CNI plugin (CNI spec 1.0) that writes a meshed pod's
//! traffic-redirection rules inside its network namespace when the runtime creates it, so an
//! injected pod needs no init container with `NET_ADMIN`/`NET_RAW` (PodSecurity `restricted`).
//!
//! ```text
//! kubelet -> runtime -> cluster CNI (bridge, calico, ...) -> strait-cni (chained, last)
//!                                                            ADD:   pod injected? -> iptables in CNI_NETNS
//!                                                            DEL:   remove them (best effort)
//!                                                            CHECK: are they there?
//! ```
//!
//! Which pods: those the injector marked (`strait.io/injected: "true"`), read from the pod
//! annotations the runtime passes (`runtimeConfig["io.kubernetes.cri.pod-annotations"]`, the
//! capability the installed configuration declares). A pod whose annotations are not passed is
//! left alone unless the configuration says `"unknownPods": "redirect"`; namespaces in
//! `excludeNamespaces` are always left alone.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use strait_proxy::config::PortList;
use strait_proxy::init::InitConfig;

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The annotation the injector sets on pods it gave a sidecar.
pub const INJECTED: &str = "strait.io/injected";
/// The runtimeConfig capability carrying pod annotations (containerd, CRI-O).
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A CNI error: its code and message go to stdout as the spec's error object.
#[derive(Debug, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// 1: incompatible version, 4: invalid configuration, 7: invalid environment, 11: try again
    /// later, 100+: plugin-specific.
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The plugin's own settings, in its entry of the network configuration list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Settings {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub skip_outbound_cidrs: String,
    pub exclude_namespaces: Vec<String>,
    /// `skip` (default) or `redirect`: pods whose annotations the runtime did not pass.
    pub unknown_pods: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            skip_inbound_ports: "4190,4191".into(),
            skip_outbound_ports: String::new(),
            skip_outbound_cidrs: String::new(),
            exclude_namespaces: vec!["kube-system".into(), "strait-system".into()],
            unknown_pods: "skip".into(),
        }
    }
}

/// The network configuration the runtime gives on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: BTreeMap<String, Value>,
    #[serde(default)]
    pub strait: Settings,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                4,
                "the network configuration on stdin is not valid",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                1,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// The pod's annotations, when the runtime passed them.
    pub fn pod_annotations(&self) -> Option<BTreeMap<String, String>> {
        let value = self.runtime_config.get(ANNOTATIONS_CAPABILITY)?;
        serde_json::from_value(value.clone()).ok()
    }

    /// The iptables settings for a pod.
    pub fn init_config(&self, cleanup: bool) -> Result<InitConfig, CniError> {
        let s = &self.strait;
        let ports = |v: &str, field: &str| {
            PortList::parse(v)
                .map_err(|e| CniError::new(4, format!("strait.{field} is invalid"), e))
        };
        Ok(InitConfig {
            proxy_uid: s.proxy_uid,
            inbound_port: s.inbound_port,
            outbound_port: s.outbound_port,
            skip_inbound_ports: ports(&s.skip_inbound_ports, "skipInboundPorts")?,
            skip_outbound_ports: ports(&s.skip_outbound_ports, "skipOutboundPorts")?,
            skip_outbound_cidrs: strait_proxy::init::parse_cidrs(&s.skip_outbound_cidrs)
                .map_err(|e| CniError::new(4, "strait.skipOutboundCidrs is invalid", e))?,
            ipv6: true,
            cleanup,
            dry_run: false,
        })
    }
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..` from `CNI_ARGS`.
pub fn cni_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Why a pod gets (or does not get) the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Redirect,
    Skip(&'static str),
}

/// Whether the pod in `namespace` with `annotations` (if the runtime passed them) is meshed.
pub fn decide(
    settings: &Settings,
    namespace: Option<&str>,
    annotations: Option<&BTreeMap<String, String>>,
) -> Decision {
    if namespace.is_some_and(|ns| settings.exclude_namespaces.iter().any(|e| e == ns)) {
        return Decision::Skip("namespace excluded");
    }
    match annotations {
        Some(a) if a.get(INJECTED).map(String::as_str) == Some("true") => Decision::Redirect,
        Some(_) => Decision::Skip("pod not injected"),
        None if settings.unknown_pods == "redirect" => Decision::Redirect,
        None => Decision::Skip("the runtime passed no pod annotations"),
    }
}

/// Runs `f` with the calling thread inside the network namespace at `netns` (commands it
/// spawns are created there too), on a thread of its own so the process's other threads are
/// untouched.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, CniError> {
    let file = std::fs::File::open(netns).map_err(|e| {
        CniError::new(
            7,
            format!("cannot open the network namespace {}", netns.display()),
            e.to_string(),
        )
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    CniError::new(
                        7,
                        format!("cannot enter the network namespace {}", netns.display()),
                        e.to_string(),
                    )
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(CniError::new(100, "the plugin thread panicked", "")))
    })
}

/// True when Strait's chains are in the current network namespace.
pub fn rules_present() -> bool {
    std::process::Command::new("iptables")
        .args(["-t", "nat", "-S", "STRAIT_OUTBOUND"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_chained_configuration_with_a_previous_result() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"strait-cni",
                "strait":{"skipOutboundPorts":"25","excludeNamespaces":["ops"]},
                "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"strait.io/injected":"true"}},
                "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24"}]}}"#,
        )
        .expect("valid");
        assert_eq!(conf.strait.exclude_namespaces, ["ops"]);
        assert_eq!(conf.strait.proxy_uid, 2102, "defaults fill the rest");
        assert!(conf.prev_result.is_some());
        let cfg = conf.init_config(false).expect("init config");
        assert!(cfg.skip_outbound_ports.contains(25));
        assert_eq!(
            decide(&conf.strait, Some("shop"), conf.pod_annotations().as_ref()),
            Decision::Redirect
        );
    }

    #[test]
    fn refuses_bad_versions_and_bad_settings_with_spec_codes() {
        let e = NetConf::parse(br#"{"cniVersion":"0.1.0"}"#).expect_err("old");
        assert_eq!(e.code, 1);
        let e = NetConf::parse(b"not json").expect_err("junk");
        assert_eq!(e.code, 4);
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","strait":{"skipOutboundPorts":"http"}}"#)
                .expect("parses");
        assert_eq!(conf.init_config(false).expect_err("bad port").code, 4);
        let json = e.to_json("1.0.0");
        assert_eq!(json["code"], 4);
        assert!(json["msg"].as_str().unwrap_or("").contains("not valid"));
    }

    #[test]
    fn only_injected_pods_outside_excluded_namespaces_are_redirected() {
        let s = Settings::default();
        let injected: BTreeMap<String, String> =
            [(INJECTED.to_string(), "true".to_string())].into();
        let plain: BTreeMap<String, String> = BTreeMap::new();
        assert_eq!(
            decide(&s, Some("shop"), Some(&injected)),
            Decision::Redirect
        );
        assert_eq!(
            decide(&s, Some("shop"), Some(&plain)),
            Decision::Skip("pod not injected")
        );
        assert_eq!(
            decide(&s, Some("kube-system"), Some(&injected)),
            Decision::Skip("namespace excluded")
        );
        assert!(matches!(decide(&s, Some("shop"), None), Decision::Skip(_)));
        let redirect_unknown = Settings {
            unknown_pods: "redirect".into(),
            ..Settings::default()
        };
        assert_eq!(
            decide(&redirect_unknown, Some("shop"), None),
            Decision::Redirect
        );
        assert_eq!(
            cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
                .get("K8S_POD_NAME")
                .map(String::as_str),
            Some("web-1")
        );
    }
}
