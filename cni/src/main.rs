//! `strait-cni`: run by the container runtime as a chained CNI plugin (`CNI_COMMAND` in the
//! environment, the network configuration on stdin), or `strait-cni install` in the DaemonSet
//! that puts it on each node.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;
use strait_cni::{cni_args, decide, in_netns, rules_present, CniError, Decision, NetConf};

mod install;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("install") {
        return match install::run(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("strait-cni install: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".to_string());
    match run(&command, &stdin) {
        Ok(Some(out)) => {
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stdout(), "{}", e.to_json(&version));
            log(&format!("{command} failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The runtime keeps stdout for results: diagnostics go to stderr (the runtime's log).
fn log(line: &str) {
    eprintln!("strait-cni: {line}");
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(7, format!("{name} is not set"), "the runtime must set it"))
}

fn run(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        return Ok(Some(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": strait_cni::SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    let args = cni_args(&std::env::var("CNI_ARGS").unwrap_or_default());
    let namespace = args.get("K8S_POD_NAMESPACE").map(String::as_str);
    let pod = args.get("K8S_POD_NAME").map(String::as_str).unwrap_or("?");
    // A chained plugin hands the previous result on unchanged.
    let result = conf.prev_result.clone().unwrap_or_else(
        || serde_json::json!({"cniVersion": conf.cni_version, "interfaces": [], "ips": []}),
    );
    match command {
        "ADD" => {
            let netns = PathBuf::from(env("CNI_NETNS")?);
            match decide(&conf.strait, namespace, conf.pod_annotations().as_ref()) {
                Decision::Skip(why) => log(&format!(
                    "{}/{pod}: no redirection ({why})",
                    namespace.unwrap_or("?")
                )),
                Decision::Redirect => {
                    let cfg = conf.init_config(false)?;
                    in_netns(&netns, || strait_proxy::init::apply(&cfg))?.map_err(|e| {
                        CniError::new(
                            100,
                            "cannot write the pod's redirection rules",
                            e.to_string(),
                        )
                    })?;
                    log(&format!(
                        "{}/{pod}: traffic redirected to the proxy (inbound {}, outbound {})",
                        namespace.unwrap_or("?"),
                        cfg.inbound_port,
                        cfg.outbound_port
                    ));
                }
            }
            Ok(Some(result))
        }
        "DEL" => {
            // The namespace may be gone already (then so are its rules): never an error.
            let netns = std::env::var("CNI_NETNS").unwrap_or_default();
            if !netns.is_empty() && Path::new(&netns).exists() {
                let cfg = conf.init_config(true)?;
                if let Ok(Err(e)) = in_netns(Path::new(&netns), || strait_proxy::init::apply(&cfg))
                {
                    log(&format!("{pod}: removing rules: {e}"));
                }
            }
            Ok(None)
        }
        "CHECK" => {
            let netns = PathBuf::from(env("CNI_NETNS")?);
            if decide(&conf.strait, namespace, conf.pod_annotations().as_ref())
                == Decision::Redirect
                && !in_netns(&netns, rules_present)?
            {
                return Err(CniError::new(
                    100,
                    "the pod's redirection rules are missing",
                    format!("no STRAIT_OUTBOUND chain in {}", netns.display()),
                ));
            }
            Ok(None)
        }
        other => Err(CniError::new(
            4,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    }
}
