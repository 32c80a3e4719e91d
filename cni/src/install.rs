//! `strait-cni install`: what the DaemonSet runs on each node. Copies the plugin into the CNI
//! binary directory and chains it last in the node's network configuration list (the first
//! `*.conflist` by name, which is the one the runtime uses), then keeps it there (the cluster's
//! CNI may rewrite its file). `--uninstall` takes the entry out again; `--once` does one pass.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

const USAGE: &str = "usage: strait-cni install [--bin-dir DIR] [--conf-dir DIR] [--settings JSON] [--once] [--uninstall]";

struct Options {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    settings: Option<Value>,
    once: bool,
    uninstall: bool,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: "/host/opt/cni/bin".into(),
        conf_dir: "/host/etc/cni/net.d".into(),
        settings: None,
        once: false,
        uninstall: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--bin-dir" => o.bin_dir = value("--bin-dir")?.into(),
            "--conf-dir" => o.conf_dir = value("--conf-dir")?.into(),
            "--settings" => {
                let v = value("--settings")?;
                o.settings = Some(
                    serde_json::from_str(&v).map_err(|e| format!("--settings is not JSON: {e}"))?,
                );
            }
            "--once" => o.once = true,
            "--uninstall" => o.uninstall = true,
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = options(args)?;
    if o.uninstall {
        if let Some(file) = conflist(&o.conf_dir)? {
            edit(&file, remove_entry)?;
            eprintln!("strait-cni: removed from {}", file.display());
        }
        return Ok(());
    }
    copy_binary(&o.bin_dir)?;
    loop {
        match conflist(&o.conf_dir)? {
            Some(file) => {
                let settings = o.settings.clone();
                if edit(&file, |list| add_entry(list, settings.as_ref()))? {
                    eprintln!("strait-cni: chained into {}", file.display());
                }
            }
            None => eprintln!(
                "strait-cni: no *.conflist in {} yet (waiting for the cluster's CNI)",
                o.conf_dir.display()
            ),
        }
        if o.once {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(10));
    }
}

fn copy_binary(bin_dir: &Path) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let tmp = bin_dir.join(".strait-cni.tmp");
    std::fs::copy(&me, &tmp)
        .map_err(|e| format!("cannot copy the plugin to {}: {e}", bin_dir.display()))?;
    std::fs::rename(&tmp, bin_dir.join("strait-cni"))
        .map_err(|e| format!("cannot install the plugin in {}: {e}", bin_dir.display()))
}

/// The configuration list the runtime uses: the first `*.conflist` by name.
fn conflist(dir: &Path) -> Result<Option<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut lists: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    Ok(lists.into_iter().next())
}

/// Applies `change` to the list in `file`; writes it back (atomically) when it changed.
fn edit(file: &Path, change: impl FnOnce(&mut Value) -> bool) -> Result<bool, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut list: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a JSON network configuration list: {e}",
            file.display()
        )
    })?;
    if !change(&mut list) {
        return Ok(false);
    }
    let tmp = file.with_extension("conflist.strait-tmp");
    let pretty = serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, pretty).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, file).map_err(|e| format!("cannot replace {}: {e}", file.display()))?;
    Ok(true)
}

/// Chains the plugin last; true when the list changed.
pub fn add_entry(list: &mut Value, settings: Option<&Value>) -> bool {
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    if plugins.iter().any(|p| p["type"] == "strait-cni") {
        return false;
    }
    let mut entry = serde_json::json!({
        "type": "strait-cni",
        "capabilities": {strait_cni::ANNOTATIONS_CAPABILITY: true},
    });
    if let Some(s) = settings {
        entry["strait"] = s.clone();
    }
    plugins.push(entry);
    true
}

/// Takes the plugin out; true when the list changed.
pub fn remove_entry(list: &mut Value) -> bool {
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != "strait-cni");
    plugins.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_once_last_and_comes_out_again() {
        let mut list = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s",
            "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        assert!(add_entry(&mut list, None));
        assert!(!add_entry(&mut list, None), "idempotent");
        let plugins = list["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["type"], "strait-cni");
        assert_eq!(
            plugins[2]["capabilities"][strait_cni::ANNOTATIONS_CAPABILITY],
            true
        );
        assert!(remove_entry(&mut list));
        assert_eq!(list["plugins"].as_array().map(Vec::len), Some(2));
        assert!(!remove_entry(&mut list));
    }

    #[test]
    fn install_once_copies_the_binary_and_edits_the_first_list() {
        let dir = std::env::temp_dir().join(format!("strait-cni-install-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::create_dir_all(&conf).expect("conf");
        std::fs::write(
            conf.join("10-bridge.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("write");
        std::fs::write(
            conf.join("99-other.conflist"),
            r#"{"cniVersion":"1.0.0","name":"o","plugins":[{"type":"x"}]}"#,
        )
        .expect("write");
        let args: Vec<String> = [
            "--bin-dir",
            &bin.to_string_lossy(),
            "--conf-dir",
            &conf.to_string_lossy(),
            "--once",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run(&args).expect("install");
        assert!(bin.join("strait-cni").exists());
        let first = std::fs::read_to_string(conf.join("10-bridge.conflist")).expect("read");
        assert!(first.contains("strait-cni"), "{first}");
        let other = std::fs::read_to_string(conf.join("99-other.conflist")).expect("read");
        assert!(!other.contains("strait-cni"), "only the list in use");
        let mut uninstall = args.clone();
        uninstall.push("--uninstall".into());
        run(&uninstall).expect("uninstall");
        let first = std::fs::read_to_string(conf.join("10-bridge.conflist")).expect("read");
        assert!(!first.contains("strait-cni"), "{first}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
