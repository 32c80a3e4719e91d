//! Local mode: the mesh state comes from Kubernetes-style YAML files in a directory.
//!
//! The directory is rescanned every `interval` (default 250 ms) and a file is re-parsed only when
//! its bytes change. Polling, rather than inotify, sees every way a file can change (editors that
//! rename over it, `kubectl`-style tools, bind mounts) and costs little for a config directory.
//! A file that does not parse is reported with its path and error, and its last good content
//! keeps being served: a typo never takes services out of the mesh.

pub mod identity;
pub mod parse;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::index::{MeshIndex, Naming};
use crate::resources::Resource;

/// Why the directory could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the config directory {dir}: {source} (set --config-dir / STRAIT_CONFIG_DIR to a readable directory)")]
pub struct DirError {
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

#[derive(Debug)]
struct FileState {
    /// Modification time, size and inode at the last read: a file whose metadata is unchanged
    /// is not read again (except at every [`FULL_READ_EVERY`]th scan).
    meta: Option<(std::time::SystemTime, u64, u64)>,
    content: Vec<u8>,
    /// The last scan that listed the file.
    seen: u64,
    /// The last content that parsed; kept while the file is broken.
    resources: Vec<Arc<Resource>>,
    error: Option<String>,
}

/// The state of one config directory.
#[derive(Debug)]
pub struct LocalSource {
    dir: PathBuf,
    /// By path, as bytes: hashing and comparing bytes is a fraction of what `Path`'s
    /// component-wise `Hash`/`Ord` cost at every scan. Path order is restored when the
    /// resources are read (only after a change).
    files: HashMap<OsString, FileState>,
    /// Mints a bootstrap token per Pod document (local-mode identity).
    tokens: Option<identity::BootstrapTokens>,
    scans: u64,
}

/// Every this many scans, every file is read again whatever its metadata says (a write that
/// kept size and modification time, on a file system with coarse timestamps).
const FULL_READ_EVERY: u64 = 40;

type Meta = (std::time::SystemTime, u64, u64);

fn meta_of(m: &std::fs::Metadata) -> Option<Meta> {
    use std::os::unix::fs::MetadataExt as _;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: HashMap::new(),
            tokens: None,
            scans: 0,
        }
    }

    /// Mints bootstrap tokens for the Pod documents (see [`identity`]).
    pub fn with_bootstrap_tokens(mut self, tokens: identity::BootstrapTokens) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Rereads the directory. Returns whether the set of resources may have changed.
    pub fn scan(&mut self) -> Result<bool, DirError> {
        let mut listed = Vec::with_capacity(self.files.len());
        collect_yaml_files(&self.dir, &mut listed).map_err(|source| DirError {
            dir: self.dir.clone(),
            source,
        })?;
        let mut changed = false;
        self.scans += 1;
        let scan = self.scans;
        let full = scan.is_multiple_of(FULL_READ_EVERY);
        for (path, meta) in listed {
            if let Some(f) = self.files.get_mut(&path) {
                f.seen = scan;
                if !full && meta.is_some() && f.meta == meta {
                    continue;
                }
            }
            let path = PathBuf::from(path);
            let content = match std::fs::read(&path) {
                Ok(c) => c,
                // Deleted between listing and reading: the next scan drops it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read config file; keeping its last good content");
                    continue;
                }
            };
            if let Some(f) = self
                .files
                .get_mut(path.as_os_str())
                .filter(|f| f.content == content)
            {
                f.meta = meta;
                continue;
            }
            let parsed = std::str::from_utf8(&content)
                .map_err(|e| format!("not UTF-8: {e}"))
                .and_then(|text| parse::parse_documents(text).map_err(|e| e.to_string()));
            let entry = self
                .files
                .entry(path.clone().into_os_string())
                .or_insert(FileState {
                    meta: None,
                    content: Vec::new(),
                    seen: scan,
                    resources: Vec::new(),
                    error: None,
                });
            entry.content = content;
            entry.meta = meta;
            match parsed {
                Ok(resources) => {
                    if entry.error.take().is_some() {
                        tracing::info!(path = %path.display(), "config file parses again");
                    }
                    let (shared, differs) = crate::resources::share(&entry.resources, resources);
                    if differs {
                        entry.resources = shared;
                        changed = true;
                    }
                }
                Err(error) => {
                    tracing::error!(
                        path = %path.display(),
                        %error,
                        "invalid config file; keeping its last good content"
                    );
                    entry.error = Some(error);
                }
            }
        }
        // Files no longer listed are gone.
        let before = self.files.len();
        self.files.retain(|_, f| f.seen == scan);
        if self.files.len() != before {
            changed = true;
        }
        Ok(changed)
    }

    /// The files in path order.
    fn in_order(&self) -> Vec<(&Path, &FileState)> {
        let mut files: Vec<(&Path, &FileState)> =
            self.files.iter().map(|(p, f)| (Path::new(p), f)).collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        files
    }

    /// The resources of every file, in path order.
    pub fn resources(&self) -> Vec<Arc<Resource>> {
        self.in_order()
            .into_iter()
            .flat_map(|(_, f)| f.resources.iter().cloned())
            .collect()
    }

    /// Files that currently fail to parse, with their errors.
    pub fn errors(&self) -> Vec<(PathBuf, String)> {
        self.in_order()
            .into_iter()
            .filter_map(|(p, f)| f.error.clone().map(|e| (p.to_path_buf(), e)))
            .collect()
    }

    /// Scans once (failing if the directory is unreadable), then keeps `tx` up to date.
    pub async fn run(
        mut self,
        naming: Naming,
        interval: Duration,
        tx: watch::Sender<Arc<MeshIndex>>,
    ) -> Result<(), DirError> {
        self.scan()?;
        publish(&self, &naming, &tx);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.scan() {
                Ok(true) => publish(&self, &naming, &tx),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "keeping the last good mesh state"),
            }
        }
    }
}

