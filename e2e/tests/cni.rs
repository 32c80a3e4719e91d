//! The CNI plugin, called as a container runtime calls it (`CNI_COMMAND`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS` in the environment, the configuration with `prevResult` on stdin),
//! on a network namespace the test created: ADD redirects an injected pod's traffic to a
//! running proxy with no init container, CHECK sees the rules, DEL removes them.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use strait_e2e::{metric, Mesh};
use strait_testbed::{Pod, SidecarOpts};

/// Runs the plugin; returns (success, stdout as JSON or Null).
fn cni(command: &str, pod: &Pod, name: &str, conf: &Value) -> anyhow::Result<(bool, Value)> {
    let bin = strait_testbed::bin("strait-cni")?;
    let mut child = Command::new(bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{name}"))
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.ns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .map(|mut s| s.write_all(conf.to_string().as_bytes()))
        .transpose()?;
    let out = child.wait_with_output()?;
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    eprintln!(
        "strait-cni {command} {name}: {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((out.status.success(), json))
}

fn conf(pod: &Pod, injected: bool) -> Value {
    let annotations = if injected {
        json!({"strait.io/injected": "true"})
    } else {
        json!({"other": "x"})
    };
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "strait-cni",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": format!("/var/run/netns/{}", pod.ns)}],
            "ips": [{"address": format!("{}/24", pod.ip), "interface": 0}],
        },
    })
}

fn nat_rules(mesh: &Mesh, pod: &Pod) -> anyhow::Result<String> {
    mesh.net.exec(pod, &["iptables", "-t", "nat", "-S"])
}

#[test]
fn add_redirects_an_injected_pod_to_its_proxy_and_del_removes_the_rules() -> anyhow::Result<()> {
    let mesh = Mesh::new("cni")?;
    let server = mesh.meshed_pod("server")?;
    mesh.serve_web(&server)?;
    let client = mesh.net.pod("client")?;

    let (ok, version) = cni(
        "VERSION",
        &client,
        "client",
        &json!({"cniVersion": "1.0.0"}),
    )?;
    assert!(ok);
    assert!(version["supportedVersions"]
        .as_array()
        .is_some_and(|v| v.contains(&json!("1.0.0"))));

    // ADD, as the runtime calls it after the cluster's own plugin: the previous result comes
    // back unchanged and the rules are in the pod's namespace.
    let add = conf(&client, true);
    let (ok, result) = cni("ADD", &client, "client", &add)?;
    assert!(ok, "{result}");
    assert_eq!(
        result, add["prevResult"],
        "a chained plugin passes the result on"
    );
    let rules = nat_rules(&mesh, &client)?;
    assert!(
        rules.contains("STRAIT_OUTBOUND") && rules.contains("--to-ports 4140"),
        "{rules}"
    );
    // The proxy starts without an init container of its own; the app's traffic goes through it.
    mesh.net.start_sidecar(
        &client,
        &SidecarOpts {
            skip_init: true,
            ..Default::default()
        },
    )?;
    let out = mesh.curl(&client, &["http://10.96.0.10/"])?;
    assert!(out.contains("hello from server"), "{out}");
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(
            &m,
            "strait_request_total",
            &[
                "direction=\"outbound\"",
                "target=\"web.default.svc.cluster.local:80\""
            ]
        ),
        Some(1.0),
        "the request went through the client's proxy: {m}"
    );
    let (ok, _) = cni("CHECK", &client, "client", &add)?;
    assert!(ok, "CHECK finds the rules");

    // DEL removes them; CHECK then fails with the plugin's error object.
    let (ok, _) = cni("DEL", &client, "client", &add)?;
    assert!(ok);
    let rules = nat_rules(&mesh, &client)?;
    assert!(!rules.contains("STRAIT"), "{rules}");
    let (ok, error) = cni("CHECK", &client, "client", &add)?;
    assert!(!ok);
    assert_eq!(error["code"], 100, "{error}");
    // DEL of a namespace that is gone is not an error.
    let gone = Pod {
        ns: "strait-cni-no-such-netns".into(),
        ..client.clone()
    };
    assert!(cni("DEL", &gone, "gone", &add)?.0);

    // A pod the injector did not mark keeps its traffic to itself.
    let plain = mesh.net.pod("plain")?;
    let (ok, result) = cni("ADD", &plain, "plain", &conf(&plain, false))?;
    assert!(ok, "{result}");
    let rules = nat_rules(&mesh, &plain)?;
    assert!(!rules.contains("STRAIT"), "{rules}");
    Ok(())
}