fn publish(source: &LocalSource, naming: &Naming, tx: &watch::Sender<Arc<MeshIndex>>) {
    let mut resources = source.resources();
    if let Some(tokens) = &source.tokens {
        let pods: Vec<&crate::resources::Pod> = resources
            .iter()
            .filter_map(|r| match &**r {
                Resource::Pod(p) => Some(p),
                _ => None,
            })
            .collect();
        let minted = tokens.sync(&pods);
        resources.extend(minted.into_iter().map(Arc::new));
    }
    let index = MeshIndex::update(&resources, naming, Some(&tx.borrow()));
    tracing::info!(
        services = index.service_count(),
        recomputed = index.recomputed_services(),
        "mesh state updated"
    );
    crate::routes::log_status_changes(tx.borrow().route_statuses(), index.route_statuses());
    tx.send_replace(Arc::new(index));
}

/// The YAML files under `dir` (not hidden, recursively) with their metadata, in no order.
/// The metadata comes from the directory entry (no walk of the whole path per file), followed
/// through symbolic links (a ConfigMap mount's files are links into `..data`).
fn collect_yaml_files(dir: &Path, out: &mut Vec<(OsString, Option<Meta>)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue; // editor swap files, `..data` of Kubernetes ConfigMap mounts
        }
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect_yaml_files(&entry.path(), out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            let meta = if file_type.is_symlink() {
                std::fs::metadata(entry.path())
            } else {
                entry.metadata()
            };
            out.push((
                entry.path().into_os_string(),
                meta.ok().as_ref().and_then(meta_of),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-cp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    const SVC: &str = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn a_broken_file_keeps_its_last_good_content_and_reports_the_path() {
        let dir = tempdir("broken");
        let file = dir.join("web.yaml");
        std::fs::write(&file, SVC).expect("write");
        let mut src = LocalSource::new(&dir);
        assert!(src.scan().expect("scan"));
        assert_eq!(src.resources().len(), 1);

        std::fs::write(&file, "kind: Service\nmetadata: {name: [oops\n").expect("write");
        assert!(!src.scan().expect("scan"), "a broken file changes nothing");
        assert_eq!(src.resources().len(), 1, "last good content kept");
        let errors = src.errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, file);

        std::fs::write(&file, SVC.replace("web", "api")).expect("write");
        assert!(src.scan().expect("scan"));
        assert!(src.errors().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_configmap_mount_is_followed_through_its_links_and_files_come_in_path_order() {
        // A ConfigMap volume: `web.yaml -> ..data/web.yaml`, `..data -> ..v1`; an update
        // writes `..v2` and swaps `..data`: the link's own metadata never changes.
        let dir = tempdir("configmap");
        let v1 = dir.join("..v1");
        std::fs::create_dir_all(&v1).expect("mkdir");
        std::fs::write(v1.join("web.yaml"), SVC).expect("write");
        std::os::unix::fs::symlink("..v1", dir.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/web.yaml", dir.join("web.yaml")).expect("link");
        // Path order across subdirectories: `a/z.yaml` before `a-b.yaml` (by components).
        std::fs::create_dir_all(dir.join("a")).expect("mkdir");
        std::fs::write(dir.join("a").join("z.yaml"), SVC.replace("web", "first")).expect("write");
        std::fs::write(dir.join("a-b.yaml"), SVC.replace("web", "second")).expect("write");
        let mut src = LocalSource::new(&dir);
        assert!(src.scan().expect("scan"));
        let names = |src: &LocalSource| -> Vec<String> {
            src.resources()
                .iter()
                .map(|r| format!("{r:?}"))
                .map(|d| {
                    ["first", "second", "web", "api"]
                        .into_iter()
                        .find(|n| d.contains(&format!("\"{n}\"")))
                        .unwrap_or("?")
                        .to_string()
                })
                .collect()
        };
        assert_eq!(names(&src), ["first", "second", "web"]);
        assert!(!src.scan().expect("scan"), "nothing changed");

        let v2 = dir.join("..v2");
        std::fs::create_dir_all(&v2).expect("mkdir");
        std::fs::write(v2.join("web.yaml"), SVC.replace("web", "api")).expect("write");
        std::os::unix::fs::symlink("..v2", dir.join("..data.tmp")).expect("link");
        std::fs::rename(dir.join("..data.tmp"), dir.join("..data")).expect("swap");
        assert!(src.scan().expect("scan"), "the swapped content is seen");
        assert_eq!(names(&src), ["first", "second", "api"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn removed_files_and_hidden_files() {
        let dir = tempdir("removed");
        std::fs::write(dir.join("a.yaml"), SVC).expect("write");
        std::fs::write(dir.join(".a.yaml.swp"), "garbage").expect("write");
        std::fs::write(dir.join("notes.txt"), "garbage").expect("write");
        let mut src = LocalSource::new(&dir);
        src.scan().expect("scan");
        assert_eq!(src.resources().len(), 1);
        assert!(src.errors().is_empty());
        std::fs::remove_file(dir.join("a.yaml")).expect("rm");
        assert!(src.scan().expect("scan"));
        assert!(src.resources().is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = LocalSource::new("/nonexistent/strait")
            .scan()
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/strait"), "{err}");
    }
}
